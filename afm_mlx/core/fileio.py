"""Atomic file and folder writes, the output lock, and safetensors validation.

Every file afm_mlx writes goes to a temporary name in the same folder and is renamed into place,
so a process killed mid-write never leaves a half-written file under the real name. Output
folders are built beside their target (``staged_dir``) and renamed into place only when
complete, and ``output_lock`` refuses a second process writing the same ``--out``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx
from safetensors import safe_open

from afm_mlx.core.errors import UserError


def _tmp_name(path: Path) -> Path:
    # Leading dot keeps temporaries out of globs such as ``model*.safetensors``; the suffix is
    # kept because mx.save_safetensors appends ".safetensors" to names without it.
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


def _fsync_replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = _tmp_name(path)
    tmp.write_bytes(data)
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


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


@contextmanager
def output_lock(out: str | Path, flag: str = "--out") -> Iterator[None]:
    """Hold an exclusive lock on output ``out`` (a hidden ``.NAME.lock`` beside it) for the block.

    A second process asking for the same output gets one clear ``UserError`` at once, not a
    clobbered folder. The lock is an ``flock``: the kernel drops it when its holder dies, so a
    killed run never leaves a stale lock behind.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = _lock_path(out)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            try:
                holder = path.read_text().strip() or "?"
            except OSError:
                holder = "?"
            raise UserError(
                f"{flag} {out}: another afm_mlx process (pid {holder}) is writing it; wait for "
                f"it to finish or choose another {flag}"
            ) from None
        # The holder before us may have unlinked the file after we opened it: lock again then.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def check_new_output(out: Path) -> None:
    """``--out`` must be new (or an empty folder): a finished model is never overwritten."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: exists and is not an empty folder; choose another")


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step where the OS offers it (Linux ``renameat2``); returns
    False when it does not, so the caller falls back to two renames."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextmanager
def staged_dir(out: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield a path beside ``out`` to build the output in; when the block succeeds it is renamed
    to ``out``, so a kill at any moment leaves either the complete output or none (and any
    previous ``out`` untouched). On failure nothing is left behind.

    An existing ``out`` is replaced only when ``replace`` is true, and then atomically where the
    OS can swap two paths (Linux), else by two renames. Staging folders left by killed processes
    (``.tmp-PID-NAME-*`` whose PID is gone) are removed. Take ``output_lock`` around it when
    another process might write the same ``out``.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".tmp-*-{out.name}-*"):
        pid = stale.name.split("-")[1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-{out.name}-", dir=out.parent))
    staged = work / out.name
    try:
        yield staged
        if not staged.exists():
            raise RuntimeError(f"nothing was written to the staged {out}")
        if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
            out.rmdir()  # an empty folder made for the output is not an output to keep
        if out.exists() or out.is_symlink():
            if not replace:
                raise UserError(f"{out}: appeared while it was being written; not replaced")
            if not exchange_paths(staged, out):
                old = work / ("replaced" + out.suffix)
                os.replace(out, old)
                try:
                    os.replace(staged, out)
                except OSError:
                    os.replace(old, out)
                    raise
        else:
            os.replace(staged, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
