"""Resumable training checkpoints: model (HF layout), optimizer state, step and data position.

A checkpoint is a folder ``checkpoints/step-NNNNNNN`` written under a temporary name and renamed
into place when complete, so every ``step-*`` folder is a complete checkpoint and the newest one is
where a run resumes. ``checkpoints/latest`` (replaced atomically) names it for people and tools;
it is never trusted as a path. A process killed at any moment leaves the previous checkpoint
intact and loadable.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from afm_mlx.core.errors import UserError
from afm_mlx.core.fileio import (
    atomic_save_safetensors,
    atomic_write_json,
    atomic_write_text,
    exchange_paths,
    read_json,
)
from afm_mlx.models.files import save_model
from afm_mlx.models.io import load_model

STATE_FILE = "trainer_state.json"
STEP_DIR = re.compile(r"step-\d{7}")
OPTIMIZER_FILE = "optimizer.safetensors"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def write_checkpoint(
    run_dir: str | Path,
    step: int,
    write_weights: Callable[[Path], Any],
    optimizer: optim.Optimizer,
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write ``checkpoints/step-N`` atomically: ``write_weights(folder)`` fills in the weights,
    then the optimizer state and trainer state are added; ``latest`` is repointed, old ones pruned.
    """
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-{os.getpid()}-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_weights(tmp)
    atomic_save_safetensors(tmp / OPTIMIZER_FILE, dict(tree_flatten(optimizer.state)))
    atomic_write_json(tmp / STATE_FILE, {**state, "step": step})
    if final.exists():
        # A step written twice (rare: the newest checkpoint is where a run resumes): swap the new
        # folder in, in one step where the OS can, so that a complete step-N exists throughout.
        if exchange_paths(tmp, final):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            old = root / f".tmp-{os.getpid()}-old-{final.name}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    atomic_write_text(root / "latest", final.name + "\n")
    _prune(root, keep, final.name)
    return final


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    model_config: dict[str, Any],
    optimizer: optim.Optimizer,
    state: dict[str, Any],
    tokenizer_dir: str | Path | None,
    keep: int = 2,
) -> Path:
    """A full-model checkpoint (HF layout, loadable by ``load_model``) for ``step``."""
    return write_checkpoint(
        run_dir,
        step,
        lambda d: save_model(d, model, model_config, tokenizer_dir),
        optimizer,
        state,
        keep,
    )


def _prune(root: Path, keep: int, newest: str) -> None:
    steps = sorted(p for p in root.iterdir() if STEP_DIR.fullmatch(p.name) and p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:
        if old.name != newest:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):  # left by a process killed mid-write
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None.

    Found by listing ``step-NNNNNNN`` folders (each renamed into place only when complete), not by
    following ``latest``: a kill between the rename and the pointer update, or a pointer edited to
    name something else (``../..``), cannot send a resume to the wrong place.
    """
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return None
    steps = sorted(
        p
        for p in root.iterdir()
        if STEP_DIR.fullmatch(p.name) and p.is_dir() and (p / STATE_FILE).is_file()
    )
    return steps[-1] if steps else None


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any], dict[str, Any], dict]:
    """(model, model config, trainer state, flat optimizer state) of a checkpoint folder."""
    path = Path(path)
    model, config, _ = load_model(path)
    state = read_json(path / STATE_FILE, "trainer state")
    opt_file = path / OPTIMIZER_FILE
    if not opt_file.is_file():
        raise UserError(f"{opt_file}: optimizer state missing; the checkpoint is incomplete")
    from afm_mlx.core.fileio import load_safetensors

    return model, config, state, load_safetensors(opt_file)


def restore_optimizer(optimizer: optim.Optimizer, flat_state: dict[str, mx.array]) -> None:
    """Put a saved (flattened) optimizer state back, after ``optimizer.init`` made its shape."""
    restored = tree_unflatten(list(flat_state.items()))
    expected = {k for k, _ in tree_flatten(optimizer.state)}
    if expected != set(flat_state):
        missing = sorted(expected - set(flat_state))[:3]
        raise UserError(f"optimizer state does not match the model (missing e.g. {missing})")
    optimizer.state = restored
