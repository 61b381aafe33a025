"""Checkpoints in the HF qwen3 layout: mlx-lm and transformers open them with identical logits."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from afm_mlx.core.errors import UserError
from afm_mlx.models.files import save_model
from afm_mlx.models.io import load, load_model
from afm_mlx.models.presets import build_model, count_parameters, init_weights, preset_config

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


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_stored_table_reads_rows_as_stored(tmp_path, dtype):
    """``StoredTable`` reads rows of a safetensors tensor straight from the file: the rows
    ``mx.load`` gives, in the stored dtype, for slices and for lookups of any shape (repeated
    ids included); names stored otherwise are not offered; a truncated file is a clear error."""
    from afm_mlx.models.streaming import StoredTable

    rng = np.random.default_rng(0)
    table = mx.array(rng.standard_normal((300, 24)).astype(np.float32)).astype(getattr(mx, dtype))
    other = mx.arange(10)
    file = tmp_path / "model.safetensors"
    mx.save_safetensors(str(file), {"a.weight": other, "model.embed_tokens.weight": table})
    stored = StoredTable.find(tmp_path, "model.embed_tokens.weight")
    assert stored.shape == (300, 24) and stored.dtype == table.dtype
    assert StoredTable.find(tmp_path, "a.weight") is None  # 1-D int: not a table
    assert StoredTable.find(tmp_path, "missing") is None
    got = stored.rows(100, 164)
    assert got.dtype == table.dtype and mx.array_equal(got, table[100:164])
    assert mx.array_equal(stored.rows(290, 400), table[290:])  # clipped to the table
    ids = mx.array([[5, 299, 5, 0], [7, 7, 1, 2]])
    assert mx.array_equal(stored.take(ids), table[ids])
    with pytest.raises(UserError, match="outside the 300-row"):
        stored.take(mx.array([300]))
    file.write_bytes(file.read_bytes()[:-500])
    with pytest.raises(UserError, match="truncated"):
        stored.rows(280, 300)


def test_streamed_teacher_reads_its_table_a_slice_at_a_time(tmp_path, tiny_tokenizer):
    """A recovery teacher's pass (``streamed_logits`` with the model's folder) takes its
    embedding rows and each head slice from the file: the same logits as the float32 copy, for
    tied and untied heads, at a peak well under the whole bfloat16 table it read before."""
    from afm_mlx.models import streaming
    from afm_mlx.models.files import save_model
    from afm_mlx.models.presets import build_model, init_weights, preset_config
    from afm_mlx.models.streaming import block_releaser, stored_tables, streamed_logits

    tokens = mx.array([[5, 17, 300, 42, 9, 77, 123, 4, 250, 8]])
    for tied in (True, False):
        config = preset_config(
            "tiny", vocab_size=131072, hidden_size=128, num_hidden_layers=2,
            tie_word_embeddings=tied,
        )  # fmt: skip
        model = build_model(config)
        init_weights(model, config, seed=1)
        model.set_dtype(mx.bfloat16)
        folder = save_model(tmp_path / f"tied{tied}", model, config, tiny_tokenizer)
        model.set_dtype(mx.float32)
        want = np.array(model(tokens))
        table_bytes = 131072 * 128 * 2  # 8 head slices
        del model
        peaks = []
        for path in (folder, None):
            lazy = load_model(folder, lazy=True)[0]
            release = block_releaser(lazy, folder)
            mx.eval(tokens)
            mx.reset_peak_memory()
            before = mx.get_active_memory()
            tables = stored_tables(lazy, path) if path is not None else (None, None)
            got = np.array(streamed_logits(lazy, release, tokens, tables=tables))
            peaks.append(mx.get_peak_memory() - before)
            np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())
            del lazy, release
        assert peaks[0] < 0.6 * table_bytes < table_bytes < peaks[1], (tied, peaks, table_bytes)
    assert streaming.HEAD_ROWS == 16384  # the slices the peak above counts on
