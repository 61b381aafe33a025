"""Recovery and task adapters: KD loss goes down, resume is exact, task adapters start at the
recovery weights, and bad input is one clear line with nothing overwritten."""

from __future__ import annotations

import dataclasses
import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import one_line_error, run_cli

from afm_mlx.adapters.lora import adapters_disabled, load_adapter
from afm_mlx.data.batches import DataPosition, train_batches
from afm_mlx.data.tasks import task_datasets
from afm_mlx.finetune import FinetuneConfig, finetune
from afm_mlx.models.io import load_base
from afm_mlx.recover import RecoverConfig, recover
from afm_mlx.training.losses import masked_nll

SMALL = dict(
    learning_rate=2e-3,  # a tiny model and few steps: faster than the default
    batch_size=4,
    seq_len=32,
    warmup_steps=2,
    eval_every=100,
    eval_batches=4,
    log_every=1,
    progress=False,
)


@pytest.fixture(scope="module")
def teacher_dir(tiny_corpus, tiny_tokenizer, tmp_path_factory):
    """A briefly trained tiny model: a random one predicts ~uniformly, leaving nothing to distil."""
    from afm_mlx.train import TrainConfig, train

    out = tmp_path_factory.mktemp("teacher") / "fp"
    cfg = TrainConfig(
        preset="tiny",
        data=str(tiny_corpus),
        tokenizer=str(tiny_tokenizer),
        out=str(out),
        max_steps=120,
        batch_size=8,
        seq_len=64,
        learning_rate=1e-2,
        eval_every=1000,
        save_every=1000,
        sample_tokens=0,
        progress=False,
    )
    return train(cfg)


@pytest.fixture(scope="module")
def q2_model_dir(teacher_dir, tmp_path_factory):
    """The teacher compressed hard (mlx-lm affine 2-bit), so there is a gap to recover."""
    from mlx_lm import convert

    out = tmp_path_factory.mktemp("q2") / "model"
    convert(str(teacher_dir), str(out), quantize=True, q_group_size=32, q_bits=2)
    return out


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("task") / "task.jsonl"
    lines = []
    for i in range(40):
        lines.append({"prompt": f"Count {i}:", "completion": f" {i + 1} {i + 2}"})
        lines.append(
            {
                "messages": [
                    {"role": "user", "content": f"Echo {i}"},
                    {"role": "assistant", "content": f"{i}"},
                ]
            }
        )
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return path


def _recover_cfg(tmp_path, q2, fp, corpus, name, **kw):
    return RecoverConfig(
        model=str(q2),
        teacher=str(fp),
        data=str(corpus),
        out=str(tmp_path / name),
        rank=8,
        **{**SMALL, **kw},
    )


