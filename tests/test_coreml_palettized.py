"""Core ML conversion of palettized models: LUTs and indices in the package equal the MLX model's
byte for byte (mixed bits, column-grouped LUTs, 8-bit embedding), and logits match MLX."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from coremltools.proto import MIL_pb2
from mlx.utils import tree_flatten
from test_coreml import (
    CONTEXT,
    DECODE,
    PROMPT,
    assert_logits_close,
    convert_tiny,
    coreml_logits,
    mlx_logits,
)
from test_coreml_executor import blob_bytes, open_package

from afm_mlx.models.files import save_model
from afm_mlx.models.io import load_model
from afm_mlx.palettization.layers import palettize_model
from converters.coreml import package_bytes


@pytest.fixture(scope="module")
def pal_package(tiny_mixed_dir, tmp_path_factory) -> Path:
    return convert_tiny(tiny_mixed_dir, tmp_path_factory.mktemp("coreml_pal") / "pal.mlpackage")


def _lut_ops(spec, function: str = "decode") -> dict:
    func = spec.mlProgram.functions[function]
    return {
        op.outputs[0].name: op
        for block in func.block_specializations.values()
        for op in block.operations
        if op.type == "constexpr_lut_to_dense"
    }


def _mlx_layer(model, op_name: str):
    """The MLX module a constexpr op was built from (names: l{i}_{proj}_weight, embed_tokens)."""
    if op_name == "embed_tokens":
        return model.model.embed_tokens
    layer, proj = op_name[1:].removesuffix("_weight").split("_", 1)
    block = model.model.layers[int(layer)]
    owner = block.mlp if proj in ("gate_proj", "up_proj", "down_proj") else block.self_attn
    return getattr(owner, proj)


def test_luts_and_indices_bit_exact(tiny_mixed_dir, pal_package):
    model, _, _ = load_model(tiny_mixed_dir)
    package, spec, _ = open_package(pal_package)
    ops = _lut_ops(spec)
    assert len(ops) == 2 * 7 + 1  # every projection and the (tied) embedding
    seen_bits = set()
    for name, op in ops.items():
        layer = _mlx_layer(model, name)
        where, indices = blob_bytes(package.weights_dir, op, "indices")
        assert where == "blob", name
        _, lut = blob_bytes(package.weights_dir, op, "lut")
        index_type = op.inputs["indices"].arguments[0].value.type.tensorType.dataType
        assert MIL_pb2.DataType.Name(index_type) == f"UINT{layer.bits}", name
        assert indices == np.array(layer.packed).tobytes(), name
        assert lut == np.array(layer.lut).tobytes(), name
        seen_bits.add(layer.bits)
    assert seen_bits == {1, 2, 3, 4, 6, 8}
    emb = ops["embed_tokens"]
    lut_shape = [
        d.constant.size for d in emb.inputs["lut"].arguments[0].value.type.tensorType.dimensions
    ]
    assert lut_shape == [512, 1, 1, 1, 256, 1]  # 8-bit, one LUT per token row, as in MLX


def test_every_function_shares_the_same_blobs(pal_package):
    """prefill and decode point at the same weight.bin offsets: the base is stored once."""
    _, spec, _ = open_package(pal_package)
    offsets = {
        fn: {
            name: op.inputs["indices"].arguments[0].value.blobFileValue.offset
            for name, op in _lut_ops(spec, fn).items()
        }
        for fn in ("decode", "prefill")
    }
    assert offsets["decode"] == offsets["prefill"]


def test_package_size_matches_bits_per_weight(tiny_mixed_dir, pal_package):
    """weight.bin = packed indices + LUTs + fp16 norms + RoPE tables, within 2%."""
    model, _, _ = load_model(tiny_mixed_dir)
    expected = 0
    for name, p in tree_flatten(model.parameters()):
        expected += p.nbytes if name.endswith(("packed", "lut")) else p.size * 2
    expected += 2 * CONTEXT * 16 * 2
    weights = pal_package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    # Blob records carry 64-byte headers and 64-byte alignment: a few % at this tiny size.
    assert 1.0 <= weights.stat().st_size / expected < 1.12, (weights.stat().st_size, expected)
    assert package_bytes(pal_package) > weights.stat().st_size


def test_palettized_logits_match_mlx(tiny_mixed_dir, pal_package):
    model, _, _ = load_model(tiny_mixed_dir)
    _, _, prog = open_package(pal_package)
    assert_logits_close(coreml_logits(prog, PROMPT, DECODE), mlx_logits(model, PROMPT, DECODE))


def _arrays(obj):
    """Every NumPy array of a plan, in order (through dataclasses, lists, tuples and dicts)."""
    if isinstance(obj, np.ndarray):
        yield obj
    elif dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _arrays(getattr(obj, f.name))
    elif isinstance(obj, list | tuple):
        for item in obj:
            yield from _arrays(item)
    elif isinstance(obj, dict):
        for key in sorted(obj):
            yield from _arrays(obj[key])


def test_the_converters_read_a_model_a_block_at_a_time(tmp_path, monkeypatch):
    """``read_model`` gives each block back to disk once it is in the plan: the MLX memory of
    reading six blocks (attention palettized, MLP dense) peaks at a fraction of holding them all,
    for the same plan. The plan's packed indices are views of MLX's buffers, not copies: they
    stay after the model is gone, and nothing else does."""
    import mlx.core as mx

    from afm_mlx.models import streaming
    from afm_mlx.models.presets import build_model, init_weights, preset_config
    from converters.export import ExportConfig, read_model

    config = preset_config("tiny", num_hidden_layers=6, hidden_size=256, intermediate_size=768)
    model = build_model(config)
    init_weights(model, config, seed=3)
    chosen = palettize_model(model, class_predicate=lambda path, m: "self_attn" in path)
    folder = save_model(tmp_path / "pal", model, {**config, "palettization": {"layers": chosen}})
    del model
    peaks, plans = [], []
    for streamed in (True, False):
        if not streamed:
            monkeypatch.setattr(streaming, "block_releaser", lambda model, path: None)
        mx.clear_cache()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        plans.append(read_model(ExportConfig(context=64), folder, []).weights)
        peaks.append(mx.get_peak_memory() - before)
        packed = [p.weight.packed for p in plans[-1].projections().values() if "attn" in p.path]
        assert len(packed) == 6 * 4 and all(not a.flags.owndata for a in packed)
        assert mx.get_active_memory() - before == pytest.approx(sum(a.nbytes for a in packed), 0.05)
    got, want = (list(_arrays(plan)) for plan in plans)
    assert len(got) == len(want) > 6 * 7
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
    assert peaks[0] < peaks[1] / 2, peaks


@pytest.mark.parametrize("bits,cols", [(4, 32), (3, 16), (3, 5), (2, 7), (8, 6)])
def test_lut_matrix_bit_stream_and_indices(bits, cols):
    """The plan's ``LutMatrix`` keeps the model's packed rows: its bit stream (Core AI's layout,
    one little-endian stream over the flattened tensor) is those rows when they fill whole bytes
    and a repacking when they do not; ``unpack`` unpacks them, after which the matrix holds only
    the unpacked copy, and row slices taken before or after agree."""
    import mlx.core as mx

    from afm_mlx.palettization.packing import pack_indices
    from converters.weights import LutMatrix

    rng = np.random.default_rng(bits * 100 + cols)
    indices = rng.integers(0, 1 << bits, (32, cols), dtype=np.uint8)
    lut = rng.standard_normal((2, 1 << bits)).astype(np.float16)

    def matrix() -> LutMatrix:
        packed = np.array(pack_indices(mx.array(indices), bits))
        return LutMatrix(packed=packed, cols=cols, lut=lut, bits=bits)

    # The reference stream, element by element: bit j of element i is stream bit i * bits + j.
    flat = indices.reshape(-1).astype(np.int64)
    bits_of = (flat[:, None] >> np.arange(bits)) & 1
    stream = np.packbits(bits_of.reshape(-1), bitorder="little")
    m = matrix()
    assert m.shape == (32, cols)
    np.testing.assert_array_equal(m.bit_stream(), stream)
    aligned = cols * bits % 8 == 0
    assert np.shares_memory(m.bit_stream(), m.packed) if aligned else m.packed is None
    before = matrix().row_slice(16, 32)
    m = matrix()
    np.testing.assert_array_equal(m.unpack(), indices)
    assert m.packed is None and m.shape == (32, cols)
    np.testing.assert_array_equal(m.bit_stream(), stream)
    after = m.row_slice(16, 32)
    for part in (before, after):
        assert part.shape == (16, cols) and part.lut.shape == (1, 1 << bits)
        np.testing.assert_array_equal(part.unpack(), indices[16:])
    with pytest.raises(ValueError, match="split a LUT group"):
        m.row_slice(8, 32)
