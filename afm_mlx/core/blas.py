"""The fast BLAS on Linux, and a one-line report of the backend.

MLX's Linux CPU wheel links the netlib reference BLAS (~6 GFLOP/s fp32 here). Debian's OpenBLAS,
preloaded, is ~60x faster. Library loading cannot be changed after the fact, so the commands re-run
their own process once with ``LD_PRELOAD`` set (``ensure_fast_blas``); nothing happens at import.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

# Where distributions put an OpenBLAS that exports the reference BLAS symbols (libblas.so.3 ABI).
OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib64/openblas-pthreads/libblas.so.3",
    "/usr/lib/openblas-pthread/libblas.so.3",
)
_REEXEC_FLAG = "AFM_MLX_BLAS_REEXEC"
_hint_shown = False


def find_openblas() -> str | None:
    """Path of an OpenBLAS usable as libblas.so.3 (``AFM_MLX_BLAS`` overrides), or None."""
    override = os.environ.get("AFM_MLX_BLAS")
    if override:
        return override if Path(override).is_file() else None
    return next((p for p in OPENBLAS_CANDIDATES if Path(p).is_file()), None)


def openblas_active() -> bool:
    """True when the OpenBLAS that replaces MLX's BLAS is mapped into this process (Linux only;
    elsewhere True). NumPy's own bundled OpenBLAS (renamed symbols) does not count."""
    if not sys.platform.startswith("linux"):
        return True
    lib = find_openblas()
    if lib is None:
        return False
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return lib in maps or os.path.realpath(lib) in maps


def preload_openblas() -> bool:
    """Load OpenBLAS into this process before MLX is imported (for notebooks and test runners).

    MLX resolves its BLAS symbols through the global scope first, so a library loaded here with
    RTLD_GLOBAL takes the place of the bundled reference BLAS. Returns True if OpenBLAS is active.
    """
    if not sys.platform.startswith("linux") or openblas_active():
        return True
    lib = find_openblas()
    if lib is None or "mlx.core" in sys.modules:
        return False
    import ctypes

    ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
    return True


def ensure_fast_blas(argv: list[str] | None = None, module: str | None = None) -> None:
    """On Linux, re-run this process once with OpenBLAS preloaded, or print a one-time hint.

    Called at the top of each CLI ``main()``. ``argv`` is the module's own argument list; the
    process is re-executed as ``python -m <module> argv``: ``module`` when given (console scripts
    such as ``afm-train`` have no ``python -m`` spec), else the ``__main__`` module's spec.
    """
    global _hint_shown
    if not sys.platform.startswith("linux") or openblas_active():
        return
    lib = find_openblas()
    if lib and not os.environ.get(_REEXEC_FLAG):
        main_mod = sys.modules.get("__main__")
        spec = getattr(main_mod, "__spec__", None)
        name = module or (spec.name if spec is not None else None)
        if name:
            env = dict(os.environ)
            env[_REEXEC_FLAG] = "1"
            env["LD_PRELOAD"] = ":".join(filter(None, [lib, env.get("LD_PRELOAD", "")]))
            args = sys.argv[1:] if argv is None else argv
            sys.stdout.flush()
            sys.stderr.flush()
            os.execve(sys.executable, [sys.executable, "-m", name, *args], env)
    if not _hint_shown:
        _hint_shown = True
        print(
            "afm_mlx: MLX is using its bundled reference BLAS (~60x slower on CPU). "
            "Install OpenBLAS (Debian/Ubuntu: apt-get install libopenblas0-pthread) and afm_mlx "
            "preloads it automatically; or set LD_PRELOAD to its libblas.so.3.",
            file=sys.stderr,
        )


def matmul_gflops(n: int = 512, repeats: int = 5, dtype=None) -> float:
    """Measured fp32 (or ``dtype``) matmul throughput of the default device, in GFLOP/s."""
    import mlx.core as mx

    dtype = dtype or mx.float32
    a = mx.random.normal((n, n)).astype(dtype)
    b = mx.random.normal((n, n)).astype(dtype)
    mx.eval(a @ b)
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ b)
    elapsed = (time.perf_counter() - start) / repeats
    return 2 * n**3 / elapsed / 1e9


def backend_report(gflops: float | None = None) -> str:
    """One line naming the MLX device, the BLAS in use and its matmul speed (measured unless
    ``gflops`` is given)."""
    import mlx.core as mx

    device = mx.default_device()
    if sys.platform == "darwin":
        blas = "Accelerate"
    elif device.type == mx.cpu:
        blas = "OpenBLAS" if openblas_active() else "reference BLAS (slow)"
    else:
        blas = "GPU"
    gflops = matmul_gflops() if gflops is None else gflops
    return f"mlx {mx.__version__} on {device} ({blas}): fp32 matmul {gflops:.0f} GFLOP/s"