@pytest.fixture(scope="module")
def recovery_adapter(q2_model_dir, teacher_dir, tiny_corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recovery")
    cfg = _recover_cfg(tmp, q2_model_dir, teacher_dir, tiny_corpus, "rec", max_steps=30)
    report = recover(cfg)
    return cfg.out, report


def test_recovery_reduces_the_distillation_loss(recovery_adapter):
    out, report = recovery_adapter
    history = [r["loss"] for r in map(json.loads, open(f"{out}/metrics.jsonl")) if "loss" in r]
    assert np.mean(history[-10:]) < 0.9 * np.mean(history[:10])  # KL to the teacher, training data
    assert report["teacher"] < report["adapter"] < report["base"]  # held-out, toward the teacher
    assert report["gap_closed"] > 0.2
    config = json.loads(open(f"{out}/adapter_config.json").read())
    assert config["kind"] == "recovery" and config["lora_parameters"]["rank"] == 8


def test_a_half_precision_teacher_runs_block_by_block_as_its_float32_copy(
    q2_model_dir, teacher_dir, tiny_corpus, tmp_path, monkeypatch
):
    """A bfloat16 teacher on the CPU is not widened whole (a float32 copy of Llama-3.2-1B is
    4.9 GB): its logits are computed before each step one block at a time
    (``streamed_logits``). The recovery is the one its float32 copy gives."""
    import afm_mlx.recover as stage
    from afm_mlx.models.files import save_model
    from afm_mlx.models.io import load_model

    teacher, config, _ = load_model(teacher_dir)
    teacher.set_dtype(mx.bfloat16)
    half = save_model(tmp_path / "bf16", teacher, config, teacher_dir)
    teacher.set_dtype(mx.float32)  # exact: the float32 copy of the bfloat16 teacher
    full = save_model(tmp_path / "f32", teacher, config, teacher_dir)
    streamed, real = [], stage.streamed_logits

    def counting(*args, tables=(None, None)):
        assert all(t is not None for t in tables)  # the teacher's tables are read from its folder
        streamed.append(args[-1].shape)
        return real(*args, tables=tables)

    monkeypatch.setattr(stage, "streamed_logits", counting)
    runs = []
    for name, fp in (("half", half), ("full", full)):
        cfg = _recover_cfg(tmp_path, q2_model_dir, fp, tiny_corpus, name, max_steps=4)
        report = recover(cfg)
        losses = [
            r["loss"] for r in map(json.loads, open(f"{cfg.out}/metrics.jsonl")) if "loss" in r
        ]
        runs.append((report, losses))
        if name == "half":
            assert (4, 32) in streamed  # each training micro-batch, then the held-out batches
            count = len(streamed)
    assert len(streamed) == count  # the float32 teacher ran inside the compiled step
    (r1, l1), (r2, l2) = runs
    np.testing.assert_allclose(l1, l2, rtol=1e-4)
    assert r1["teacher"] == pytest.approx(r2["teacher"], rel=1e-5)
    assert r1["adapter"] == pytest.approx(r2["adapter"], rel=1e-4)


class _Killed(Exception):
    pass


def test_resumed_recovery_equals_an_uninterrupted_one(
    q2_model_dir, teacher_dir, tiny_corpus, tmp_path
):
    make = lambda name: _recover_cfg(  # noqa: E731
        tmp_path, q2_model_dir, teacher_dir, tiny_corpus, name, max_steps=6, save_every=3
    )
    recover(make("straight"))

    def die(step):  # killed after logging step 4, one step past the step-3 checkpoint
        if step == 4:
            raise _Killed

    cfg = make("resumed")
    with pytest.raises(_Killed):
        recover(cfg, on_step=die)
    recover(dataclasses.replace(cfg, resume=True))
    a = mx.load(f"{tmp_path}/straight/checkpoints/step-0000006/adapters.safetensors")
    b = mx.load(f"{tmp_path}/resumed/checkpoints/step-0000006/adapters.safetensors")
    assert a.keys() == b.keys() and a["model.layers.0.mlp.up_proj.lora_b"].dtype == mx.float32
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), rtol=1e-5, atol=1e-7, err_msg=k)
    assert any(np.abs(np.array(a[k])).max() > 0 for k in a if k.endswith("lora_b"))
    # The log of the resumed run reads as one run: lines logged after the step-3 checkpoint by
    # the killed process are dropped, none is doubled.
    logs = {
        name: [
            (r["step"], r.get("loss", r.get("val_loss")))
            for r in map(json.loads, open(f"{tmp_path}/{name}/metrics.jsonl"))
        ]
        for name in ("straight", "resumed")
    }
    assert [s for s, _ in logs["resumed"]] == [s for s, _ in logs["straight"]]
    np.testing.assert_allclose(
        [v for _, v in logs["resumed"]], [v for _, v in logs["straight"]], rtol=1e-5
    )


@pytest.mark.parametrize("init", ["recovery", "none"])
def test_task_adapter_starts_exactly_at_its_init(
    init, recovery_adapter, q2_model_dir, task_file, tmp_path
):
    rec_dir, _ = recovery_adapter
    cfg = FinetuneConfig(
        model=str(q2_model_dir),
        init_adapter=rec_dir if init == "recovery" else "none",
        data=str(task_file),
        out=str(tmp_path / "task"),
        max_steps=2,
        **SMALL,
    )
    finetune(cfg)
    first = json.loads(open(f"{cfg.out}/metrics.jsonl").readline())
    assert first["step"] == 1

    # The loss of step 1 is computed before any update: recompute it from the init weights.
    model, tokenizer, _ = load_base(q2_model_dir)
    train, _ = task_datasets(task_file, tokenizer, cfg.seq_len, cfg.valid_fraction, cfg.seed)
    batch, _ = next(train_batches(train, cfg.batch_size, cfg.seed, DataPosition()))
    batch = mx.array(batch)
    load_adapter(model, rec_dir)
    if init == "none":  # mlx-lm's init: B = 0, so the model starts as the bare base
        with adapters_disabled(model):
            expected = masked_nll(model, batch[:, :-1], batch[:, 1:]).item()
    else:
        expected = masked_nll(model, batch[:, :-1], batch[:, 1:]).item()
    assert first["loss"] == pytest.approx(expected, rel=1e-5)
    config = json.loads(open(f"{cfg.out}/adapter_config.json").read())
    assert config["kind"] == "task" and config["lora_parameters"]["rank"] == (
        8 if init == "recovery" else 16
    )


