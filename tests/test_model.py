"""Checkpoints in the HF qwen3 layout: mlx-lm and transformers open them with identical logits."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from afm_mlx.cli import UserError
from afm_mlx.model import (
    build_model,
    count_parameters,
    init_weights,
    load,
    load_model,
    preset_config,
    save_model,
)

TOKENS = [[5, 17, 300, 42, 9, 77, 123, 4, 250, 8], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]


def _logits(model, tokens=TOKENS) -> np.ndarray:
    return np.array(model(mx.array(tokens)))


def test_mlx_lm_loads_our_checkpoint_with_identical_logits(tiny_model_dir):
    import mlx_lm

    ours, tokenizer = load(tiny_model_dir)
    theirs, their_tokenizer = mlx_lm.load(str(tiny_model_dir))
    np.testing.assert_array_equal(_logits(ours), _logits(theirs))
    text = "Enter ROMEO, 1234 times."
    assert tokenizer.encode(text) == their_tokenizer.encode(text)


def test_transformers_qwen3_matches_our_logits(tiny_model_dir):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    with torch.no_grad():
        theirs = hf(torch.tensor(TOKENS)).logits.numpy()
    ours = _logits(load(tiny_model_dir)[0])
    assert np.abs(ours).max() > 0.1  # not a degenerate all-zero comparison
    np.testing.assert_allclose(ours, theirs, atol=2e-5, rtol=1e-4)


def test_afm_3b_preset_has_afm_parameter_count():
    counts = count_parameters(preset_config("afm-3b"))
    # Gunter et al. 2024: ~2.58B non-embedding + 0.15B embedding (FFN width 8192 gives 2.62B).
    assert counts["embedding"] == 49152 * 3072
    assert abs(counts["non_embedding"] - 2.58e9) / 2.58e9 < 0.02
    assert counts["total"] == counts["embedding"] + counts["non_embedding"]


def test_small_preset_is_demo_sized():
    assert 10e6 <= count_parameters(preset_config("small"))["total"] <= 30e6
    assert count_parameters(preset_config("tiny"))["total"] < 1e6


def test_sharded_save_round_trip(tmp_path, tiny_model_dir):
    import mlx_lm

    model, config, _ = load_model(tiny_model_dir)
    out = save_model(tmp_path / "sharded", model, config, tiny_model_dir, max_shard_bytes=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    reloaded, _ = mlx_lm.load(str(out))
    np.testing.assert_array_equal(_logits(model), _logits(reloaded))
    # Re-saving unsharded removes the stale shards and the index.
    save_model(out, model, config)
    assert not (out / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in out.glob("model*.safetensors")) == ["model.safetensors"]


def test_llama_family_checkpoint_loads(tmp_path, tiny_tokenizer):
    config = {
        **preset_config("tiny"),
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "tie_word_embeddings": False,
    }
    model = build_model(config)
    init_weights(model, config, seed=3)
    save_model(tmp_path, model, config, tiny_tokenizer)
    loaded, tokenizer = load(tmp_path)
    np.testing.assert_array_equal(_logits(model), _logits(loaded))
    assert tokenizer.encode("hello") == tokenizer.encode("hello")


def test_hub_repo_id_resolves_through_huggingface_hub_cache(tmp_path, tiny_model_dir, monkeypatch):
    """A repo id goes through huggingface_hub.snapshot_download (offline, from a local cache)."""
    snapshot = tmp_path / "hub" / "models--afm--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model_dir, snapshot)
    (tmp_path / "hub" / "models--afm--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--afm--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    model, _ = load("afm/tiny")
    np.testing.assert_array_equal(_logits(model), _logits(load(tiny_model_dir)[0]))
    with pytest.raises(UserError, match="could not be fetched"):
        load("afm/absent")


def test_truncated_safetensors_is_a_clear_error(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        load(bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="unreadable"):
        load(bad)


def test_weight_mismatches_are_all_listed(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] = 96
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as err:
        load(bad)
    message = str(err.value)
    assert "mlp.gate_proj.weight" in message and "mlp.down_proj.weight" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "change, match",
    [
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
        ({"model_type": "mamba"}, "not supported"),
        ({"hidden_size": 0}, "hidden_size"),
    ],
)
def test_inconsistent_configs_are_refused(change, match):
    with pytest.raises(UserError, match=match):
        preset_config("tiny", **change)


def test_unknown_preset():
    with pytest.raises(UserError, match="unknown preset 'huge'"):
        preset_config("huge")
