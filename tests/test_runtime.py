"""The Linux fast path: CLIs pick up OpenBLAS by themselves, or say how to get it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

from afm_mlx.core.blas import find_openblas

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux BLAS path")


def _run(**env_changes) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "AFM_MLX_BLAS_REEXEC")}
    env.update(env_changes, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "afm_mlx.runtime"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=REPO,
    )


@linux_only
@pytest.mark.skipif(find_openblas() is None, reason="OpenBLAS not installed (scripts/setup.sh)")
def test_cli_preloads_openblas_without_ld_preload():
    proc = _run()
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"\(OpenBLAS\): fp32 matmul (\d+) GFLOP/s", proc.stdout)
    assert match, proc.stdout
    # The reference BLAS manages ~6-8 GFLOP/s on this class of machine; OpenBLAS far more.
    assert int(match.group(1)) > 25
    assert "reference BLAS" not in proc.stderr


@linux_only
def test_missing_openblas_gives_a_one_time_hint():
    proc = _run(AFM_MLX_BLAS="/nonexistent/libblas.so.3")
    assert proc.returncode == 0, proc.stderr
    assert "reference BLAS (slow)" in proc.stdout
    assert proc.stderr.count("apt-get install libopenblas0-pthread") == 1
