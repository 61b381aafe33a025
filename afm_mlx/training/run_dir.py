"""The rules for a run folder: never clobber another run, resume only what matches, one
writer at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from afm_mlx.core.errors import UserError
from afm_mlx.core.fileio import output_lock, read_json
from afm_mlx.training.checkpoint import latest_checkpoint
from afm_mlx.training.world import World

RUN_FILE = "run.json"
# Options that may change when a run is resumed; every other option must match the original.
RESUMABLE_CHANGES = {
    "resume",
    "max_steps",
    "eval_every",
    "save_every",
    "eval_batches",
    "sample_tokens",
    "sample_prompt",
    "log_every",
    "keep_checkpoints",
    "progress",
    "grad_checkpoint",
    "blockwise",
    "dry_run",
}


@contextmanager
def locked_run(cfg: Any, world: World | None = None) -> Iterator[None]:
    """Validate ``cfg`` and hold the lock on its run folder (``cfg.out``) for the block: a second
    process training into the same folder is refused with one line. Of a data-parallel world
    only rank 0 writes, so only rank 0 holds it; the batch must split evenly over the ranks."""
    cfg.validate()
    world = world or World()
    if cfg.batch_size % world.size:
        raise UserError(
            f"--batch-size {cfg.batch_size} is the global batch: it must divide evenly over the "
            f"{world.size} ranks"
        )
    if not world.main:
        yield
        return
    with output_lock(cfg.out):
        yield


def check_run_dir(cfg: Any) -> tuple[Path, Path | None]:
    """Refuse to clobber another run or foreign files; returns (run folder, checkpoint to resume).

    Writes nothing, so a refused start leaves the folder exactly as it was.
    """
    out = Path(cfg.out)
    run_file = out / RUN_FILE
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if run_file.is_file():
        previous = read_json(run_file, "run description").get("config", {})
        current = dataclasses.asdict(cfg)
        diffs = [
            f"{k}: {previous.get(k)!r} -> {v!r}"
            for k, v in current.items()
            if k not in RESUMABLE_CHANGES and previous.get(k) != v
        ]
        if diffs:
            raise UserError(f"--out {out}: holds a different run ({'; '.join(diffs)})")
        ckpt = latest_checkpoint(out)
        if ckpt is not None and not cfg.resume:
            raise UserError(
                f"--out {out}: already holds a training run (at {ckpt.name}); pass --resume to "
                "continue it or choose another --out"
            )
        return out, ckpt
    if cfg.resume:
        raise UserError(f"--resume: {out} holds no run to resume")
    if out.exists() and any(out.iterdir()):
        raise UserError(
            f"--out {out}: folder is not empty and holds no afm_mlx run; choose another"
        )
    return out, None