def test_bad_input_is_one_line_and_overwrites_nothing(
    recovery_adapter, q2_model_dir, tiny_model_dir, task_file, tmp_path
):
    rec_dir, _ = recovery_adapter
    err = one_line_error(
        run_cli("afm_mlx.recover", "--model", q2_model_dir, "--out", tmp_path / "r")
    )
    assert "--teacher" in err and not (tmp_path / "r").exists()

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    args = ["--model", q2_model_dir, "--init-adapter", rec_dir, "--max-steps", "2"]
    err = one_line_error(run_cli("afm_mlx.finetune", *args, "--data", bad, "--out", tmp_path / "f"))
    assert f"{bad}:2" in err and not (tmp_path / "f").exists()
    err = one_line_error(run_cli("afm_mlx.finetune", *args, "--data", task_file, "--out", taken))
    assert "not empty" in err and [p.name for p in taken.iterdir()] == ["notes.txt"]
    # A recovery adapter belongs to its compressed base: the fp model is another base.
    err = one_line_error(
        run_cli(
            "afm_mlx.generate", "--model", tiny_model_dir, "--adapter", rec_dir, "--prompt", "Hi"
        )
    )
    assert "trained on base" in err and "fingerprint" in err
    err = one_line_error(
        run_cli("afm_mlx.evaluate", "--model", tiny_model_dir, "--adapter", tmp_path / "nope")
    )
    assert "no such adapter folder" in err


def test_cli_recover_then_evaluate_json(recovery_adapter, q2_model_dir, tiny_corpus):
    rec_dir, report = recovery_adapter
    proc = run_cli(
        "afm_mlx.evaluate",
        "--model",
        q2_model_dir,
        "--adapter",
        rec_dir,
        "--data",
        tiny_corpus,
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--max-batches",
        "4",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout.strip().splitlines()[-1])["results"]
    assert rows[0]["adapter"] is None and rows[1]["adapter"] == str(rec_dir)
    assert rows[0]["perplexity"] == pytest.approx(report["base"], rel=1e-4)
    assert rows[1]["perplexity"] == pytest.approx(report["adapter"], rel=1e-3)


def test_recovery_on_text_sampled_from_the_teacher(q2_model_dir, teacher_dir, tmp_path):
    """``--data teacher``: the teacher's own samples, sized to the run, cached by teacher and
    seed (a second run samples nothing new), deterministic, and the adapter recovers on them."""
    import os

    from afm_mlx.data.corpus import read_corpus
    from afm_mlx.models.io import checkpoint_digest
    from afm_mlx.training.teacher_text import cache_folder

    cfg = _recover_cfg(tmp_path, q2_model_dir, teacher_dir, "teacher", "a", max_steps=30)
    recover(cfg)
    folder = cache_folder(checkpoint_digest(teacher_dir), cfg.seed)
    docs = read_corpus(str(folder))
    assert len(docs) >= 10 and all(d.strip() for d in docs)
    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*.txt")}
    tokens = sum(json.loads(p.read_text())["tokens"] for p in folder.glob("batch-*/meta.json"))
    assert tokens >= 30 * SMALL["batch_size"] * (SMALL["seq_len"] + 1)
    history = [r["loss"] for r in map(json.loads, open(f"{cfg.out}/metrics.jsonl")) if "loss" in r]
    assert np.mean(history[-5:]) < np.mean(history[:5])  # the KL to the teacher, on its text
    # Again, with another --out: nothing is sampled again; a new seed samples other text.
    recover(_recover_cfg(tmp_path, q2_model_dir, teacher_dir, "teacher", "b", max_steps=30))
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*.txt")} == stamps
    other = cache_folder(checkpoint_digest(teacher_dir), cfg.seed + 1)
    assert not other.exists()
    from afm_mlx.models.io import load
    from afm_mlx.training.teacher_text import sample_teacher_text

    teacher, tokenizer = load(teacher_dir)
    sample_teacher_text(teacher, tokenizer, other, 500, seed=cfg.seed + 1, say=lambda *a: None)
    assert read_corpus(str(other))[:4] != docs[:4]
    assert os.environ["AFM_MLX_CACHE"] in str(folder)  # never the user's cache in tests
