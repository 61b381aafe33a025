"""Shared fixtures: a small real corpus, a tiny trained tokenizer, a tiny random AFM model, and
that model palettized (4-bit as ``palettize --bits 4`` writes it, and with every bit width the
converters carry); helpers to palettize any model and to make an adapter that changes outputs."""

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
    from afm_mlx.models.files import save_model
    from afm_mlx.models.presets import build_model, init_weights, preset_config

    config = preset_config("tiny")
    model = build_model(config)
    init_weights(model, config, seed=1)
    return save_model(tmp_path_factory.mktemp("tiny_model"), model, config, tiny_tokenizer)


def mixed_bits(path: str, module) -> dict | bool:
    """Every bit width the converters must carry, plus column-grouped LUTs and AFM's embedding
    (``palettize_model``'s class predicate)."""
    import mlx.nn as nn

    from afm_mlx.palettization.layers import AFM_EMBEDDING_SETTINGS

    if isinstance(module, nn.Embedding):
        return dict(AFM_EMBEDDING_SETTINGS)
    if path.endswith("down_proj"):
        return {"bits": 2}
    if path == "model.layers.1.self_attn.v_proj":
        return {"bits": 3}
    if path == "model.layers.0.mlp.up_proj":
        return {"bits": 6}
    if path == "model.layers.1.self_attn.o_proj":
        return {"bits": 4, "axis": 1}  # LUTs shared by groups of 16 input columns
    if path == "model.layers.0.self_attn.k_proj":
        return {"bits": 1, "group_size": 32}
    return True  # 4-bit, 16 output channels per LUT


def palettized_copy(source: Path, out: Path, predicate=None, tokenizer: Path | None = None) -> Path:
    """``source`` palettized in process by ``palettize_model`` (``predicate``: its class
    predicate; default: every projection 4-bit, the embedding kept), saved to ``out`` with each
    layer's settings recorded in config.json."""
    from afm_mlx.models.files import save_model
    from afm_mlx.models.io import load_model
    from afm_mlx.palettization.layers import palettize_model

    model, config, _ = load_model(source)
    chosen = palettize_model(model, class_predicate=predicate)
    return save_model(out, model, {**config, "palettization": {"layers": chosen}}, tokenizer)


def adapter_with_updates(
    base_dir: Path, out: Path, seed: int, std: float, rank: int = 4, scale: float = 2.0
) -> Path:
    """A LoRA adapter for ``base_dir`` whose B matrices are random (normal, ``std``), saved to
    ``out``: a fresh adapter's B is zero, a no-op no test of the adapter path could tell apart
    from the base."""
    import mlx.core as mx

    from afm_mlx.adapters.lora import (
        LoRASettings,
        attach_lora,
        lora_layers,
        save_adapter,
        settings_for_model,
    )
    from afm_mlx.models.io import load_model, model_fingerprint

    model, _, _ = load_model(base_dir)
    fingerprint = model_fingerprint(model)
    settings = settings_for_model(LoRASettings(rank=rank, scale=scale), model)
    attach_lora(model, settings, seed=seed)
    key = mx.random.key(seed)
    for _, layer in lora_layers(model):
        key, sub = mx.random.split(key)
        layer.lora_b = std * mx.random.normal(layer.lora_b.shape, key=sub)
    return save_adapter(out, model, settings, fingerprint)


@pytest.fixture(scope="session")
def tiny_lut4_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model as ``palettize --bits 4`` writes it: 4-bit projections (16 rows per LUT),
    an 8-bit embedding. Shared: tests read it, never write into it."""
    from afm_mlx.palettize import PalettizeConfig, palettize

    out = tmp_path_factory.mktemp("tiny_lut4") / "tinypal"
    palettize(PalettizeConfig(model=str(tiny_model_dir), out=str(out), bits=4))
    return out


@pytest.fixture(scope="session")
def tiny_mixed_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model palettized with ``mixed_bits`` (no tokenizer files). Shared: read only."""
    return palettized_copy(tiny_model_dir, tmp_path_factory.mktemp("tiny_mixed"), mixed_bits)


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
