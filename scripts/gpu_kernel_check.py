"""On a GPU (Apple Metal or NVIDIA CUDA through MLX's backends): check the LUT kernel, time it.

    python scripts/gpu_kernel_check.py               # correctness, then timings
    python scripts/gpu_kernel_check.py --repeats 200

1. Correctness: the GPU kernel (``afm_mlx.lut_kernels``, one body for Metal and CUDA) against
   dequantize + matmul for every bit width, both group axes, float32 and float16 inputs, 1 to 8
   rows; and the first-use check the library runs.
2. Speed: 4096x4096 and 8192x3072, M = 1 and 4, float16: the LUT-4 kernel (16 rows per LUT)
   against MLX's affine q4 g64 ``quantized_matmul`` and a dense fp16 matmul, warm, synchronized.

Prints the commit and device so that the figures can go into the README with where they were
taken. Stops with one line where the default device is not a GPU. Written without a GPU at
hand: its first run is the check of the check.
"""

# ruff: noqa: E402
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx
import mlx.nn as nn

from afm_mlx import lut_kernels
from afm_mlx.cli import UserError, run_main
from afm_mlx.kmeans import lut_to_dense
from afm_mlx.packing import PACKABLE_BITS, pack_indices
from afm_mlx.palettized import PalettizedLinear


def _layer(
    rows: int, cols: int, bits: int, axis: int, seed: int
) -> tuple[PalettizedLinear, mx.array]:
    layer = PalettizedLinear(cols, rows, bias=False, bits=bits, group_size=16, axis=axis)
    k1, k2 = mx.random.split(mx.random.key(seed))
    indices = mx.random.randint(0, 1 << bits, (rows, cols), key=k1).astype(mx.uint8)
    layer.packed = pack_indices(indices, bits)
    layer.lut = (0.05 * mx.random.normal(layer.lut.shape, key=k2)).astype(mx.float16)
    dense = lut_to_dense(layer.lut, indices, 16, axis)
    mx.eval(layer.packed, layer.lut, dense)
    return layer, dense


def correctness(kernel) -> int:
    failures = 0
    for bits in PACKABLE_BITS:
        for axis in (0, 1):
            layer, dense = _layer(1024, 512, bits, axis, seed=bits * 2 + axis)
            for dtype in (mx.float32, mx.float16):
                for m in range(1, 9):
                    x = mx.random.normal((m, 512)).astype(dtype)
                    got = kernel(x, layer.packed, layer.lut, bits, 16, axis).astype(mx.float32)
                    want = x.astype(mx.float32) @ dense.astype(mx.float32).T
                    tol = 1e-4 if dtype == mx.float32 else 2e-2
                    err = mx.abs(got - want).max().item() / (mx.abs(want).max().item() + 1e-6)
                    if err > tol:
                        failures += 1
                        print(f"  MISMATCH bits {bits} axis {axis} {dtype} M={m}: rel {err:.2e}")
    print(f"correctness: {'all match' if not failures else f'{failures} mismatches'}")
    return failures


def _timed(fn, repeats: int) -> float:
    for _ in range(5):
        mx.eval(fn())
    mx.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(fn())
    mx.synchronize()
    return (time.perf_counter() - start) / repeats


def speed(kernel, repeats: int) -> None:
    print(
        f"\n{'matrix':<12} {'M':>2} {'LUT-4 us':>9} {'q4 g64 us':>10} {'fp16 us':>8}  LUT-4 vs q4"
    )
    for n, k in ((4096, 4096), (8192, 3072)):
        layer, _ = _layer(n, k, 4, 0, seed=n)
        linear = nn.Linear(k, n, bias=False)
        w16 = linear.weight.astype(mx.float16)
        wq, scales, biases = mx.quantize(w16, group_size=64, bits=4)
        mx.eval(w16, wq, scales, biases)
        for m in (1, 4):
            x = mx.random.normal((m, k)).astype(mx.float16)
            ours = _timed(lambda: kernel(x, layer.packed, layer.lut, 4, 16, 0), repeats)  # noqa: B023
            q4 = _timed(
                lambda: mx.quantized_matmul(x, wq, scales, biases, True, 64, 4),  # noqa: B023
                repeats,
            )
            fp16 = _timed(lambda: x @ w16.T, repeats)  # noqa: B023
            print(
                f"{n}x{k:<7} {m:>2} {ours * 1e6:9.1f} {q4 * 1e6:10.1f} {fp16 * 1e6:8.1f}  "
                f"{q4 / ours:.2f}x"
            )


def main_body(repeats: int) -> None:
    if mx.default_device().type != mx.gpu:
        raise UserError(
            "gpu_kernel_check.py needs MLX on a GPU (Metal, or CUDA with the mlx-cuda wheel); "
            "the default device here is the CPU, so nothing was run"
        )
    name = lut_kernels.backend()
    kernel, _ = lut_kernels.KERNELS[name]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout.strip()
    print(f"mlx {mx.__version__} on {mx.default_device()} ({name}); afm_mlx commit {commit}")
    failures = correctness(kernel)
    layer, dense = _layer(256, 512, 4, 0, seed=0)
    with lut_kernels.using("on"):  # the library's own first-use check, as generate runs it
        y = layer(mx.ones((1, 512)))
        assert mx.allclose(y, mx.ones((1, 512)) @ dense.astype(mx.float32).T, atol=1e-3)
    print(lut_kernels.describe())
    speed(kernel, repeats)
    if failures:
        raise UserError(f"{failures} kernel results differ from dequantize + matmul")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args(argv)
    run_main(lambda: main_body(args.repeats))


if __name__ == "__main__":
    main()
