"""Core AI emitter: the shared lowering (``converters.lowering``) in the coreai MLIR dialect.

One module holds every function (``decode``, ``prefill``, ``decode_NAME``, ``prefill_NAME``) as a
public ``coreai.graph``. Activations are ``(C, S)`` and a projection is ``batch_matmul(W, x)`` with
``W`` as stored, so weights are never transposed. Every weight is one module-level resource blob
that all functions reference, so the base is stored once however many functions use it:
palettized matrices as ``lut_to_dense`` of the model's indices (one little-endian bit stream over
the flattened tensor, the layout Core AI reads for sub-byte types) and its fp16 LUTs, bit for bit.

The KV cache is state: each function takes ``!coreai.handle<tensor<kv x context x head_dim>>``
arguments (``k_cache_i``, ``v_cache_i``), reads them with ``read_handle`` and writes the updated
rows back with ``write_handle``, chaining tokens; the caller owns the buffers, so ``prefill`` then
``decode`` calls on the same arrays continue one sequence.

Import this module only after ``converters.coreai_run.require_coreai()``: ``coreai.authoring`` must be
imported before the dialect module (the other order is a circular import).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
from coreai.authoring import AIProgram, Module

# isort: split
# coreai.authoring must be imported before the dialect (the other order is a circular import).
from coreai._compiler import ir
from coreai._compiler.dialects import coreai as ops

from converters.export import ModelPlan
from converters.lowering import Emitter, lower, state_names
from converters.weights import LutMatrix, Matrix, as_fp16

COMPUTE_DTYPES = {"float16": np.float16, "float32": np.float32}
_LUT_AXIS = np.array(0, np.int16)  # lut_to_dense's vector axis (scalar LUT entries: unused)


def _memo(cache: dict, key: object, part: str, make):
    """``make()`` once per (object, part); keys are objects of the plan, alive while it builds."""
    k = (id(key), part)
    if k not in cache:
        cache[k] = make()
    return cache[k]


def _mlir_float(dtype) -> ir.Type:
    return ir.F16Type.get() if dtype == np.float16 else ir.F32Type.get()


class WeightStore:
    """Module-wide resource blobs, one per weight array, shared by every function."""

    def __init__(self, dtype):
        self.dtype = dtype
        self._attrs: dict[tuple[int, str], Any] = {}
        self._buffers: list[np.ndarray] = []  # the blobs reference these until the asset is saved

    def _resource(self, array: np.ndarray, element: ir.Type, shape, name: str):
        data = np.ascontiguousarray(array)
        self._buffers.append(data)
        return ir.DenseResourceElementsAttr.get_from_buffer(
            memoryview(data.view(np.uint8).reshape(-1)),
            f"{name}_{len(self._buffers)}",
            ir.RankedTensorType.get(list(shape), element),
        )

    def lut_parts(self, m: LutMatrix, name: str) -> tuple[Any, Any]:
        """(indices, LUT) attributes: indices as uint<bits> of the matrix's shape, stored as
        the packed bit stream; LUT (groups, 1, 2^bits, 1) or (1, groups, 2^bits, 1), fp16."""

        def indices():
            return self._resource(
                m.bit_stream(), ir.IntegerType.get_unsigned(m.bits), m.shape, name + "_indices"
            )

        def lut():
            groups, entries = m.lut.shape
            shape = (groups, 1, entries, 1) if m.axis == 0 else (1, groups, entries, 1)
            return self._resource(m.lut.reshape(shape), ir.F16Type.get(), shape, name + "_lut")

        return _memo(self._attrs, m, "indices", indices), _memo(self._attrs, m, "lut", lut)

    def dense(self, m: np.ndarray, name: str) -> Any:
        def make():
            data = as_fp16(m, name) if self.dtype == np.float16 else m.astype(np.float32)
            return self._resource(data, _mlir_float(self.dtype), m.shape, name)

        return _memo(self._attrs, m, "dense", make)


class CoreAIEmitter(Emitter):
    """coreai dialect ops for one graph; weights come from the shared ``WeightStore``."""

    channel_axis = 0

    def __init__(self, store: WeightStore, handles: dict[str, Any]):
        self.store = store
        self.dtype = store.dtype
        self.handles = handles
        self.tokens: dict[str, Any] = {}
        self._values: dict[tuple[int, str], Any] = {}

    # --- helpers ----------------------------------------------------------------------------------
    def _c(self, value) -> Any:
        """A NumPy operand as a constant: floats in the compute dtype, integers int32."""
        if isinstance(value, ir.Value):
            return value
        a = np.asarray(value)
        a = a.astype(self.dtype) if a.dtype.kind == "f" else a.astype(np.int32)
        return ops.constant(a)

    def _lut_consts(self, m: LutMatrix, name: str) -> tuple[Any, Any]:
        def make():
            idx, lut = self.store.lut_parts(m, name)
            return ops.ConstantOp(idx).result, ops.ConstantOp(lut).result

        return _memo(self._values, m, "lut_consts", make)

    def _to_compute(self, x) -> Any:
        return x if self.dtype == np.float16 else ops.cast(x, np.float32)

    def _dense(self, m: Matrix, name: str) -> Any:
        """The (rows, cols) weight in the compute dtype, once per graph."""

        def make():
            if isinstance(m, LutMatrix):
                idx, lut = self._lut_consts(m, name)
                return self._to_compute(ops.lut_to_dense(idx, lut, _LUT_AXIS))
            return ops.ConstantOp(self.store.dense(m, name)).result

        return _memo(self._values, m, "dense", make)

    # --- Emitter ----------------------------------------------------------------------------------
    def act_shape(self, channels, seq):
        return [channels, seq]

    def shape(self, x):
        return list(ir.RankedTensorType(x.type).shape)

    def project(self, x, weight, bias, name):
        y = ops.batch_matmul(self._dense(weight, name + "_weight"), x)
        if bias is not None:
            y = ops.broadcasting_add(y, self._c(bias.reshape(-1, 1)))
        return y

    def gather_rows(self, weight, ids, name):
        (seq,) = self.shape(ids)
        ids2 = ops.reshape(ids, [seq, 1])
        if not isinstance(weight, LutMatrix):
            return ops.gather_nd(ops.ConstantOp(self.store.dense(weight, name)).result, ids2)
        # Gather the packed index rows and their LUTs, then decompress only those rows.
        idx, lut = self._lut_consts(weight, name)
        rows = ops.gather_nd(idx, ids2)
        if weight.axis == 0:
            g = weight.group_size
            groups = ids2 if g == 1 else ops.floor_divide(ids2, self._c(np.full((seq, 1), g)))
            lut = ops.gather_nd(lut, groups)
        return self._to_compute(ops.lut_to_dense(rows, lut, _LUT_AXIS))

    def update_cache(self, state, rows, begin, end, name):
        handle = self.handles[state]
        token = self.tokens[state] if state in self.tokens else ops.create_token()
        old, token = ops.read_handle(handle, token)
        strides = np.ones(len(self.shape(rows)), np.int32)
        new = ops.slice_update(old, begin, end, strides, rows)
        self.tokens[state] = ops.write_handle(handle, new, token)
        return new

    def add(self, x, y, name):
        return ops.broadcasting_add(x, self._c(y))

    def mul(self, x, y, name):
        return ops.broadcasting_mul(x, self._c(y))

    def rsqrt(self, x, eps, name):
        return ops.rsqrt(ops.broadcasting_add(x, self._c(np.float32(eps))))

    def reduce_sum(self, x, axis, name):
        return ops.reduce_sum(x, np.array([axis], np.int32))

    def softmax(self, x, axis, name):
        return ops.softmax(x, np.array(axis % len(self.shape(x)), np.int32))

    def silu(self, x, name):
        return ops.silu(x)

    def tanh(self, x, name):
        return ops.tanh(x)

    def matmul(self, x, y, name, transpose_y=False):
        if transpose_y:
            rank = len(self.shape(y))
            y = self.transpose(y, [*range(rank - 2), rank - 1, rank - 2], name + "_yt")
        return ops.batch_matmul(x, y)

    def reshape(self, x, shape, name):
        return ops.reshape(x, list(shape))

    def transpose(self, x, perm, name):
        return ops.transpose(x, np.array(perm, np.uint32))

    def slice(self, x, begin, end, name):
        return ops.slice_(
            x,
            np.array(begin, np.int32),
            np.array(end, np.int32),
            np.ones(len(begin), np.int32),
        )

    def concat(self, values, axis, name):
        return ops.concat(np.array(axis, np.int32), [self._c(v) for v in values])

    def gather(self, table, ids, name):
        (seq,) = self.shape(ids)
        return ops.gather_nd(self._c(table), ops.reshape(ids, [seq, 1]))

    def greater(self, x, y, name):
        return ops.broadcasting_greater(self._c(x), self._c(y))

    def equal(self, x, y, name):
        return ops.broadcasting_equal(x, y)

    def clip(self, x, low, high, name):
        low_v = ops.broadcasting_maximum(x, self._c(np.int32(low)))
        return ops.broadcasting_minimum(low_v, self._c(np.int32(high)))

    def clamp(self, x, low, high, name):
        low_v = ops.broadcasting_maximum(x, self._c(np.float32(low)))
        return ops.broadcasting_minimum(low_v, self._c(np.float32(high)))

    def round(self, x, name):
        return ops.round_(x)

    def where(self, cond, value, x, name):
        return ops.broadcasting_where(cond, self._c(np.float32(value)), x)

    def to_float(self, x, name):
        return ops.cast(x, self.dtype)


def build_program(
    plan: ModelPlan, context: int, compute_dtype: str
) -> tuple[AIProgram, WeightStore]:
    """Every function of ``plan`` as one Core AI program (weights stored once). The store holds the
    arrays the program's weight blobs point at: keep it until the program is saved."""
    dtype = COMPUTE_DTYPES[compute_dtype]
    mw = plan.weights
    module = Module.create()
    with module:
        store = WeightStore(dtype)
        element = _mlir_float(dtype)
        si32 = ir.IntegerType.get_signed(32)
        cache_type = ir.RankedTensorType.get([mw.kv_heads, context, mw.head_dim], element)
        states = state_names(mw)
        for fn in plan.functions:
            inputs = [
                ir.RankedTensorType.get([1, fn.seq], si32),
                ir.RankedTensorType.get([1], si32),
            ]
            inputs += [ops.HandleType.get(cache_type) for _ in states]
            outputs = [ir.RankedTensorType.get([1, fn.seq, n], element) for n in mw.logit_chunks()]
            names = [f"logits_{j}" for j in range(len(outputs))]
            # The runtime wants one token result per handle argument (the end of its chain).
            token_names = [f"{s}_done" for s in states]
            graph = ops.GraphOp(
                fn.name,
                inputs,
                [*outputs, *(ops.TokenType.get() for _ in states)],
                ["input_ids", "position", *states],
                [*names, *token_names],
            )
            with graph.block:
                input_ids, position, *handles = graph.arguments
                em = CoreAIEmitter(store, dict(zip(states, handles, strict=True)))
                logits = lower(em, mw, input_ids, position, fn.seq, context, fn.lora)
                tokens = [em.tokens[s] for s in states]
                graph.outputs_spec = [*zip(names, logits), *zip(token_names, tokens)]
    return AIProgram(module), store


