"""Training: resume equivalence, crash safety, distillation maths, the CLI and its bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
import yaml
from conftest import REPO, one_line_error, run_cli
from mlx.utils import tree_flatten

from afm_mlx.models.io import load, load_model
from afm_mlx.models.presets import build_model, init_weights, preset_config
from afm_mlx.train import TrainConfig, train
from afm_mlx.training.checkpoint import latest_checkpoint, load_checkpoint
from afm_mlx.training.loop import Trainer
from afm_mlx.training.losses import distillation_loss, make_loss


def _cfg(tmp_path, tiny_corpus, tiny_tokenizer, name, **kw) -> TrainConfig:
    base = dict(
        preset="tiny",
        data=str(tiny_corpus),
        tokenizer=str(tiny_tokenizer),
        out=str(tmp_path / name),
        max_steps=8,
        batch_size=4,
        seq_len=32,
        warmup_steps=2,
        eval_every=4,
        eval_batches=2,
        save_every=4,
        log_every=2,
        sample_tokens=0,
        progress=False,
    )
    return TrainConfig(**{**base, **kw})


def _params(path) -> dict[str, np.ndarray]:
    model, _, _ = load_model(path)
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


class _Killed(Exception):
    pass


def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(
    tmp_path, tiny_corpus, tiny_tokenizer
):
    straight = train(_cfg(tmp_path, tiny_corpus, tiny_tokenizer, "straight"))

    def die_between_checkpoints(step):
        if step == 6:  # the step-4 checkpoint exists; step 5-6 work is lost, as in a crash
            raise _Killed

    cfg = _cfg(tmp_path, tiny_corpus, tiny_tokenizer, "resumed")
    with pytest.raises(_Killed):
        train(cfg, on_step=die_between_checkpoints)
    assert latest_checkpoint(cfg.out).name == "step-0000004"
    train(dataclasses.replace(cfg, resume=True))
    a, b = _params(straight), _params(cfg.out)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)
    # The run really trained: parameters moved away from the shared initialization.
    assert any(
        np.abs(a[k] - _params(latest_checkpoint(cfg.out).parent / "step-0000004")[k]).max() > 1e-4
        for k in a
    )
    logged = [
        json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()
    ]
    steps = [r["step"] for r in logged if "loss" in r]
    assert steps == sorted(set(steps)) == [2, 4, 6, 8]  # nothing logged twice across the restart
    _, _, state, opt = load_checkpoint(latest_checkpoint(cfg.out))
    assert state["step"] == 8 and int(opt["states.0.step"].item()) == 8


_WRITER = r"""
import sys, mlx.core as mx, mlx.optimizers as optim
from afm_mlx.training.checkpoint import save_checkpoint
from afm_mlx.models.presets import build_model, preset_config
config = preset_config("tiny", vocab_size=100_000, hidden_size=256, head_dim=64)
model = build_model(config); mx.eval(model.parameters())
opt = optim.AdamW(1e-3); opt.init(model.trainable_parameters())
step = 1
while True:
    save_checkpoint(sys.argv[1], step, model, config, opt, {"epoch": 0, "index": step}, None)
    print("saved", step, flush=True)
    step += 1
