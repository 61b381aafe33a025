"""Where the CPU LUT kernel stops paying: its time against dequantize + GEMM by rows of x.

    python scripts/bench_lut_rows.py [--out-dims 4096] [--in-dims 4096] [--bits 4] [--repeats 5]

For a palettized layer (16 rows per LUT) and x of M rows, times side by side, warm, in one
process: the CPU kernel straight from the packed indices (``afm_mlx.palettization._lut_cpu``),
our fallback (decode the layer, then one GEMM: what ``kernels`` runs above the kernel's
``max_rows``), MLX's affine ``quantized_matmul`` at the same bits (group 64, the peer), and the
dense float32 GEMM. Prints milliseconds per call (median), the kernel's ratio to the fallback, and
the process's peak memory. The kernel's ``max_rows`` (128 on the CPU) is set where the two meet.
MLX's CPU ``quantized_matmul`` runs on one thread; the kernel and the GEMMs use every core.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from afm_mlx.core.blas import preload_openblas

preload_openblas()
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from afm_mlx.core.blas import backend_report  # noqa: E402
from afm_mlx.palettization import kernels  # noqa: E402
from afm_mlx.palettization.layers import PalettizedLinear  # noqa: E402

ROWS = (1, 4, 16, 64, 128, 192, 256)


def median_ms(fn, repeats: int) -> float:
    mx.eval(fn())  # warm: first-use checks, buffers
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dims", type=int, default=4096)
    ap.add_argument("--in-dims", type=int, default=4096)
    ap.add_argument("--bits", type=int, default=4, choices=[2, 4, 8])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if "cpu" not in kernels.KERNELS:
        sys.exit(f"error: no CPU LUT kernel here ({kernels.describe()}); nothing was timed")
    kernel, max_rows = kernels.KERNELS["cpu"]
    print(backend_report())
    print(f"{os.cpu_count()} cores; the CPU kernel takes up to {max_rows} rows in afm_mlx")
    dense = nn.Linear(args.in_dims, args.out_dims, bias=False)
    layer = PalettizedLinear.from_linear(dense, args.bits, 16, 0)
    weight = layer.dequantize(mx.float32)
    wq, scales, biases = mx.quantize(weight, group_size=64, bits=args.bits)
    mx.eval(weight, wq, scales, biases)
    bits, group, axis = args.bits, 16, 0
    print(
        f"\n{args.out_dims}x{args.in_dims}, {bits}-bit, 16 rows per LUT; ms per call (median of "
        f"{args.repeats})\n{'rows':>5} {'kernel':>9} {'dequant+GEMM':>13} {'mlx q' + str(bits):>9} "
        f"{'dense fp32':>11} {'kernel vs fallback':>19}"
    )
    for m in ROWS:
        x = mx.random.normal((m, args.in_dims))
        mx.eval(x)
        t_kernel = median_ms(
            lambda x=x: kernel(x, layer.packed, layer.lut, bits, group, axis), args.repeats
        )
        t_fallback = median_ms(lambda x=x: x @ layer.dequantize(mx.float32).T, args.repeats)
        t_peer = median_ms(
            lambda x=x: mx.quantized_matmul(x, wq, scales, biases, True, 64, bits), args.repeats
        )
        t_dense = median_ms(lambda x=x: x @ weight.T, args.repeats)
        print(
            f"{m:>5} {t_kernel:>9.2f} {t_fallback:>13.2f} {t_peer:>9.2f} {t_dense:>11.2f} "
            f"{t_fallback / t_kernel:>18.2f}x"
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS {peak:.0f} MB (the dense weight and the q{bits} copy included)")


if __name__ == "__main__":
    main()
