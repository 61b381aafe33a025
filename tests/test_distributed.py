"""Data parallelism on MLX's own distributed layer: ``mlx.launch -n 2 --backend ring`` on localhost.

Two ranks with a global batch give the same parameters as one process with that batch (train and
a recovery adapter); a 2-rank checkpoint resumes on 1 rank to the same end; ranks that disagree
stop at once with one line each. Slow marker: every case launches several processes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import REPO

pytestmark = pytest.mark.slow

LAUNCH = shutil.which("mlx.launch")
if LAUNCH is None or not mx.distributed.is_available():
    pytest.skip("mlx.launch / MLX distributed not available", allow_module_level=True)

COMMON = [
    "--batch-size", "4", "--seq-len", "32", "--eval-every", "3", "--eval-batches", "2",
    "--save-every", "3", "--log-every", "1", "--no-progress", "--max-steps", "6",
    "--keep-checkpoints", "5",
]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def run_ranks(n: int, module: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    """``mlx.launch -n N --backend ring -- python -m module args`` (N = 1: a plain process)."""
    cmd = [sys.executable, "-m", module, *map(str, args)]
    if n > 1:
        cmd = [LAUNCH, "-n", str(n), "--backend", "ring", "--", *cmd]
    return subprocess.run(
        cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def assert_same(a: Path, b: Path, atol: float = 1e-5) -> None:
    x, y = mx.load(str(a)), mx.load(str(b))
    assert sorted(x) == sorted(y)
    for k in x:
        np.testing.assert_allclose(np.array(x[k]), np.array(y[k]), rtol=0, atol=atol, err_msg=k)


@pytest.fixture(scope="module")
def runs(tiny_corpus, tiny_tokenizer, tmp_path_factory):
    """The same training run with 1 process and with 2 ranks."""
    root = tmp_path_factory.mktemp("dp")
    args = ["--preset", "tiny", "--data", tiny_corpus, "--tokenizer", tiny_tokenizer, *COMMON]
    args += ["--sample-tokens", "0"]
    one = run_ranks(1, "afm_mlx.train", *args, "--out", root / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_ranks(2, "afm_mlx.train", *args, "--out", root / "two")
    assert two.returncode == 0 and (root / "two/model.safetensors").is_file(), two.stderr[-3000:]
    return root, args, two


def test_two_ranks_train_as_one_process(runs):
    root, _, two = runs
    assert "data parallel over 2 ranks, 2 sequences per rank per step" in two.stdout
    assert two.stdout.count("model saved to") == 1  # rank 0 alone writes and reports
    assert_same(root / "one/model.safetensors", root / "two/model.safetensors")
    import json

    assert json.loads((root / "two/run.json").read_text())["world_size"] == 2
    assert (root / "two/checkpoints/step-0000003").is_dir()


def test_two_rank_checkpoint_resumes_on_one_rank(runs, tmp_path):
    root, args, _ = runs
    mixed = tmp_path / "mixed"
    two = run_ranks(2, "afm_mlx.train", *args, "--out", mixed)
    assert two.returncode == 0, two.stderr[-3000:]
    shutil.rmtree(mixed / "checkpoints/step-0000006")  # as if stopped after step 3
    resumed = run_ranks(1, "afm_mlx.train", *args, "--out", mixed, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "step-0000003" in resumed.stdout
    assert_same(root / "one/model.safetensors", mixed / "model.safetensors")


def test_two_rank_recovery_adapter_equals_one(tiny_model_dir, tiny_corpus, tmp_path):
    pal = tmp_path / "pal"
    proc = run_ranks(1, "afm_mlx.palettize", "--model", tiny_model_dir, "--out", pal, "--bits", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    args = ["--model", pal, "--teacher", tiny_model_dir, "--data", tiny_corpus, "--rank", "4"]
    args += COMMON
    one = run_ranks(1, "afm_mlx.recover", *args, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_ranks(2, "afm_mlx.recover", *args, "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "data parallel over 2 ranks" in two.stdout
    assert_same(tmp_path / "one/adapters.safetensors", tmp_path / "two/adapters.safetensors")


def test_disagreeing_ranks_stop_with_one_line_each(tiny_corpus, tiny_tokenizer, tmp_path):
    # Rank 1 is started with another --seq-len (mlx.launch's ring backend sets MLX_RANK).
    script = tmp_path / "rank.sh"
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$MLX_RANK" = "1" ]; then LEN=16; else LEN=32; fi\n'
        f"exec {sys.executable} -m afm_mlx.train --preset tiny --data {tiny_corpus} "
        f"--tokenizer {tiny_tokenizer} --batch-size 4 --max-steps 2 --sample-tokens 0 "
        f"--no-progress --out {tmp_path / 'run'} --seq-len $LEN\n"
    )
    script.chmod(0o755)
    start = time.perf_counter()
    proc = subprocess.run(
        [LAUNCH, "-n", "2", "--backend", "ring", "--", str(script)],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert sorted(errors) == [
        f"error: rank {r} of 2: the ranks do not agree on the configuration; start every rank "
        "with the same flags, data and model"
        for r in (0, 1)
    ], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing written
    assert elapsed < 60


def test_global_batch_must_split_over_the_ranks(tiny_corpus, tiny_tokenizer, tmp_path):
    proc = run_ranks(
        2, "afm_mlx.train", "--preset", "tiny", "--data", tiny_corpus, "--tokenizer",
        tiny_tokenizer, "--batch-size", "3", "--out", tmp_path / "run",
    )  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and all("divide evenly over the 2 ranks" in e for e in errors)


# --- memory planning ---------------------------------------------------------------------------


def _gb(text: str, pattern: str) -> float:
    import re

    found = re.search(pattern + r"\s+([0-9.]+) GB", text)
    assert found, text[-2000:]
    return float(found.group(1))


def test_dry_run_estimate_and_grad_checkpoint(tiny_corpus, tiny_tokenizer, tmp_path):
    """``--dry-run`` allocates nothing and prints the plan (afm-3b); for ``small`` its estimate is
    within 25% of the measured peak, and ``--grad-checkpoint`` lowers the measured peak."""
    big = run_ranks(1, "afm_mlx.train", "--preset", "afm-3b", "--dry-run", "--out", tmp_path / "x")
    assert big.returncode == 0, big.stderr[-2000:]
    assert "2.768B parameters" in big.stdout and "optimizer" in big.stdout
    assert not (tmp_path / "x").exists()  # a dry run writes nothing
    args = [
        "--preset", "small", "--data", tiny_corpus, "--tokenizer", tiny_tokenizer,
        "--batch-size", "16", "--seq-len", "128", "--max-steps", "2", "--eval-batches", "1",
        "--save-every", "1000", "--sample-tokens", "0", "--no-progress",
    ]  # fmt: skip
    peaks, estimates = {}, {}
    for gc in ("--no-grad-checkpoint", "--grad-checkpoint"):
        plan = run_ranks(1, "afm_mlx.train", *args, gc, "--dry-run", "--out", tmp_path / gc)
        assert plan.returncode == 0, plan.stderr[-2000:]
        estimates[gc] = _gb(plan.stdout, "total")
        run = run_ranks(1, "afm_mlx.train", *args, gc, "--out", tmp_path / gc)
        assert run.returncode == 0, run.stderr[-2000:]
        peaks[gc] = _gb(run.stdout, "peak memory of the training steps:")
        assert abs(estimates[gc] / peaks[gc] - 1) < 0.25, (gc, estimates[gc], peaks[gc])
    print(f"\nmemory: estimate/measured {estimates} / {peaks}")
    assert peaks["--grad-checkpoint"] < 0.8 * peaks["--no-grad-checkpoint"]
