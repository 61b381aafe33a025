"""Atomic file writes and safetensors validation.

Every file afm_mlx writes goes to a temporary name in the same folder and is renamed into place,
so a process killed mid-write never leaves a half-written file under the real name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
from safetensors import safe_open

from afm_mlx.cli import UserError


def _tmp_name(path: Path) -> Path:
    # Leading dot keeps temporaries out of globs such as ``model*.safetensors``; the suffix is
    # kept because mx.save_safetensors appends ".safetensors" to names without it.
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


def _fsync_replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = _tmp_name(path)
    tmp.write_text(text)
    _fsync_replace(tmp, path)


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def atomic_save_safetensors(
    path: str | Path, arrays: dict[str, mx.array], metadata: dict[str, str] | None = None
) -> None:
    path = Path(path)
    tmp = _tmp_name(path)
    mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})
    _fsync_replace(tmp, path)


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    dst = Path(dst)
    tmp = _tmp_name(dst)
    shutil.copyfile(src, tmp)
    _fsync_replace(tmp, dst)


def read_json(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise UserError(f"{path}: {what} not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: {what} is not valid JSON ({e})") from e


def safetensors_shapes(path: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Names -> (shape, dtype) from a safetensors header, checking the file is complete."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            out = {}
            for name in f.keys():
                sl = f.get_slice(name)
                out[name] = (tuple(sl.get_shape()), sl.get_dtype())
            return out
    except FileNotFoundError as e:
        raise UserError(f"{path}: weights file not found") from e
    except Exception as e:  # safetensors raises its own error types for bad headers/truncation
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"{path}: unreadable or truncated safetensors ({msg}); re-create or re-download it"
        ) from e


def load_safetensors(path: str | Path) -> dict[str, mx.array]:
    """Load arrays after validating the header (a truncated file is a UserError, not a crash)."""
    safetensors_shapes(path)
    try:
        return mx.load(str(path))
    except Exception as e:
        raise UserError(f"{path}: could not read safetensors ({e}); re-create it") from e