"""


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(run)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout.readline().startswith("saved 1")
        deadline = time.time() + 60
        while not list((run / "checkpoints").glob(".tmp-*")) and time.time() < deadline:
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert list((run / "checkpoints").glob(".tmp-*")), "the kill did not land mid-write"
    ckpt = latest_checkpoint(run)
    model, config, state, opt = load_checkpoint(ckpt)
    assert state["step"] == int(ckpt.name.split("-")[1]) and config["vocab_size"] == 100_000
    assert "states" not in opt and "m" in "".join(opt)  # AdamW moments are there


def test_distillation_losses_match_numpy(tiny_model_dir):
    teacher, _, _ = load_model(tiny_model_dir)
    student = build_model(preset_config("tiny"))
    init_weights(student, preset_config("tiny"), seed=7)
    x = mx.array(np.random.default_rng(0).integers(0, 512, (2, 12)))
    y = mx.array(np.random.default_rng(1).integers(0, 512, (2, 12)))
    s = np.array(student(x), dtype=np.float64)
    t = np.array(teacher(x), dtype=np.float64)

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    ls = log_softmax(s)
    take = lambda lp, ids: np.take_along_axis(lp, ids[..., None], -1)[..., 0]  # noqa: E731
    label = -take(ls, np.array(y))
    top1 = -take(ls, t.argmax(-1))
    expected_top1 = np.mean(0.1 * label + 0.9 * top1)
    got = make_loss(teacher, "top1", 0.9)(student, x, y).item()
    assert got == pytest.approx(expected_top1, rel=1e-5)
    T = 2.0
    pt, lt, lsT = np.exp(log_softmax(t / T)), log_softmax(t / T), log_softmax(s / T)
    kl = T * T * np.sum(pt * (lt - lsT), -1)
    expected_kl = np.mean(0.5 * label + 0.5 * kl)
    assert make_loss(teacher, "kl", 0.5, T)(student, x, y).item() == pytest.approx(
        expected_kl, rel=1e-5
    )
    assert make_loss()(student, x, y).item() == pytest.approx(label.mean(), rel=1e-5)
    # The gradient with respect to the student's logits (the KL's is a custom VJP), for each
    # mix, a term of weight 0 left out: mean of (1 - w)(q - onehot) + w T (q_T - p_T).
    z, tz = mx.array(s.astype(np.float32)), mx.array(t.astype(np.float32))
    q, qT = np.exp(ls), np.exp(lsT)
    onehot = np.eye(s.shape[-1])[np.array(y)]
    for w in (0.0, 0.5, 1.0):
        loss = distillation_loss("kl", w, T)
        got = np.array(mx.grad(lambda z, loss=loss: loss(lambda _: z, x, y, tz))(z))
        want = ((1 - w) * (q - onehot) + w * T * (qT - pt)) / label.size
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())


def test_gradient_accumulation_equals_one_big_batch(tiny_model_dir):
    batch = np.random.default_rng(0).integers(0, 512, (4, 17)).astype(np.int32)
    results = []
    for accum, micro in ((1, [batch]), (2, [batch[:2], batch[2:]])):
        model, _, _ = load_model(tiny_model_dir)
        model.train()
        # Plain SGD shows the accumulated gradient itself (Adam's 1/|g| would amplify rounding).
        opt = optim.SGD(learning_rate=0.5)
        opt.init(model.trainable_parameters())
        trainer = Trainer(model, opt, make_loss(), accum, 1.0)
        loss, _ = trainer.step(micro)
        mx.eval(model.parameters())
        results.append((loss.item(), dict(tree_flatten(model.parameters()))))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    start = dict(tree_flatten(load_model(tiny_model_dir)[0].parameters()))
    moved = max(np.abs(np.array(v) - np.array(start[k])).max() for k, v in results[0][1].items())
    assert moved > 1e-3
    for k, v in results[0][1].items():
        np.testing.assert_allclose(np.array(v), np.array(results[1][1][k]), atol=1e-6, err_msg=k)


def test_distillation_training_reduces_the_loss(
    tmp_path, tiny_corpus, tiny_tokenizer, tiny_model_dir
):
    cfg = _cfg(
        tmp_path,
        tiny_corpus,
        tiny_tokenizer,
        "distill",
        teacher=str(tiny_model_dir),
        max_steps=12,
        learning_rate=1e-2,
        eval_every=100,
        save_every=100,
    )
    out = train(cfg)
    losses = [
        r["loss"]
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if "loss" in r
    ]
    assert losses[-1] < losses[0] - 0.3


def test_default_cli_run_learns_and_writes_a_model_that_generates(tmp_path):
    """`python -m afm_mlx.train` with its defaults (small preset, Shakespeare), fewer steps and
    validation batches (each default evaluation, 20 batches, takes ~20 s here)."""
    out = tmp_path / "run"
    proc = run_cli(
        "afm_mlx.train",
        "--out",
        out,
        "--max-steps",
        "12",
        "--eval-every",
        "6",
        "--eval-batches",
        "4",
        "--sample-tokens",
        "12",
        "--no-progress",
        "--log-every",
        "4",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GFLOP/s" in proc.stdout and f"model saved to {out}" in proc.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if "loss" in r]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert train_losses[-1] < train_losses[0] - 1.0 and val[-1] < val[0]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert latest_checkpoint(out).name == "step-0000012"
    from mlx_lm import generate

    model, tokenizer = load(out)
    text = generate(model, tokenizer, "ROMEO.\n", max_tokens=12)
    assert len(tokenizer.encode(text)) >= 6
    assert "sample: 'ROMEO.\\n" in proc.stdout


def test_output_folder_holding_another_run_is_refused_untouched(
    tmp_path, tiny_corpus, tiny_tokenizer
):
    cfg = _cfg(tmp_path, tiny_corpus, tiny_tokenizer, "run", max_steps=2, save_every=2)
    out = train(cfg)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (tmp_path / "same.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    same = ["--config", tmp_path / "same.yaml"]
    assert "already holds a training run" in one_line_error(run_cli("afm_mlx.train", *same))
    line = one_line_error(run_cli("afm_mlx.train", *same, "--seq-len", "64", "--resume"))
    assert "holds a different run (seq_len: 32 -> 64)" in line
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert before == after
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    line = one_line_error(run_cli("afm_mlx.train", *same, "--out", tmp_path / "other"))
    assert "not empty" in line and (tmp_path / "other" / "notes.txt").read_text() == "mine"


@pytest.fixture
def broken_inits(tmp_path, tiny_model_dir):
    import shutil

    heads = tmp_path / "heads"
    shutil.copytree(tiny_model_dir, heads)
    config = json.loads((heads / "config.json").read_text())
    config["num_key_value_heads"] = 3
    (heads / "config.json").write_text(json.dumps(config))
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_model_dir, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:-1000])
    return {"heads": heads, "truncated": truncated}


@pytest.mark.parametrize(
    "args, match",
    [
        (["--data", "{tmp}/nothing-here"], "--data {tmp}/nothing-here: no such file or folder"),
        (["--data", "{tmp}/empty.txt"], "corpus is empty"),
        (["--config", "{tmp}/bad_preset.yaml"], "--preset 'huge' is not valid"),
        (["--config", "{tmp}/unknown.yaml"], "unknown option(s) learning_rat"),
        (["--init", "{heads}"], "must be a multiple of num_key_value_heads"),
        (["--init", "{truncated}"], "truncated"),
        (["--teacher", "{truncated}"], "truncated"),
        (["--max-steps", "0"], "--max-steps must be positive"),
        (["--resume"], "holds no run to resume"),
    ],
)
def test_cli_bad_input_is_one_clear_line(
    tmp_path, tiny_corpus, tiny_tokenizer, broken_inits, args, match
):
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / "bad_preset.yaml").write_text("preset: huge\n")
    (tmp_path / "unknown.yaml").write_text("learning_rat: 0.1\n")
    fmt = dict(tmp=tmp_path, **broken_inits)
    args = [a.format(**fmt) for a in args]
    base = [
        "--out",
        str(tmp_path / "out"),
        "--tokenizer",
        str(tiny_tokenizer),
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--max-steps",
        "2",
    ]
    if "--config" not in args:  # flags override the YAML file, so leave the preset to it
        base += ["--preset", "tiny"]
    if "--data" not in args:
        base += ["--data", str(tiny_corpus)]
    line = one_line_error(run_cli("afm_mlx.train", *base, *args))
    assert match.format(**fmt) in line


def test_fused_cross_entropy_matches_autodiff_reference():
    from afm_mlx.training.losses import token_nll

    rng = np.random.default_rng(0)
    logits = mx.array(rng.normal(size=(3, 5, 50)).astype(np.float32) * 3)
    targets = mx.array(rng.integers(0, 50, (3, 5)).astype(np.int32))
    weights = mx.array(rng.random((3, 5)).astype(np.float32))

    def ours(x):
        return mx.sum(token_nll(x, targets) * weights)

    def reference(x):
        return mx.sum(nn.losses.cross_entropy(x, targets) * weights)

    np.testing.assert_allclose(ours(logits).item(), reference(logits).item(), rtol=1e-6)
    np.testing.assert_allclose(
        np.array(mx.grad(ours)(logits)), np.array(mx.grad(reference)(logits)), atol=1e-6
    )
    compiled = mx.compile(mx.grad(ours))
    np.testing.assert_allclose(
        np.array(compiled(logits)), np.array(mx.grad(reference)(logits)), atol=1e-6
    )
