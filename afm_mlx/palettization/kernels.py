"""LUT-matmul kernels behind the palettized layers: which one runs, a check at first use, and the
pure-MLX fallback.

``y = x @ W.T`` with ``W`` stored as packed LUT indices (``afm_mlx.palettization.layers``) runs on the
kernel of the default device for up to its ``max_rows`` rows of ``x`` (decode, short prefills):

- CPU: ``afm_mlx.palettization._lut_cpu``, an MLX C++ primitive (AVX-512 / AVX2 / NEON / portable C++, threads
  over output rows), built by ``pip install`` when a C++ compiler and CMake are present; up to 128
  rows (``scripts/bench_lut_rows.py`` times it against dequantize + GEMM by rows);
- GPUs: one kernel body run by ``mx.fast.metal_kernel`` (Apple) and ``mx.fast.cuda_kernel``
  (NVIDIA, MLX's CUDA backend) for up to 8 rows: its logic is tested on the CPU by a SIMT
  emulation and its CUDA text compiled by nvcc; ``scripts/gpu_kernel_check.py`` checked and
  timed it on an NVIDIA H200 (``docs/benchmarks.md``); on Apple GPUs it has not run;

and otherwise (more rows, no kernel, ``off``) dequantizes the layer and runs a GEMM.

Every kernel is checked at first use per layout (bits, group size, axis, input width, dtype)
against dequantize + matmul on a random probe; a kernel that fails to build, to run, or to match
is reported once and that layout falls back. ``mode`` (``set_mode``, the ``AFM_MLX_LUT_KERNEL``
environment variable, ``--lut-kernel`` on ``generate`` and ``evaluate``):

- ``auto``: a kernel where one exists and passed its check, the fallback elsewhere;
- ``on``: the same, but a missing kernel or a failed check is an error;
- ``off``: always the fallback.

Gradients flow through the kernel path (``mx.custom_function``: dx = g @ W), so LoRA training
over a palettized base works whichever path a batch takes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import field

import mlx.core as mx

from afm_mlx.core.errors import UserError
from afm_mlx.palettization.gpu_kernel import lut_matmul_cuda, lut_matmul_metal
from afm_mlx.palettization.lut import lut_to_dense
from afm_mlx.palettization.packing import pack_indices, unpack_indices

MODES = ("auto", "on", "off")
ENV = "AFM_MLX_LUT_KERNEL"


# (x, packed, lut, bits, group_size, axis) -> x @ W.T
KernelFn = Callable[[mx.array, mx.array, mx.array, int, int, int], mx.array]
_mode: str | None = None
_checked: dict[tuple, bool] = {}
_reported: set[str] = set()


def set_mode(mode: str) -> None:
    """``auto``, ``on`` or ``off`` for this process (overrides ``AFM_MLX_LUT_KERNEL``)."""
    if mode not in MODES:
        raise UserError(f"--lut-kernel {mode!r}: choose one of {', '.join(MODES)}")
    global _mode
    _mode = mode


def get_mode() -> str:
    if _mode is not None:
        return _mode
    mode = os.environ.get(ENV, "auto")
    if mode not in MODES:
        raise UserError(f"{ENV}={mode!r}: choose one of {', '.join(MODES)}")
    return mode


@contextmanager
def using(mode: str) -> Iterator[None]:
    """``with kernels.using("off"): ...``: the mode inside the block, the previous after."""
    global _mode
    previous = _mode
    set_mode(mode)
    try:
        yield
    finally:
        _mode = previous


def apply_flag(value: str | None) -> None:
    """The ``--lut-kernel`` flag of a CLI: set the mode (None keeps ``AFM_MLX_LUT_KERNEL``), and
    refuse ``on`` up front where the default device has no kernel."""
    if value is not None:
        set_mode(value)
    name = backend()
    if get_mode() == "on" and name not in KERNELS:
        raise UserError(f"--lut-kernel on: {_missing_reason(name)}")


def flag_field():
    """The ``--lut-kernel`` option of a command's config dataclass (``apply_flag`` applies it)."""
    help_text = (
        "palettized layers' LUT kernel: auto, on or off (default: $AFM_MLX_LUT_KERNEL, else auto)"
    )
    return field(default=None, metadata={"help": help_text})


def reset() -> None:
    """Forget first-use checks and reports (tests; after swapping a kernel)."""
    _checked.clear()
    _reported.clear()


