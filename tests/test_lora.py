"""LoRA layer over every base type, adapter files (mlx-lm compatible), fingerprints, swapping."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from afm_mlx.adapters.lora import (
    DEFAULT_KEYS,
    AdapterCache,
    LoRALinear,
    LoRASettings,
    adapter_weights,
    attach_lora,
    base_fingerprint,
    fuse_lora,
    load_adapter,
    lora_layers,
    read_adapter,
    save_adapter,
)
from afm_mlx.core.errors import UserError
from afm_mlx.models.io import load_model, model_fingerprint
from afm_mlx.palettization.layers import PalettizedLinear

TOKENS = mx.array([[5, 17, 300, 42, 9, 77, 123, 4], [11, 12, 13, 14, 15, 16, 17, 18]])


def _bases():
    lin = nn.Linear(64, 96, bias=False)
    mx.eval(lin.parameters())
    return {
        "fp": lin,
        "affine_q4": nn.QuantizedLinear.from_linear(lin, group_size=32, bits=4),
        "palettized": PalettizedLinear.from_linear(lin, bits=4),
    }


@pytest.mark.parametrize("kind", ["fp", "affine_q4", "palettized"])
def test_lora_starts_at_base_output_and_trains_only_adapter_weights(kind):
    base = _bases()[kind]
    layer = LoRALinear.from_base(base, r=8, scale=2.0, key=mx.random.key(0))
    layer.freeze()
    layer.unfreeze(keys=["lora_a", "lora_b"], recurse=False)
    x = mx.random.normal((3, 64), key=mx.random.key(1))
    np.testing.assert_array_equal(np.array(layer(x)), np.array(base(x)))
    assert layer.lora_a.shape == (64, 8) and layer.lora_b.shape == (8, 96)

    before = {k: np.array(v) for k, v in tree_flatten(layer.parameters())}
    opt = optim.Adam(1e-2)
    loss_grad = nn.value_and_grad(layer, lambda m, x: (m(x) ** 2).sum())
    for _ in range(2):
        _, grads = loss_grad(layer, x)
        opt.update(layer, grads)
    mx.eval(layer.parameters())
    after = dict(tree_flatten(layer.parameters()))
    assert set(k for k, _ in tree_flatten(layer.trainable_parameters())) == {"lora_a", "lora_b"}
    for k, v in after.items():
        moved = not np.array_equal(np.array(v), before[k])
        assert moved == (k in ("lora_a", "lora_b")), k


def test_fuse_is_exact_on_fp_and_refused_then_measured_on_compressed_bases():
    for kind, base in _bases().items():
        layer = LoRALinear.from_base(base, r=4, scale=1.0, key=mx.random.key(0))
        layer.lora_b = mx.random.normal((4, 96), key=mx.random.key(2)) * 0.01
        x = mx.random.normal((2, 64), key=mx.random.key(3))
        if kind == "fp":
            fused = layer.fuse()
            assert type(fused) is nn.Linear
            np.testing.assert_allclose(np.array(fused(x)), np.array(layer(x)), atol=1e-5)
            continue
        with pytest.raises(UserError, match="--allow-lossy"):
            layer.fuse()
        fused = layer.fuse(allow_lossy=True)
        assert type(fused) is type(base)
    # Through the model-level API: the report says how much of the adapter survived.
    model = nn.Sequential()
    model.layers = [_Block(_bases()["palettized"])]
    attach_lora(model, LoRASettings(rank=4, keys=["proj"]))
    for _, m in lora_layers(model):
        m.lora_b = mx.random.normal(m.lora_b.shape, key=mx.random.key(4)) * 1e-4
    with pytest.raises(UserError, match="#1172"):
        fuse_lora(model)
    (report,) = fuse_lora(model, allow_lossy=True)
    assert not report["exact"] and report["adapter_error"] > 0.5  # a tiny update is mostly erased


class _Block(nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj


def test_mlx_lm_loads_our_adapter_on_the_fp_base_with_identical_logits(tiny_model_dir, tmp_path):
    import mlx_lm

    model, _, _ = load_model(tiny_model_dir)
    fingerprint = model_fingerprint(model)
    settings = LoRASettings(rank=4, scale=3.0)
    paths = attach_lora(model, settings, seed=5)
    assert len(paths) == 2 * len(DEFAULT_KEYS)
    for _, m in lora_layers(model):  # a non-trivial adapter, exactly representable in fp16
        m.lora_b = (mx.random.normal(m.lora_b.shape) * 0.5).astype(mx.float16).astype(mx.float32)
        m.lora_a = m.lora_a.astype(mx.float16).astype(mx.float32)
    save_adapter(tmp_path / "a", model, settings, fingerprint)

    stored = mx.load(str(tmp_path / "a" / "adapters.safetensors"))
    assert stored["model.layers.0.self_attn.q_proj.lora_a"].shape == (64, 4)
    assert stored["model.layers.1.mlp.down_proj.lora_b"].shape == (4, 64)
    assert all(v.dtype == mx.float16 for v in stored.values())
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["base_fingerprint"] == fingerprint
    assert config["lora_parameters"]["scale"] == 3.0 and config["lora_parameters"]["alpha"] == 12.0

    theirs, _ = mlx_lm.load(str(tiny_model_dir), adapter_path=str(tmp_path / "a"))
    ours, _, _ = load_model(tiny_model_dir)
    load_adapter(ours, tmp_path / "a")
    bare, _, _ = load_model(tiny_model_dir)
    a, b = np.array(theirs(TOKENS)), np.array(ours(TOKENS))
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert np.abs(a - np.array(bare(TOKENS))).max() > 1e-2  # the adapter really acts
    assert base_fingerprint(ours) == fingerprint


def test_adapter_on_another_base_is_refused_naming_both(tiny_model_dir, tmp_path):
    model, _, _ = load_model(tiny_model_dir)
    settings = LoRASettings(rank=2)
    attach_lora(model, settings)
    save_adapter(tmp_path / "a", model, settings, "0123456789abcdef", base_model="elsewhere")
    other, _, _ = load_model(tiny_model_dir)
    with pytest.raises(UserError) as e:
        load_adapter(other, tmp_path / "a")
    msg = str(e.value)
    assert "0123456789abcdef" in msg and model_fingerprint(other) in msg and "elsewhere" in msg
    assert not lora_layers(other)  # refused before touching the model


def test_scale_and_alpha_are_both_accepted_and_recorded():
    assert LoRASettings.from_flags(16, None, 32.0).scale == 2.0
    assert LoRASettings.from_flags(8, 4.0, None).alpha == 32.0
    with pytest.raises(UserError, match="give one"):
        LoRASettings.from_flags(8, 1.0, 8.0)
    with pytest.raises(UserError, match="name no linear layer"):
        attach_lora(_model_with_block(), LoRASettings(keys=["nonexistent"]))


def _model_with_block():
    model = nn.Sequential()
    model.layers = [_Block(nn.Linear(8, 8))]
    return model


def _random_adapter(tiny_model_dir, out, rank, seed):
    model, _, _ = load_model(tiny_model_dir)
    fp = model_fingerprint(model)
    settings = LoRASettings(rank=rank, scale=1.0)
    attach_lora(model, settings, seed=seed)
    for i, (_, m) in enumerate(lora_layers(model)):
        m.lora_b = mx.random.normal(m.lora_b.shape, key=mx.random.key(seed * 100 + i)) * 0.3
    save_adapter(out, model, settings, fp)
    return out


def test_swapping_adapters_matches_fresh_loads(tiny_model_dir, tmp_path):
    a = _random_adapter(tiny_model_dir, tmp_path / "a", rank=4, seed=1)
    b = _random_adapter(tiny_model_dir, tmp_path / "b", rank=8, seed=2)  # another shape too
    c = _random_adapter(tiny_model_dir, tmp_path / "c", rank=4, seed=3)

    def fresh(path):
        model, _, _ = load_model(tiny_model_dir)
        if path is not None:
            load_adapter(model, path)
        return np.array(model(TOKENS))

    expected = {p: fresh(p) for p in (a, b, c, None)}
    model, _, _ = load_model(tiny_model_dir)
    cache = AdapterCache(model)
    base_params = {k: v for k, v in tree_flatten(model.parameters())}
    for p in (a, b, a, c, None, a):
        cache.activate(p)
        np.testing.assert_array_equal(np.array(model(TOKENS)), expected[p], err_msg=str(p))
    assert len(cache._adapters) == 3  # each read from disk once
    for k, v in tree_flatten(model.parameters()):  # the base arrays themselves were never replaced
        if k.rsplit(".", 1)[-1] not in ("lora_a", "lora_b"):
            assert v is base_params[k.replace(".linear.", ".")]
    assert len(adapter_weights(model)) == 28
    assert read_adapter(a).settings.rank == 4
