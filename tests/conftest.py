"""Shared fixtures: a small real corpus, a tiny trained tokenizer, a tiny random AFM model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from afm_mlx.core.blas import preload_openblas

# Must run before anything imports mlx: in-process tests then use OpenBLAS, like the CLIs.
preload_openblas()

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Token caches go to a per-session folder, never the user's ~/.cache."""
    os.environ["AFM_MLX_CACHE"] = str(tmp_path_factory.mktemp("afm_cache"))


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """Twelve documents cut from the embedded Shakespeare corpus (~25 KB each)."""
    from afm_mlx.data.corpus import read_corpus

    folder = tmp_path_factory.mktemp("corpus")
    for i, doc in enumerate(read_corpus("shakespeare")[:12]):
        (folder / f"play{i:02d}.txt").write_text(doc[:25_000])
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_corpus, tmp_path_factory) -> Path:
    from afm_mlx.data.corpus import read_corpus
    from afm_mlx.data.tokenizer import save_tokenizer, train_sentencepiece

    out = tmp_path_factory.mktemp("tokenizer")
    return save_tokenizer(train_sentencepiece(read_corpus(str(tiny_corpus)), 512), out)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    """A saved random-weight ``tiny`` preset checkpoint with its tokenizer."""
    from afm_mlx.models.io import save_model
    from afm_mlx.models.presets import build_model, init_weights, preset_config

    config = preset_config("tiny")
    model = build_model(config)
    init_weights(model, config, seed=1)
    return save_model(tmp_path_factory.mktemp("tiny_model"), model, config, tiny_tokenizer)


def run_cli(module: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` in a fresh process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """Assert a clean user error (exit 2, one stderr line, no traceback) and return it."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]
