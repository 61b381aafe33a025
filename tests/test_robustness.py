"""Nothing lost, nothing surprising: the defects found when the CLIs were tried as a new user would
(issue 11), each reproduced here, and the machinery that fixes them (staged output folders, the
output lock, checkpoints found by listing, config-last saves).

The SIGKILL suite is ``tests/test_fault_injection.py`` (slow marker).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import REPO, adapter_with_updates, one_line_error, run_cli

from afm_mlx.core.config import parse_config
from afm_mlx.core.errors import UserError
from afm_mlx.core.fileio import output_lock, staged_dir

# --- 1. fuse --dequantize over a palettized base reloads ----------------------------------------


@pytest.fixture(scope="module")
def palettized_with_adapter(tiny_lut4_dir, tmp_path_factory):
    """A 4-bit palettized tiny model (8-bit embedding) and a random non-zero adapter for it."""
    from afm_mlx.adapters.lora import load_adapter
    from afm_mlx.models.io import load_base

    adapter = adapter_with_updates(
        tiny_lut4_dir, tmp_path_factory.mktemp("fuse_deq") / "adapter", seed=3, std=0.05
    )
    # The reference: the saved adapter over the saved base, as generate --adapter runs it.
    base, _, _ = load_base(tiny_lut4_dir)
    load_adapter(base, adapter)
    ids = mx.array([[5, 17, 42, 99, 7, 300, 12, 1]])
    return tiny_lut4_dir, adapter, ids, np.array(base(ids).astype(mx.float32))


def test_fuse_dequantize_over_palettized_base_reloads_exactly(palettized_with_adapter, tmp_path):
    from afm_mlx.models.io import load_model
    from afm_mlx.palettization.layers import palettized_layers

    pal, adapter, ids, expected = palettized_with_adapter
    out = tmp_path / "fused"
    proc = run_cli(
        "afm_mlx.fuse", "--model", pal, "--adapter", adapter, "--out", out, "--dequantize"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    model, config, _ = load_model(out)  # was: "missing ...down_proj.lut"
    # The adapted projections are dense now; the embedding stays palettized and is recorded.
    assert [p for p, _ in palettized_layers(model)] == ["model.embed_tokens"]
    assert list(config["palettization"]["layers"]) == ["model.embed_tokens"]
    got = np.array(model(ids).astype(mx.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


# --- 2. repeated list flags add up ----------------------------------------------------------------


def test_repeated_list_flags_are_all_kept():
    from afm_mlx.finetune import FinetuneConfig
    from afm_mlx.generate import GenerateConfig
    from afm_mlx.palettize import PalettizeConfig

    g = parse_config(GenerateConfig, ["--adapter", "a", "--adapter", "b", "c"], "g", "")
    assert g.adapter == ["a", "b", "c"]
    f = parse_config(
        FinetuneConfig, ["--keys", "self_attn.q_proj", "--keys", "mlp.up_proj"], "", ""
    )
    assert f.keys == ["self_attn.q_proj", "mlp.up_proj"]
    p = parse_config(PalettizeConfig, ["--bit-choices", "2", "--bit-choices", "4", "6"], "", "")
    assert p.bit_choices == [2, 4, 6]
    # Without the flag the default list is untouched (and not shared between configs).
    assert parse_config(GenerateConfig, [], "g", "").adapter == []


def test_repeated_adapter_flag_reaches_the_cli(tiny_model_dir, tmp_path):
    # Every --adapter is read, the first one included: it is the one reported missing. Before,
    # only the last flag's value was kept (and reported).
    proc = run_cli(
        "afm_mlx.evaluate", "--model", tiny_model_dir, "--adapter", tmp_path / "first-missing",
        "--adapter", tmp_path / "second-missing",
    )  # fmt: skip
    assert "first-missing" in one_line_error(proc)


# --- 3. console scripts: one per stage, with the fast BLAS ----------------------------------------


def _scripts() -> dict[str, str]:
    """The console scripts afm_mlx's installed metadata declares (name -> module:function)."""
    from importlib.metadata import entry_points

    return {
        e.name: e.value
        for e in entry_points(group="console_scripts")
        if e.value.startswith(("afm_mlx.", "converters."))
    }


def _script_path(name: str) -> Path:
    path = Path(sys.executable).parent / name
    if not path.exists():
        found = shutil.which(name)
        assert found, f"{name} is not installed; run pip install -e . again"
        path = Path(found)
    return path


def test_every_stage_has_a_console_script():
    from test_architecture import commands

    targets = {v.split(":")[0] for v in _scripts().values()}
    assert set(commands()) <= targets, sorted(set(commands()) - targets)
    for name in _scripts():
        _script_path(name)


