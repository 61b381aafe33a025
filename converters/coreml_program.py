"""Core ML emitter: the shared lowering (``converters.lowering``) as a MIL program, one per function.

Layout follows Apple's "Deploying Transformers on the Apple Neural Engine": activations are
channels-first ``(1, C, 1, S)`` and every projection is a 1x1 ``conv``, the layout the ANE executes
natively (no transposes around each matmul, and the last axis, which the ANE pads to 64 bytes, is the
sequence instead of the channels). Everything is static-shaped, fp16 and at most rank 4.
Palettized weights are ``constexpr_lut_to_dense`` with the model's LUTs and indices.
"""

from __future__ import annotations

import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Function, Program, Var, types

from converters.lowering import Emitter, lower, state_names
from converters.weights import LoraWeights, LutMatrix, Matrix, ModelWeights, as_fp16


def _opset():
    import coremltools as ct

    return ct.target.iOS18


def _sub_byte_dtype(bits: int) -> np.dtype:
    """The NumPy dtype coremltools uses to mark indices as uint<bits> (packed when serialized);
    applied as a view, so a 3B model's indices are not copied once per function."""
    return types.nptype_from_builtin(types.string_to_builtin(f"uint{bits}"))


def _c(value):
    """NumPy operand -> MIL constant dtype: floats fp16, integers int32."""
    a = np.asarray(value)
    if a.dtype.kind == "f":
        return a.astype(np.float16)
    return a.astype(np.int32) if a.dtype.kind in "iu" else a


class MILEmitter(Emitter):
    """MIL builder ops for one function; weights become one (constexpr) const per matrix."""

    channel_axis = 1

    def __init__(self, states: dict[str, Var]):
        self.states = states
        self._weights: dict[int, Var] = {}

    def act_shape(self, channels: int, seq: int) -> list[int]:
        return [1, channels, 1, seq]

    def shape(self, x: Var) -> list[int]:
        return list(x.shape)

    def _weight(self, m: Matrix, name: str) -> Var:
        """A (rows, cols, 1, 1) conv weight, created once per function (the tied embedding and
        LM head chunk share it)."""
        if id(m) in self._weights:
            return self._weights[id(m)]
        if isinstance(m, LutMatrix):
            rows, cols = m.shape
            groups, entries = m.lut.shape
            # LUT rank = indices rank + 2: (groups, 1, 1, 1, entries, 1) for groups of rows,
            # (1, groups, ...) for groups of columns; the LUT values are the MLX ones, unchanged.
            blocks = (groups, 1) if m.axis == 0 else (1, groups)
            var = mb.constexpr_lut_to_dense(
                indices=m.unpack().reshape((rows, cols, 1, 1)).view(_sub_byte_dtype(m.bits)),
                lut=m.lut.reshape((*blocks, 1, 1, entries, 1)),
                name=name,
            )
        else:
            var = mb.const(val=as_fp16(m, name)[:, :, None, None], name=name)
        self._weights[id(m)] = var
        return var

    def project(self, x, weight, bias, name):
        kwargs = {} if bias is None else {"bias": as_fp16(bias, name + ".bias")}
        return mb.conv(x=x, weight=self._weight(weight, name + "_weight"), name=name, **kwargs)

    def gather_rows(self, weight, ids, name):
        rows = mb.gather(x=self._weight(weight, name), indices=ids, axis=0, name=name + "_gather")
        return mb.reshape(x=rows, shape=[self.shape(ids)[0], weight.shape[1]], name=name + "_rows")

    def update_cache(self, state, rows, begin, end, name):
        old = mb.read_state(input=self.states[state], name=name + "_read")
        new = mb.slice_update(x=old, update=rows, begin=begin, end=end, name=name + "_new")
        mb.coreml_update_state(state=self.states[state], value=new, name=name + "_write")
        return new

    def add(self, x, y, name):
        return mb.add(x=x, y=y if isinstance(y, Var) else _c(y), name=name)

    def mul(self, x, y, name):
        return mb.mul(x=x, y=y if isinstance(y, Var) else _c(y), name=name)

    def rsqrt(self, x, eps, name):
        return mb.rsqrt(x=x, epsilon=np.float16(eps), name=name)

    def reduce_sum(self, x, axis, name):
        return mb.reduce_sum(x=x, axes=[axis], keep_dims=True, name=name)

    def softmax(self, x, axis, name):
        return mb.softmax(x=x, axis=axis, name=name)

    def silu(self, x, name):
        return mb.silu(x=x, name=name)

    def tanh(self, x, name):
        return mb.tanh(x=x, name=name)

    def matmul(self, x, y, name, transpose_y=False):
        return mb.matmul(x=x, y=y, transpose_y=transpose_y, name=name)

    def reshape(self, x, shape, name):
        return mb.reshape(x=x, shape=shape, name=name)

    def transpose(self, x, perm, name):
        return mb.transpose(x=x, perm=perm, name=name)

    def slice(self, x, begin, end, name):
        return mb.slice_by_index(x=x, begin=begin, end=end, name=name)

    def concat(self, values, axis, name):
        return mb.concat(
            values=[v if isinstance(v, Var) else _c(v) for v in values], axis=axis, name=name
        )

    def gather(self, table, ids, name):
        return mb.gather(x=as_fp16(table, name), indices=ids, axis=0, name=name)

    def greater(self, x, y, name):
        return mb.greater(x=x if isinstance(x, Var) else _c(x), y=y, name=name)

    def equal(self, x, y, name):
        return mb.equal(x=x, y=y, name=name)

    def clip(self, x, low, high, name):
        # MIL's clip is float-only: int32 maximum/minimum instead.
        low_var = mb.maximum(x=x, y=np.int32(low), name=name + "_low")
        return mb.minimum(x=low_var, y=np.int32(high), name=name)

    def clamp(self, x, low, high, name):
        return mb.clip(x=x, alpha=np.float16(low), beta=np.float16(high), name=name)

    def round(self, x, name):
        return mb.round(x=x, name=name)

    def where(self, cond, value, x, name):
        return mb.select(cond=cond, a=np.float16(value), b=x, name=name)

    def to_float(self, x, name):
        return mb.cast(x=x, dtype="fp16", name=name)


def build_function(
    mw: ModelWeights, seq: int, context: int, lora: LoraWeights | None = None
) -> Program:
    """A single-function ("main") MIL program processing ``seq`` tokens against a ``context`` cache."""
    cache_shape = (mw.kv_heads, context, mw.head_dim)
    specs = {
        "input_ids": mb.TensorSpec((1, seq), dtype=types.int32),
        "position": mb.TensorSpec((1,), dtype=types.int32),
    }
    for name in state_names(mw):
        specs[name] = mb.StateTensorSpec(cache_shape, dtype=types.fp16)
    with Function(specs, opset_version=_opset()) as func:
        inputs = func.inputs
        states = {name: inputs[name] for name in state_names(mw)}
        em = MILEmitter(states)
        func.set_outputs(lower(em, mw, inputs["input_ids"], inputs["position"], seq, context, lora))
    prog = Program()
    prog.add_function("main", func)
    return prog