def _report(key: str, message: str) -> None:
    if key not in _reported:
        _reported.add(key)
        print(f"afm_mlx: {message}", file=sys.stderr, flush=True)


# --- the CPU extension --------------------------------------------------------------------------


def _load_cpu_extension():
    """(module, None) or (None, why it cannot be used)."""
    try:
        from afm_mlx.palettization import _lut_cpu
    except ImportError as e:
        return None, f"not built ({e}); reinstall afm_mlx with a C++ compiler and CMake present"
    if _lut_cpu.mlx_version != mx.__version__:
        return None, (
            f"built for mlx {_lut_cpu.mlx_version} but mlx {mx.__version__} is installed; "
            "reinstall afm_mlx to rebuild it"
        )
    return _lut_cpu, None


_cpu_extension, _cpu_missing = _load_cpu_extension()


def _cpu_kernel(x, packed, lut, bits, group_size, axis):
    return _cpu_extension.lut_matmul(x, packed, lut, bits, group_size, axis, x.shape[-1])


# backend -> (kernel, the most rows of x it takes); tests replace entries.
KERNELS: dict[str, tuple[KernelFn, int]] = {
    "metal": (lut_matmul_metal, 8),
    "cuda": (lut_matmul_cuda, 8),
}


def backend() -> str:
    """The kernel family of the default device: ``cpu``, ``metal`` or ``cuda``."""
    device = mx.default_device()
    if device.type == mx.cpu:
        return "cpu"
    return "metal" if mx.metal.is_available() else "cuda"


def _missing_reason(name: str) -> str:
    if name == "cpu":
        return f"the CPU LUT kernel is {_cpu_missing}"
    return f"there is no LUT kernel for {name}"


def describe() -> str:
    """One line: which path palettized layers take on the default device."""
    name, mode = backend(), get_mode()
    if mode == "off":
        return "palettized layers: dequantize + matmul (--lut-kernel off)"
    if name not in KERNELS:
        return f"palettized layers: dequantize + matmul ({_missing_reason(name)})"
    if name == "cpu":
        isa = _cpu_extension.isa(4, 4096, 16, 0)
        kernel = f"CPU LUT kernel ({isa}, {_cpu_extension.threads()} threads)"
    else:
        kernel = f"{name} LUT kernel"
    return (
        f"palettized layers: {kernel} for up to {KERNELS[name][1]} rows (checked at first use), "
        "dequantize + matmul for more"
    )


# --- the first-use check ------------------------------------------------------------------------


def _probe(bits: int, group_size: int, axis: int, in_dims: int, dtype: mx.Dtype, rows_x: int):
    """Random packed indices and LUTs with this layout (a few rows), and ``rows_x`` inputs."""
    rows = 2 * group_size if axis == 0 else 16
    key = mx.random.key(1234)
    k1, k2, k3 = mx.random.split(key, 3)
    groups = rows // group_size if axis == 0 else in_dims // group_size
    indices = mx.random.randint(0, 1 << bits, (rows, in_dims), key=k1).astype(mx.uint8)
    lut = mx.random.normal((groups, 1 << bits), key=k2).astype(mx.float16)
    x = mx.random.normal((rows_x, in_dims), key=k3).astype(dtype)
    return x, pack_indices(indices, bits), lut, lut_to_dense(lut, indices, group_size, axis)


def reference_matmul(x: mx.array, dense: mx.array, by_reduction: bool | None = None) -> mx.array:
    """``x @ dense.T`` in full float32, what a kernel is checked against. On a GPU (or with
    ``by_reduction``) as products summed by a reduction, not a matmul: MLX's CUDA matmul rounds
    float32 inputs to TF32 for more than one row (measured on an H200: 2e-4 of the output's scale
    off an exact sum), coarser than the check's 1e-4. One row of ``x`` at a time."""
    x32, w32 = x.astype(mx.float32), dense.astype(mx.float32)
    if by_reduction is None:
        by_reduction = backend() != "cpu"
    if not by_reduction:
        return x32 @ w32.T
    rows = x32.reshape(-1, x32.shape[-1])
    out = mx.stack([(rows[i] * w32).sum(-1) for i in range(rows.shape[0])])
    return out.reshape(*x.shape[:-1], dense.shape[0])


