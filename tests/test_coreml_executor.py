"""A NumPy reference executor for the MIL programs the Core ML converter emits, and its own tests.

There is no Core ML runtime on Linux, so the converter's output is proved by running the program
*read back from the saved .mlpackage* (spec + weight.bin, via coremltools' milproto loader) op by op
here. Each op computes in float32 (int32/bool where typed so) and rounds its result to the dtype the
program declares for it, so fp16 storage between ops is reproduced. Only the op types the converter
emits are implemented; anything else raises, so a new op cannot slip through untested.

The executor's ops are checked below against direct NumPy formulas on small hand-built programs, so
that a wrong executor cannot make a wrong converter look right.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import numpy as np
import pytest

logging.getLogger("coremltools").setLevel(logging.ERROR)  # no-runtime warnings on Linux

import coremltools as ct  # noqa: E402
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.frontend.milproto.load import load as milproto_load  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

_NP_DTYPES = {
    types.fp16: np.float16,
    types.fp32: np.float32,
    types.int32: np.int32,
    types.bool: np.bool_,
    types.uint8: np.uint8,
}


def open_package(path: str | Path):
    """(MLModel opened without the runtime, its spec, the MIL program read back from disk)."""
    model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    prog = milproto_load(spec, spec.specificationVersion, model.weights_dir)
    return model, spec, prog


def lut_to_dense(indices: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """iOS18 constexpr_lut_to_dense for scalar LUTs: lut (*blocks, entries, 1), one per block."""
    assert lut.ndim == indices.ndim + 2 and lut.shape[-1] == 1, (lut.shape, indices.shape)
    table = lut[..., 0]
    for axis, (n, blocks) in enumerate(zip(indices.shape, lut.shape[:-2])):
        table = np.repeat(table, n // blocks, axis=axis)  # one LUT row per index position
    return np.take_along_axis(table, indices[..., None].astype(np.int64), axis=-1)[..., 0]


def _slices(begin, end) -> tuple[slice, ...]:
    return tuple(slice(int(b), int(e)) for b, e in zip(begin, end))


def _conv_1x1(
    x, weight, bias=None, strides=None, pad_type=None, pad=None, dilations=None, groups=1
):
    assert weight.shape[2:] == (1, 1) and groups == 1, "the converter only emits 1x1 convs"
    assert list(strides) == [1, 1] and list(dilations) == [1, 1] and pad_type == "valid"
    y = np.einsum("oi,bihw->bohw", weight[:, :, 0, 0].astype(np.float32), x.astype(np.float32))
    return y if bias is None else y + bias.astype(np.float32)[None, :, None, None]


def _f32(x):
    return x.astype(np.float32) if np.asarray(x).dtype == np.float16 else x


def _slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    assert stride is None or all(s == 1 for s in stride)
    assert not any(np.any(m) for m in (begin_mask, end_mask, squeeze_mask) if m is not None)
    return x[_slices(begin, end)]


def _slice_update(x, update, begin, end, **masks):
    assert not any(np.any(m) for k, m in masks.items() if k != "stride" and m is not None)
    out = x.copy()
    out[_slices(begin, end)] = update
    return out


OPS = {
    "add": lambda x, y: _f32(x) + _f32(y),
    "mul": lambda x, y: _f32(x) * _f32(y),
    "greater": lambda x, y: np.greater(x, y),
    "equal": lambda x, y: np.equal(x, y),
    "maximum": lambda x, y: np.maximum(x, y),
    "minimum": lambda x, y: np.minimum(x, y),
    "select": lambda cond, a, b: np.where(cond, _f32(a), _f32(b)),
    "cast": lambda x, dtype: x,  # the result dtype comes from the program
    "gather": lambda x, indices, axis, batch_dims=0, validate_indices=False: np.take(
        x, indices, axis=int(axis)
    ),
    "transpose": lambda x, perm: np.transpose(x, perm),
    "reshape": lambda x, shape: np.reshape(x, shape),
    "expand_dims": lambda x, axes: np.expand_dims(x, tuple(int(a) for a in axes)),
    "slice_by_index": _slice_by_index,
    "concat": lambda values, axis, interleave=False: np.concatenate(values, axis=int(axis)),
    "reduce_sum": lambda x, axes, keep_dims=False: np.sum(
        _f32(x), axis=tuple(int(a) for a in axes), keepdims=bool(keep_dims)
    ),
    "rsqrt": lambda x, epsilon=1e-12: 1.0 / np.sqrt(_f32(x) + np.float32(epsilon)),
    "conv": _conv_1x1,
    "matmul": lambda x, y, transpose_x=False, transpose_y=False: np.matmul(
        np.swapaxes(_f32(x), -1, -2) if transpose_x else _f32(x),
        np.swapaxes(_f32(y), -1, -2) if transpose_y else _f32(y),
    ),
    "softmax": lambda x, axis: _softmax(_f32(x), int(axis)),
    "silu": lambda x: _f32(x) / (1.0 + np.exp(-_f32(x))),
    "tanh": lambda x: np.tanh(_f32(x)),
    "round": lambda x: np.round(_f32(x)),  # ties to even, as MIL's round
    "clip": lambda x, alpha, beta: np.clip(_f32(x), _f32(alpha), _f32(beta)),
    "constexpr_lut_to_dense": lambda indices, lut, vector_axis=None: lut_to_dense(indices, lut),
    "slice_update": _slice_update,
    "identity": lambda x: x,
}


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def run_function(prog, name: str, inputs: dict, states: dict[str, np.ndarray]) -> dict:
    """Execute function ``name``; ``states`` (name -> array) is read and updated in place."""
    func = prog.functions[name]
    env: dict[str, np.ndarray] = {}
    for var_name, var in func.inputs.items():
        if types.is_state(var.sym_type):
            continue
        want = _NP_DTYPES[var.dtype]
        arr = np.asarray(inputs[var_name])
        assert arr.shape == tuple(var.shape) and arr.dtype == want, (var_name, arr.shape, arr.dtype)
        env[var_name] = arr

    def value(v):
        if isinstance(v, (list, tuple)):
            return [value(x) for x in v]
        if v.name in env:
            return env[v.name]
        if v.val is not None:
            return v.val
        raise KeyError(f"{v.name} has no value yet")

    for op in func.operations:
        if op.op_type == "const":
            continue
        if op.op_type == "read_state":
            result = states[op.inputs["input"].name].copy()
        elif op.op_type == "coreml_update_state":
            state = op.inputs["state"].name
            new = value(op.inputs["value"])
            assert new.shape == states[state].shape and new.dtype == states[state].dtype
            states[state] = new.copy()
            result = new
        elif op.op_type in OPS:
            args = {k: value(v) for k, v in op.inputs.items()}
            result = OPS[op.op_type](**args)
        else:
            # An op the executor cannot run fails the test: nothing is skipped silently.
            raise AssertionError(f"reference executor has no op {op.op_type!r}")
        out = op.outputs[0]
        result = np.asarray(result)
        want = _NP_DTYPES[out.dtype] if types.is_tensor(out.sym_type) or out.shape == () else None
        env[out.name] = result.astype(want) if want is not None else result
        assert env[out.name].shape == tuple(out.shape), (op.name, env[out.name].shape, out.shape)
    return {v.name: env[v.name] for v in func.outputs}


def new_states(prog, name: str) -> dict[str, np.ndarray]:
    """Zero-filled states for function ``name`` (what Core ML's ``make_state`` starts from)."""
    func = prog.functions[name]
    return {
        k: np.zeros(v.shape, _NP_DTYPES[v.sym_type.wrapped_type().get_primitive()])
        for k, v in func.inputs.items()
        if types.is_state(v.sym_type)
    }


def blob_bytes(weights_dir: str | Path, op, arg: str) -> tuple[str, bytes]:
    """(where, raw bytes) of the constant argument ``arg`` of spec op ``op``: "blob" when it is
    stored in weight.bin (read past the blob's metadata record), "immediate" when small enough to
    sit in the spec itself. Constexpr ops carry their constant inputs inline like this."""
    value = op.inputs[arg].arguments[0].value
    if value.WhichOneof("value") == "immediateValue":
        tensor = value.immediateValue.tensor
        assert tensor.WhichOneof("value") == "bytes", f"{arg}: not a raw-bytes immediate"
        return "immediate", tensor.bytes.values
    offset = value.blobFileValue.offset
    with open(Path(weights_dir) / "weight.bin", "rb") as f:
        f.seek(offset)
        sentinel, _dtype, size, data_offset = struct.unpack("<IIQQ", f.read(24))
        assert sentinel == 0xDEADBEEF, "not a blob metadata record"
        f.seek(data_offset)
        return "blob", f.read(size)


# --- the executor's own tests ------------------------------------------------------------------------


def _save_and_load(prog, tmp_path: Path):
    model = ct.convert(
        prog,
        minimum_deployment_target=ct.target.iOS18,
        pass_pipeline=ct.PassPipeline.EMPTY,
        skip_model_load=True,
    )
    model.save(str(tmp_path / "p.mlpackage"))
    return open_package(tmp_path / "p.mlpackage")


def test_executor_ops_match_numpy(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 4)).astype(np.float16)
    idx = rng.integers(0, 4, (8, 4)).astype(np.uint8)
    lut = rng.standard_normal((2, 1, 4, 1)).astype(np.float16)

    @mb.program(
        input_specs=[
            mb.TensorSpec((1, 4, 1, 3), dtype=types.fp16),
            mb.TensorSpec((1,), dtype=types.int32),
            mb.StateTensorSpec((2, 5), dtype=types.fp16),
        ],
        opset_version=ct.target.iOS18,
    )
    def prog(x, position, cache):
        conv = mb.conv(x=x, weight=w[:, :, None, None], bias=np.ones(6, np.float16), name="conv")
        dense = mb.constexpr_lut_to_dense(
            indices=idx.astype(types.np_uint2_dtype), lut=lut, name="dense"
        )
        x2 = mb.reshape(x=x, shape=[4, 3])
        mm = mb.matmul(x=dense, y=x2, name="mm")  # (8, 3)
        sm = mb.softmax(x=mm, axis=0, name="sm")
        norm = mb.rsqrt(
            x=mb.reduce_sum(x=mb.mul(x=x2, y=x2), axes=[0], keep_dims=True),
            epsilon=np.float16(1e-3),
            name="norm",
        )
        rows = mb.gather(
            x=w, indices=mb.add(x=position, y=np.array([0, 2], np.int32)), axis=0, name="rows"
        )
        old = mb.read_state(input=cache)
        begin = mb.concat(values=[np.zeros(1, np.int32), position], axis=0)
        new = mb.slice_update(
            x=old,
            update=mb.slice_by_index(x=rows, begin=[0, 0], end=[2, 3]),
            begin=begin,
            end=mb.add(x=begin, y=np.array([2, 3], np.int32)),
        )
        mb.coreml_update_state(state=cache, value=new)
        mask = mb.cast(x=mb.greater(x=np.arange(5, dtype=np.int32), y=position), dtype="fp16")
        act = mb.silu(x=mb.mul(x=mask, y=np.float16(-3.0)), name="act")
        return conv, mm, sm, norm, rows, act

    _, _, loaded = _save_and_load(prog, tmp_path)
    x = rng.standard_normal((1, 4, 1, 3)).astype(np.float16)
    states = {"cache": np.zeros((2, 5), np.float16)}
    out = run_function(loaded, "main", {"x": x, "position": np.array([1], np.int32)}, states)
    conv, mm, sm, norm, rows, act = (out[k] for k in ("conv", "mm", "sm", "norm", "rows", "act"))
    x32, w32 = x.astype(np.float32), w.astype(np.float32)
    np.testing.assert_allclose(conv[0, :, 0], w32 @ x32[0, :, 0] + 1, rtol=2e-3, atol=2e-3)
    dense = np.stack([lut[i // 4, 0, idx[i], 0] for i in range(8)]).astype(np.float32)
    np.testing.assert_allclose(mm, dense @ x32[0, :, 0], rtol=2e-3, atol=2e-3)
    e = np.exp(mm.astype(np.float32) - mm.max(0))
    np.testing.assert_allclose(sm, e / e.sum(0), rtol=3e-3, atol=1e-3)
    np.testing.assert_allclose(
        norm[0], 1 / np.sqrt((x32[0, :, 0] ** 2).sum(0) + 1e-3), rtol=3e-3, atol=1e-3
    )
    np.testing.assert_array_equal(rows, w[[1, 3]])
    want_cache = np.zeros((2, 5), np.float16)
    want_cache[:, 1:4] = w[[1, 3], :3]
    np.testing.assert_array_equal(states["cache"], want_cache)
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    np.testing.assert_allclose(act, silu(np.array([0, 0, -3, -3, -3.0])), rtol=2e-3, atol=1e-3)
    assert out["mm"].dtype == np.float16


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6, 8])
def test_executor_lut_semantics_equal_coremltools_reference(bits):
    """The executor's constexpr_lut_to_dense equals coremltools' own reference decompression for
    every layout the converter emits: groups of rows or of columns, 2-D and conv-shaped 4-D."""
    from coremltools.converters.mil.mil.ops.defs.iOS18.compression import constexpr_lut_to_dense

    rng = np.random.default_rng(bits)
    rows, cols, entries = 64, 48, 2**bits
    idx = rng.integers(0, entries, (rows, cols)).astype(np.uint8)
    for blocks in ((rows // 16, 1), (1, cols // 16), (rows // 32, 1)):
        lut = rng.standard_normal((*blocks, entries, 1)).astype(np.float16)
        for extra in ((), (1, 1)):
            i = idx.reshape(rows, cols, *extra)
            lt = lut.reshape(*blocks, *extra, entries, 1)
            want = constexpr_lut_to_dense.decompress(i, lt, None)
            np.testing.assert_array_equal(lut_to_dense(i, lt), want)
            assert lut_to_dense(i, lt).dtype == want.dtype == np.float16


def test_executor_selection_ops_match_numpy(tmp_path):
    """The ops behind the chunked embedding, the select mask, Gemma's GELU and afm7's 8-bit
    fake quantization (round, clip), against NumPy."""

    @mb.program(
        input_specs=[
            mb.TensorSpec((4,), dtype=types.int32),
            mb.TensorSpec((2, 4), dtype=types.fp16),
        ],
        opset_version=ct.target.iOS18,
    )
    def prog(ids, x):
        clipped = mb.minimum(x=mb.maximum(x=ids, y=np.int32(0)), y=np.int32(5), name="clipped")
        same = mb.equal(x=ids, y=clipped, name="same")
        picked = mb.select(cond=same, a=np.float16(-3.0), b=x, name="picked")
        scaled = mb.mul(x=x, y=np.float16(0.75))
        rounded = mb.round(x=scaled, name="rounded")
        clamped = mb.clip(x=scaled, alpha=np.float16(1.0), beta=np.float16(3.5), name="clamped")
        squashed = mb.tanh(x=mb.mul(x=x, y=np.float16(0.25)), name="squashed")
        return clipped, same, picked, rounded, clamped, squashed

    _, _, loaded = _save_and_load(prog, tmp_path)
    ids = np.array([-2, 0, 5, 9], np.int32)
    x = np.arange(8, dtype=np.float16).reshape(2, 4)
    out = run_function(loaded, "main", {"ids": ids, "x": x}, {})
    np.testing.assert_array_equal(out["clipped"], [0, 0, 5, 5])
    np.testing.assert_array_equal(out["same"], [False, True, True, False])
    np.testing.assert_array_equal(out["picked"], np.where([False, True, True, False], -3.0, x))
    assert out["picked"].dtype == np.float16
    # 0.75 * [0..7]: 1.5 and 4.5 are ties, to even (2 and 4).
    np.testing.assert_array_equal(out["rounded"].reshape(-1), [0, 1, 2, 2, 3, 4, 4, 5])
    np.testing.assert_array_equal(out["clamped"].reshape(-1), np.clip(np.arange(8) * 0.75, 1, 3.5))
    np.testing.assert_allclose(out["squashed"], np.tanh(x.astype(np.float32) / 4), atol=1e-3)


def test_executor_refuses_unknown_ops(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec((2,), dtype=types.fp16)], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.exp(x=x, name="y")

    _, _, loaded = _save_and_load(prog, tmp_path)
    with pytest.raises(AssertionError, match="exp"):
        run_function(loaded, "main", {"x": np.zeros(2, np.float16)}, {})


def test_lut_bytes_are_lsb_first_rows(tmp_path):
    """The blob reader sees 4-bit indices as two per byte, low nibble first, row after row."""
    idx = np.arange(512, dtype=np.uint8).reshape(32, 16) % 16
    lut = np.arange(32, dtype=np.float16).reshape(2, 1, 16, 1)

    @mb.program(
        input_specs=[mb.TensorSpec((16, 1), dtype=types.fp16)], opset_version=ct.target.iOS18
    )
    def prog(x):
        w = mb.constexpr_lut_to_dense(indices=idx.astype(types.np_uint4_dtype), lut=lut, name="w")
        return mb.matmul(x=w, y=x, name="y")

    model, spec, _ = _save_and_load(prog, tmp_path)
    op = next(
        o
        for b in spec.mlProgram.functions["main"].block_specializations.values()
        for o in b.operations
        if o.type == "constexpr_lut_to_dense"
    )
    where, raw = blob_bytes(model.weights_dir, op, "indices")
    assert where == "blob"
    want = (idx[:, 0::2] | (idx[:, 1::2] << 4)).astype(np.uint8).tobytes()
    assert raw == want
    _, raw_lut = blob_bytes(model.weights_dir, op, "lut")
    assert raw_lut == lut.tobytes()
