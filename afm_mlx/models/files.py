"""A checkpoint folder on disk: which files hold the weights, and writing one (``save_model``:
safetensors, sharded with an index when large, tokenizer files, ``config.json`` last)."""

from __future__ import annotations

import copy
import glob
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from afm_mlx.core.fileio import (
    atomic_copy,
    atomic_save_safetensors,
    atomic_write_json,
    read_json,
)

MAX_SHARD_BYTES = 5 * 1024**3
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "weight index").get("weight_map", {})
        return [path / f for f in sorted(set(weight_map.values()))]
    return [Path(f) for f in sorted(glob.glob(str(path / "model*.safetensors")))]


def save_model(
    out_dir: str | Path,
    model: nn.Module,
    config: dict[str, Any],
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write safetensors (+ index when sharded) + tokenizer files + ``config.json``, each atomically.

    ``config.json`` is what makes a folder a model (``load_model`` refuses one without it), so it
    is removed first when the folder held a model and written last: a process killed mid-save
    leaves a folder that is refused, never one that mixes old and new weights. Stages that write
    a new model folder build it beside the target and rename it (``afm_mlx.core.fileio.staged_dir``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").unlink(missing_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for name in sorted(weights):
        nbytes = weights[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = weights[name]
        size += nbytes
    n = len(shards)
    names = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    # Remove stale weights from an earlier save with a different sharding.
    for old in weight_files(out):
        if old.name not in names:
            old.unlink(missing_ok=True)
    for shard, name in zip(shards, names):
        atomic_save_safetensors(out / name, shard, metadata={"format": "mlx"})
    index = out / "model.safetensors.index.json"
    if n > 1:
        weight_map = {k: name for shard, name in zip(shards, names) for k in shard}
        total = sum(v.nbytes for v in weights.values())
        atomic_write_json(index, {"metadata": {"total_size": total}, "weight_map": weight_map})
    else:
        index.unlink(missing_ok=True)
    floats = [v.dtype for v in weights.values() if mx.issubdtype(v.dtype, mx.floating)]
    dtype = max(set(floats), key=floats.count) if floats else mx.float32
    saved = copy.deepcopy(config)
    saved["torch_dtype"] = str(dtype).split(".")[-1]
    if tokenizer_dir is not None and Path(tokenizer_dir).resolve() != out.resolve():
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file():
                atomic_copy(src, out / name)
    atomic_write_json(out / "config.json", saved)  # last: the folder is a model from here on
    return out
