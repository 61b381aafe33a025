"""Palettized layers: packing, forward, save/load through safetensors, bits per weight."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import qwen3

from afm_mlx.palettization import kernels
from afm_mlx.palettization import layers as palettized
from afm_mlx.palettization.kmeans import kmeans_lut
from afm_mlx.palettization.layers import (
    AFM_EMBEDDING_SETTINGS,
    PalettizedEmbedding,
    PalettizedLinear,
    apply_palettization_config,
    bits_per_weight,
    palettize_model,
    palettized_layers,
)
from afm_mlx.palettization.lut import lut_to_dense
from afm_mlx.palettization.packing import PACKABLE_BITS, pack_indices, packed_length, unpack_indices


@pytest.mark.parametrize("bits", PACKABLE_BITS)
@pytest.mark.parametrize("n", [64, 13, 1])
def test_pack_round_trip_and_storage(bits, n):
    rng = np.random.default_rng(bits * 100 + n)
    idx = rng.integers(0, 2**bits, size=(3, 5, n)).astype(np.uint8)
    packed = pack_indices(mx.array(idx), bits)
    assert packed.dtype == mx.uint8
    assert packed.shape == (3, 5, packed_length(n, bits)) == (3, 5, -(-n * bits // 8))
    assert np.array_equal(np.array(unpack_indices(packed, bits, n)), idx)


@pytest.mark.parametrize("bits", PACKABLE_BITS)
def test_packing_is_core_mls_bit_order(bits):
    utils = pytest.importorskip("coremltools.optimize._utils")
    idx = np.random.default_rng(bits).integers(0, 2**bits, size=(4, 40)).astype(np.uint8)
    ours = np.array(pack_indices(mx.array(idx), bits)).reshape(-1)
    assert np.array_equal(ours, utils.pack_elements_into_bits(idx.reshape(-1), bits))


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="bits=5"):
        pack_indices(mx.zeros((2, 8), mx.uint8), 5)
    with pytest.raises(ValueError, match="expected 4"):
        unpack_indices(mx.zeros((2, 3), mx.uint8), 4, 8)


def _linear(out_dims=48, in_dims=64, bias=True, seed=0):
    mx.random.seed(seed)
    layer = nn.Linear(in_dims, out_dims, bias=bias)
    if bias:
        layer.bias = mx.random.normal((out_dims,))
    return layer


@pytest.mark.parametrize("bits, axis", [(4, 0), (2, 0), (3, 1), (6, 0), (8, 1)])
def test_linear_forward_is_the_dequantized_dense_layer(bits, axis):
    dense = _linear()
    layer = PalettizedLinear.from_linear(dense, bits=bits, group_size=16, axis=axis)
    lut, idx = kmeans_lut(dense.weight, bits, 16, axis)
    assert layer.lut.dtype == mx.float16 and layer.packed.dtype == mx.uint8
    assert mx.array_equal(layer.lut, lut)
    assert mx.array_equal(layer.indices(), idx)
    assert mx.array_equal(layer.dequantize(), lut_to_dense(lut, idx, 16, axis).astype(mx.float32))

    x = mx.random.normal((2, 3, 64))
    want = x @ layer.dequantize().T + dense.bias
    with kernels.using("off"):  # dequantize + matmul: the same arithmetic, bit for bit
        assert mx.array_equal(layer(x), want)
    # 6 rows take the CPU kernel (another summation order): fp32 rounding apart.
    assert mx.allclose(layer(x), want, rtol=1e-5, atol=1e-5)
    assert mx.allclose(layer(x), dense(x), atol=0.5)  # and it approximates the original


def test_dense_cache_is_exact_and_never_saved(tmp_path):
    layer = PalettizedLinear.from_linear(_linear(bias=False), bits=4)
    x = mx.random.normal((4, 64))
    with kernels.using("off"):
        y = layer(x)
        layer.cache_dense_weight()
        assert mx.array_equal(layer(x), y)
    names = [k for k, _ in tree_flatten(layer.parameters())]
    assert names == ["packed", "lut"]
    mx.save_safetensors(str(tmp_path / "l.safetensors"), dict(tree_flatten(layer.parameters())))
    assert set(mx.load(str(tmp_path / "l.safetensors"))) == {"packed", "lut"}
    layer.clear_dense_cache()
    with kernels.using("off"):
        assert mx.array_equal(layer(x), y)


def test_input_dtype_is_kept():
    layer = PalettizedLinear.from_linear(_linear(), bits=4)
    x = mx.random.normal((2, 64))
    for dtype in (mx.float16, mx.bfloat16):
        y = layer(x.astype(dtype))
        assert y.dtype == dtype
        assert mx.allclose(y.astype(mx.float32), layer(x), atol=0.1)


def test_embedding_rows_and_tied_head():
    mx.random.seed(1)
    emb = nn.Embedding(64, 32)
    layer = PalettizedEmbedding.from_embedding(emb)  # AFM: 8-bit, one LUT per row
    assert layer.lut.shape == (64, 256) and layer.packed.shape == (64, 32)
    table = layer.dequantize()
    ids = mx.array([[0, 5, 63], [7, 7, 1]])
    assert mx.array_equal(layer(ids), table[ids])
    h = mx.random.normal((2, 3, 32))
    with kernels.using("off"):
        assert mx.array_equal(layer.as_linear(h), h @ table.T)
    assert mx.allclose(layer.as_linear(h), h @ table.T, rtol=1e-5, atol=1e-5)  # the kernel
    # 32 values per row and 256 levels: every value keeps its own level, exactly.
    assert mx.array_equal(table, emb.weight.astype(mx.float16).astype(mx.float32))


@pytest.mark.parametrize("kind, axis", [("tied head", 0), ("linear", 0), ("linear", 1)])
def test_a_vocabulary_sized_layer_decodes_a_slice_of_rows_at_a_time(kind, axis, monkeypatch):
    """More rows than ``DECODE_ROWS``: the forward pass decodes 16-row-aligned slices of 1000
    rows, exactly what decoding the whole weight gives, and never the whole weight at once."""
    mx.random.seed(2)
    if kind == "tied head":
        layer = PalettizedEmbedding.from_embedding(nn.Embedding(4096, 128), 4, 16, axis)
        run, bias = layer.as_linear, 0
    else:
        dense = _linear(4096, 128)
        layer = PalettizedLinear.from_linear(dense, 4, 16, axis)
        run, bias = layer, dense.bias
    assert layer.row_slices(1000)[:2] == (
        [(0, 992), (992, 1984)] if axis == 0 else [(0, 1000), (1000, 2000)]
    )
    x = mx.random.normal((3, 128))
    want = x @ layer.dequantize().T + bias
    mx.eval(want)
    peaks = []
    for rows in (1000, 10**9):  # then the whole weight at once
        monkeypatch.setattr(palettized, "DECODE_ROWS", rows)
        mx.clear_cache()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        with kernels.using("off"):
            got = run(x)
            mx.eval(got)
        peaks.append(mx.get_peak_memory() - before)
        assert mx.allclose(got, want, rtol=1e-6, atol=1e-6)
    assert peaks[0] < peaks[1] / 2, peaks


def _tiny_qwen3(seed=0):
    args = qwen3.ModelArgs(
        model_type="qwen3",
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        vocab_size=256,
        max_position_embeddings=128,
        rope_theta=500000.0,
        head_dim=16,
        tie_word_embeddings=True,
    )
    mx.random.seed(seed)
    return qwen3.Model(args)


def _mixed_predicate(path, module):
    if isinstance(module, nn.Embedding):
        return AFM_EMBEDDING_SETTINGS
    if path.endswith("mlp.down_proj"):
        return {"bits": 2}
    if path.endswith("v_proj"):
        return {"group_size": 8, "axis": 1}
    return True


def test_palettize_save_and_reload_exactly(tmp_path):
    model = _tiny_qwen3()
    tokens = mx.array([[1, 2, 3, 4, 5]])
    record = palettize_model(model, _mixed_predicate)
    assert record["model.embed_tokens"] == {"bits": 8, "group_size": 1, "axis": 0}
    assert record["model.layers.1.mlp.down_proj"] == {"bits": 2, "group_size": 16, "axis": 0}
    assert record["model.layers.0.self_attn.v_proj"] == {"bits": 4, "group_size": 8, "axis": 1}
    assert len(record) == 1 + 2 * 7 and len(palettized_layers(model)) == len(record)
    logits = model(tokens)

    weights = dict(tree_flatten(model.parameters()))
    path = str(tmp_path / "model.safetensors")
    mx.save_safetensors(path, weights)
    fresh = _tiny_qwen3(seed=5)
    apply_palettization_config(fresh, {"layers": record})
    fresh.load_weights(path)
    for name, value in tree_flatten(fresh.parameters()):
        assert value.dtype == weights[name].dtype and mx.array_equal(value, weights[name]), name
    assert mx.array_equal(fresh(tokens), logits)


def test_palettize_model_default_and_importance():
    model = _tiny_qwen3()
    imp_calls = []

    def importance(path, module):
        imp_calls.append(path)
        return mx.ones(module.weight.shape)

    record = palettize_model(model, importance=importance, bits=3)
    assert "model.embed_tokens" not in record  # embeddings only when the predicate says so
    assert all(s == {"bits": 3, "group_size": 16, "axis": 0} for s in record.values())
    assert imp_calls == list(record)


def test_bad_settings_name_the_layer():
    model = _tiny_qwen3()
    with pytest.raises(ValueError, match=r"model\.layers\.0\..*group_size=48"):
        palettize_model(model, group_size=48)
    assert not palettized_layers(model)  # nothing changed
    with pytest.raises(ValueError, match="bits=7"):
        palettize_model(model, bits=7)
    with pytest.raises(ValueError, match="unknown palettization settings"):
        palettize_model(model, lambda p, m: {"nbits": 4})


def test_apply_config_lists_every_problem():
    model = _tiny_qwen3()
    config = {
        "layers": {
            "model.layers.0.mlp.up_proj": {"bits": 4, "group_size": 16, "axis": 0},
            "model.layers.9.mlp.up_proj": {"bits": 4, "group_size": 16, "axis": 0},
            "model.layers.0.mlp.gate_proj": {"bits": 5, "group_size": 16, "axis": 0},
            "model.norm": {"bits": 4, "group_size": 16, "axis": 0},
        }
    }
    with pytest.raises(ValueError) as err:
        apply_palettization_config(model, config)
    message = str(err.value)
    assert "\n" not in message
    for expected in ("layers.9.mlp.up_proj", "bits=5", "model.norm"):
        assert expected in message
    assert not palettized_layers(model)  # nothing changed


def test_bits_per_weight_counts_everything():
    layer = PalettizedLinear.from_linear(_linear(64, 128, bias=True), bits=4, group_size=16)
    bpw = bits_per_weight(layer)
    # indices 4 bits + LUTs (4 groups x 16 x 16 bits) + bias (64 x 32 bits), over 64 x 128 weights
    expected = (64 * 128 * 4 + 4 * 16 * 16 + 64 * 32) / (64 * 128)
    assert bpw["palettized"] == pytest.approx(expected)
    assert bpw["palettized_weights"] == 64 * 128

    model = _tiny_qwen3()
    total_before = sum(a.size for _, a in tree_flatten(model.parameters()))
    palettize_model(model, _mixed_predicate)
    bpw = bits_per_weight(model)
    stored = sum(8 * a.nbytes for _, a in tree_flatten(model.parameters()))
    assert bpw["model_weights"] == total_before
    assert bpw["model"] == pytest.approx(stored / total_before)
    pal = sum(8 * a.nbytes for _, m in palettized_layers(model) for _, a in tree_flatten(m))
    assert bpw["palettized"] == pytest.approx(pal / bpw["palettized_weights"])
    assert 4 < bpw["palettized"] < bpw["model"]  # the tiny embedding's per-row LUTs cost a lot


def test_recompress_keeps_settings():
    layer = PalettizedLinear.from_linear(_linear(), bits=2, group_size=8, axis=1)
    again = layer.recompress(_linear(seed=3))
    assert again.settings == {"bits": 2, "group_size": 8, "axis": 1}