@pytest.mark.slow  # a subprocess-heavy CLI check: in the slow suite
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS preload is Linux-only")
def test_console_script_gets_the_fast_blas(tiny_corpus, tiny_tokenizer, tmp_path):
    from afm_mlx.core.blas import find_openblas

    if find_openblas() is None:
        pytest.skip("no OpenBLAS on this machine (apt-get install libopenblas0-pthread)")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "AFM_MLX_BLAS_REEXEC")}
    proc = subprocess.run(
        [
            str(_script_path("afm-train")), "--preset", "tiny", "--data", str(tiny_corpus),
            "--tokenizer", str(tiny_tokenizer), "--out", str(tmp_path / "run"),
            "--max-steps", "1", "--batch-size", "2", "--seq-len", "16", "--sample-tokens", "0",
            "--no-progress",
        ],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(OpenBLAS)" in proc.stdout, proc.stdout[:500]


# --- 4. evaluate by hub repo id; a malformed tokenizer.json ---------------------------------------


def _hub_cache(model_dir: Path, root: Path, repo: str) -> Path:
    """A Hugging Face cache holding ``model_dir`` as ``repo`` (as a download would leave it)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    entry = root / f"models--{repo.replace('/', '--')}"
    shutil.copytree(model_dir, entry / "snapshots" / commit)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    return root


@pytest.mark.slow  # a subprocess-heavy CLI check: in the slow suite
def test_evaluate_by_repo_id_offline(tiny_model_dir, tiny_corpus, tmp_path, monkeypatch):
    cache = _hub_cache(tiny_model_dir, tmp_path / "hub", "afm-test/tiny")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    common = ["--data", tiny_corpus, "--max-batches", "2", "--seq-len", "32", "--json"]
    by_id = run_cli("afm_mlx.evaluate", "--model", "afm-test/tiny", *common)
    assert by_id.returncode == 0, by_id.stderr[-2000:]
    by_dir = run_cli("afm_mlx.evaluate", "--model", tiny_model_dir, *common)
    assert by_dir.returncode == 0, by_dir.stderr[-2000:]
    a = json.loads(by_id.stdout.splitlines()[-1])["results"][0]
    b = json.loads(by_dir.stdout.splitlines()[-1])["results"][0]
    assert a["tokens"] == b["tokens"] > 0
    assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-6)


def test_malformed_tokenizer_json_is_one_line(tiny_model_dir, tiny_corpus, tmp_path):
    bad = tmp_path / "model"
    shutil.copytree(tiny_model_dir, bad)
    (bad / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')  # cut short
    err = one_line_error(run_cli("afm_mlx.evaluate", "--model", bad, "--data", tiny_corpus))
    assert "tokenizer" in err and str(bad) in err
    from afm_mlx.data.tokenizer import TextTokenizer

    with pytest.raises(UserError, match="tokenizer.json: not a valid tokenizer file"):
        TextTokenizer(bad)


# --- 5. staged outputs, the output lock, checkpoints, config-last saves ---------------------------


def test_staged_dir_renames_only_when_complete(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(RuntimeError, match="boom"):
        with staged_dir(out) as staged:
            staged.mkdir()
            (staged / "config.json").write_text("{}")
            raise RuntimeError("boom")
    assert not out.exists() and os.listdir(tmp_path) == []  # nothing left behind
    with staged_dir(out) as staged:
        staged.mkdir()
        (staged / "a").write_text("1")
        assert not out.exists()  # not visible until complete
    assert (out / "a").read_text() == "1" and os.listdir(tmp_path) == ["model"]


def test_staged_dir_replaces_atomically_and_cleans_dead_stages(tmp_path):
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "old").write_text("old")
    # A staging folder left by a killed process (pid 2**22 + 1 cannot be alive: above pid_max).
    dead = tmp_path / f".tmp-{2**22 + 1}-pkg-abc"
    dead.mkdir()
    with pytest.raises(UserError, match="not replaced"):
        with staged_dir(out) as staged:
            staged.mkdir()
    assert (out / "old").read_text() == "old" and not dead.exists()
    with staged_dir(out, replace=True) as staged:
        staged.mkdir()
        (staged / "new").write_text("new")
    assert sorted(os.listdir(out)) == ["new"]
    assert os.listdir(tmp_path) == ["pkg"]


def test_output_lock_refuses_a_second_writer_and_dies_with_its_holder(tmp_path):
    out = tmp_path / "run"
    with output_lock(out):
        with pytest.raises(UserError, match=f"another afm_mlx process \\(pid {os.getpid()}\\)"):
            with output_lock(out):
                pass
    with output_lock(out):  # released: taken again
        pass
    assert os.listdir(tmp_path) == []  # no lock file left behind
    # A holder killed with SIGKILL releases it (flock belongs to the process).
    code = (
        f"import sys, time; sys.path.insert(0, {str(REPO)!r})\n"
        "from afm_mlx.core.fileio import output_lock\n"
        f"with output_lock({str(out)!r}):\n    print('locked', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(UserError):
        with output_lock(out):
            pass
    holder.kill()
    holder.wait()
    with output_lock(out):
        pass


@pytest.mark.parametrize("stage", ["train", "palettize", "fuse", "recover", "coreml", "coreai"])
def test_every_stage_refuses_an_output_being_written(stage, tiny_model_dir, tmp_path):
    out = tmp_path / {"coreml": "m.mlpackage", "coreai": "m.aimodel"}.get(stage, "out")
    args = {
        "train": ("afm_mlx.train", "--preset", "tiny", "--out", out),
        "palettize": ("afm_mlx.palettize", "--model", tiny_model_dir, "--out", out),
        "fuse": ("afm_mlx.fuse", "--model", tiny_model_dir, "--adapter", tmp_path, "--out", out),
        "recover": (
            "afm_mlx.recover", "--model", tiny_model_dir, "--teacher", tiny_model_dir,
            "--out", out,
        ),
        "coreml": ("converters.coreml", "--model", tiny_model_dir, "--out", out),
        "coreai": ("converters.coreai", "--model", tiny_model_dir, "--out", out),
    }[stage]  # fmt: skip
    with output_lock(out):
        err = one_line_error(run_cli(*args))
    assert "another afm_mlx process" in err and str(out) in err
    assert not out.exists()


def test_checkpoints_are_found_by_listing_never_by_following_latest(tmp_path):
    from afm_mlx.training.checkpoint import STATE_FILE, latest_checkpoint

    root = tmp_path / "checkpoints"
    for step in (10, 20):
        (root / f"step-{step:07d}").mkdir(parents=True)
        (root / f"step-{step:07d}" / STATE_FILE).write_text("{}")
    (root / ".tmp-123-step-0000030").mkdir()  # a checkpoint being written when killed
    (root / "latest").write_text("step-0000010\n")  # stale: killed before it was repointed
    assert latest_checkpoint(tmp_path) == root / "step-0000020"
    outside = tmp_path / "elsewhere"
    (outside / STATE_FILE).parent.mkdir()
    (outside / STATE_FILE).write_text("{}")
    (root / "latest").write_text("../elsewhere\n")  # never joined into a path
    assert latest_checkpoint(tmp_path) == root / "step-0000020"


def test_rewriting_a_checkpoint_keeps_a_complete_one_at_every_moment(tmp_path, monkeypatch):
    import mlx.optimizers as optim

    from afm_mlx.training import checkpoint

    opt = optim.SGD(0.1)
    opt.init({"w": mx.zeros(2)})

    def weights(value):
        return lambda d: (d / "w.txt").write_text(value)

    checkpoint.write_checkpoint(tmp_path, 5, weights("first"), opt, {"epoch": 0})
    seen = []
    real_rmtree = shutil.rmtree

    def spy(path, *a, **k):  # whenever something is deleted, step-5 is there and complete
        seen.append((tmp_path / "checkpoints/step-0000005/w.txt").read_text())
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", spy)
    checkpoint.write_checkpoint(tmp_path, 5, weights("second"), opt, {"epoch": 0})
    assert seen[-1] == "second"  # the old copy is deleted only after the new one is in place
    assert (tmp_path / "checkpoints/step-0000005/w.txt").read_text() == "second"


def test_model_save_interrupted_over_an_old_model_is_refused_not_mixed(tiny_model_dir, tmp_path):
    from afm_mlx.models import files
    from afm_mlx.models.files import save_model
    from afm_mlx.models.io import load_model

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    model, config, _ = load_model(folder)

    def killed(*a, **k):
        raise KeyboardInterrupt  # stands for a kill after the old config was dropped

    real = files.atomic_save_safetensors
    files.atomic_save_safetensors = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            save_model(folder, model, config, tiny_model_dir)
    finally:
        files.atomic_save_safetensors = real
    with pytest.raises(UserError, match="config.json"):
        load_model(folder)


def test_tokenizer_temporary_names_cannot_collide(tmp_path):
    # A leftover of the old fixed temporary name (or of another writer) must not break a save.
    from afm_mlx.data.corpus import read_corpus
    from afm_mlx.data.tokenizer import TextTokenizer, save_tokenizer, train_sentencepiece

    out = tmp_path / "tok"
    (out / ".tmp-tokenizer.model").mkdir(parents=True)
    proto = train_sentencepiece(read_corpus("shakespeare")[:2], 512)
    save_tokenizer(proto, out)
    assert (out / "tokenizer.model").read_bytes() == proto
    assert TextTokenizer(out).vocab_size == 512


def test_tokenizer_cli_output_is_staged_and_never_overwritten(tiny_corpus, tmp_path):
    out = tmp_path / "tok"
    proc = run_cli("afm_mlx.tokenizer", "--data", tiny_corpus, "--out", out, "--vocab-size", "512")
    assert proc.returncode == 0, proc.stderr[-2000:]
    before = (out / "tokenizer.json").read_bytes()
    err = one_line_error(
        run_cli("afm_mlx.tokenizer", "--data", tiny_corpus, "--out", out, "--vocab-size", "600")
    )
    assert "not an empty folder" in err and (out / "tokenizer.json").read_bytes() == before