def _passes(fn: KernelFn, max_rows, bits, group_size, axis, in_dims, dtype) -> tuple[bool, str]:
    x, packed, lut, dense = _probe(bits, group_size, axis, in_dims, dtype, max_rows)
    try:
        for m in sorted({1, 3, min(8, max_rows), max_rows}):
            got = fn(x[:m], packed, lut, bits, group_size, axis)
            want = reference_matmul(x[:m], dense).astype(dtype)
            # fp32: summation order alone moves results by ~1e-6 of their scale; 1e-4 still
            # catches a kernel that is off by 0.1%. Half-precision outputs round at ~1e-3.
            tol = 1e-4 if dtype == mx.float32 else 2e-2
            scale = mx.abs(want).max() + 1e-6
            ok = got.shape == want.shape and got.dtype == dtype
            ok = ok and bool(mx.all(mx.abs(got - want) <= tol * scale).item())
            if not ok:
                return False, f"its result differs from dequantize + matmul ({m} rows)"
    except Exception as e:  # a kernel that cannot compile or run is as bad as a wrong one
        return False, f"it failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return True, ""


def _kernel_for(
    rows: int, bits: int, group_size: int, axis: int, in_dims: int, dtype
) -> KernelFn | None:
    """The checked kernel for this layout on the default device, or None for the fallback."""
    mode = get_mode()
    if mode == "off":
        return None
    name = backend()
    fn, max_rows = KERNELS.get(name, (None, 0))
    if fn is None:
        if mode == "on":
            raise UserError(f"--lut-kernel on: {_missing_reason(name)}")
        _report(
            name,
            f"{_missing_reason(name)}; palettized layers dequantize per call (slower). "
            "`python -m afm_mlx.runtime` shows the active path.",
        )
        return None
    if rows > max_rows:
        return None
    key = (name, fn, bits, group_size, axis, in_dims, dtype)
    if key not in _checked:
        try:
            ok, why = _passes(fn, max_rows, bits, group_size, axis, in_dims, dtype)
        except Exception:  # inside mx.compile / vmap nothing may be evaluated: decide later
            return None
        _checked[key] = ok
        if not ok:
            layout = f"{bits}-bit, groups of {group_size} along axis {axis}, {in_dims} inputs"
            if mode == "on":
                raise UserError(f"--lut-kernel on: the {name} LUT kernel for {layout}: {why}")
            _report(
                str(key),
                f"the {name} LUT kernel for {layout} is not used: {why}; "
                "falling back to dequantize + matmul",
            )
    return fn if _checked[key] else None


# --- the entry point ----------------------------------------------------------------------------

_vjp_cache: dict[tuple, Callable] = {}


def _differentiable(fn: KernelFn, bits: int, group_size: int, axis: int) -> Callable:
    """``fn`` with a VJP: dx = g @ W (the codes and LUTs are constants)."""
    key = (fn, bits, group_size, axis)
    if key not in _vjp_cache:

        @mx.custom_function
        def kernel(x, packed, lut):
            return fn(x, packed, lut, bits, group_size, axis)

        @kernel.vjp
        def kernel_vjp(primals, cotangent, output):
            x, packed, lut = primals
            w = lut_to_dense(lut, unpack_indices(packed, bits, x.shape[-1]), group_size, axis)
            dx = (cotangent.astype(mx.float32) @ w.astype(mx.float32)).astype(x.dtype)
            return dx, mx.zeros_like(packed), mx.zeros_like(lut)

        _vjp_cache[key] = kernel
    return _vjp_cache[key]


def kernel_matmul(
    x: mx.array, packed: mx.array, lut: mx.array, bits: int, group_size: int, axis: int
) -> mx.array | None:
    """``x @ W.T`` by the checked kernel of the default device, or None when the caller should
    dequantize (too many rows, no kernel, ``off``, or a failed check)."""
    in_dims = x.shape[-1]
    fn = _kernel_for(x.size // max(1, in_dims), bits, group_size, axis, in_dims, x.dtype)
    if fn is None:
        return None
    return _differentiable(fn, bits, group_size, axis)(x, packed, lut)


def kernel_usable() -> bool:
    """Whether decode on the default device can take a LUT kernel (mode not ``off``, a kernel
    exists); used to decide that dense caches are not worth their memory."""
    return get_mode() != "off" and backend() in KERNELS


if _cpu_extension is not None:
    KERNELS["cpu"] = (_cpu_kernel, 128)