def _sha256_file(path: Path, chunk: int = 1 << 20) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.digest()


def save_program(program: AIProgram, path: Path, metadata: dict[str, Any]) -> None:
    """Write the asset (a folder) with our metadata as the asset's custom metadata.

    These are ``AIProgram.save_asset``'s steps (coreai-core 1.0.0b3, pinned), save that the
    bytecode's SHA-256 (``main.hash``) is taken in 1 MiB reads: ``save_asset`` reads the whole
    ``main.mlirb`` back into memory for it, as much again as the weights themselves, and that
    was the conversion's memory peak."""
    from coreai.authoring.asset import _COREAI_PRODUCER, OSVersion, _AIModelAsset
    from coreai.runtime import AIModelAssetMetadata

    meta = AIModelAssetMetadata()
    meta.model_description = (
        "afm_mlx language model: prefill/decode functions over a shared KV-cache state"
    )
    for key, value in metadata.items():
        meta.set_custom(key, value)
    if path.suffix != ".aimodel" or path.exists():
        raise ValueError(f"{path}: expected a new NAME.aimodel path")
    path.mkdir(parents=True)
    asset = _AIModelAsset._create(path=str(path), metadata=meta)
    program._save_bytecode(asset._program_bytecode_path, minimum_os=OSVersion.v27)

    def stamp(m: AIModelAssetMetadata) -> None:
        m.creation_date = time.time()
        m._producer = _COREAI_PRODUCER

    asset.update_metadata(updates=stamp)
    asset._program_hash_path.write_bytes(_sha256_file(asset._program_bytecode_path))
