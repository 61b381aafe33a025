"""On a GPU (Apple Metal or NVIDIA CUDA through MLX's backends): check the LUT kernel, choose its
layout by timing, and time it against MLX's affine quantized matmul.

    python scripts/gpu_kernel_check.py                     # all three parts
    python scripts/gpu_kernel_check.py --json out.json     # the figures as JSON too

1. Layouts: every candidate layout of the kernel (``gpu_kernel.GPU_CANDIDATES``: output rows per
   simdgroup, simdgroups per threadgroup, per-row LUTs in registers or threadgroup memory, indices
   a lane reads at once), 4-bit with 16 rows per LUT, float16, on 4096x4096, 8192x3072 and
   16384x16384 (large enough for the kernel's own time to outweigh MLX's dispatch) at M = 1 and
   4: each checked against dequantize + matmul, then timed (streamed). The fastest at M = 1
   against q4 (geometric mean over the matrices) is the one to put in ``GPU_LAYOUTS``.
2. Correctness: the backend's current layout and the fastest, for every bit width, both group
   axes, float32 and float16 inputs, 1 to 8 rows; and the library's first-use check.
3. Speed of those layouts against ``mx.quantized_matmul`` (affine, groups of 64) at the same
   bits and a dense float16 matmul, two ways: per call (one ``mx.eval`` per call: what a decode
   step pays, MLX's dispatch included) and streamed (16 calls per ``mx.eval``, each on its own
   copy of the weights, 16 copies being larger than the GPU's L2 cache: closer to the kernel's own
   speed reading weights from device memory), with the weight bytes read per second. The
   reference of every check is ``kernels.reference_matmul`` (exact float32: not MLX's CUDA
   matmul, which rounds float32 to TF32).

Every timing is warm (5 untimed calls first) and synchronized. Prints the commit and device so
that the figures can go into the README with where they were taken. Stops with one line where
the default device is not a GPU.
"""

# ruff: noqa: E402
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx

from afm_mlx.core.config import run_main
from afm_mlx.core.errors import UserError
from afm_mlx.palettization import gpu_kernel, kernels
from afm_mlx.palettization.layers import PalettizedLinear
from afm_mlx.palettization.lut import lut_to_dense
from afm_mlx.palettization.packing import PACKABLE_BITS, pack_indices

MATRICES = ((4096, 4096), (8192, 3072), (16384, 16384))  # the last: kernel time over dispatch
COPIES = 16  # weights streamed per mx.eval: 16 x 8 MB of 4-bit codes is more than an L2 cache


def _layer(
    rows: int, cols: int, bits: int, axis: int, seed: int, group_size: int = 16
) -> tuple[PalettizedLinear, mx.array]:
    layer = PalettizedLinear(cols, rows, bias=False, bits=bits, group_size=group_size, axis=axis)
    k1, k2 = mx.random.split(mx.random.key(seed))
    indices = mx.random.randint(0, 1 << bits, (rows, cols), key=k1).astype(mx.uint8)
    layer.packed = pack_indices(indices, bits)
    layer.lut = (0.05 * mx.random.normal(layer.lut.shape, key=k2)).astype(mx.float16)
    dense = lut_to_dense(layer.lut, indices, group_size, axis)
    mx.eval(layer.packed, layer.lut, dense)
    return layer, dense


def _error(got: mx.array, want: mx.array) -> float:
    got, want = got.astype(mx.float32), want.astype(mx.float32)
    return mx.abs(got - want).max().item() / (mx.abs(want).max().item() + 1e-6)


def correctness(name: str, layout: gpu_kernel.GpuLayout) -> int:
    failures = 0
    for bits in PACKABLE_BITS:
        for axis in (0, 1):
            layer, dense = _layer(
                1008, 512, bits, axis, seed=bits * 2 + axis
            )  # 1008: partial blocks
            for dtype in (mx.float32, mx.float16):
                for m in range(1, 9):
                    x = mx.random.normal((m, 512)).astype(dtype)
                    try:
                        got = gpu_kernel.lut_matmul_gpu(
                            name, x, layer.packed, layer.lut, bits, 16, axis, layout
                        )
                        err = _error(got, kernels.reference_matmul(x, dense))
                    except Exception as e:  # a compile or launch failure is a failure too
                        err, why = float("inf"), f"{type(e).__name__}: {str(e)[:300]}"
                    else:
                        why = f"rel {err:.2e}"
                    if err > (1e-4 if dtype == mx.float32 else 2e-2):
                        failures += 1
                        print(f"  MISMATCH {layout} bits {bits} axis {axis} {dtype} M={m}: {why}")
    print(f"correctness of {layout}: {'all match' if not failures else f'{failures} mismatches'}")
    return failures


def _per_call(fn, repeats: int) -> float:
    for _ in range(5):
        mx.eval(fn(0))
    mx.synchronize()
    start = time.perf_counter()
    for i in range(repeats):
        mx.eval(fn(i % COPIES))
    mx.synchronize()
    return (time.perf_counter() - start) / repeats


def _streamed(fn, repeats: int) -> float:
    mx.eval([fn(i) for i in range(COPIES)])
    mx.synchronize()
    rounds = max(1, repeats // COPIES)
    start = time.perf_counter()
    for _ in range(rounds):
        mx.eval([fn(i) for i in range(COPIES)])
    mx.synchronize()
    return (time.perf_counter() - start) / (rounds * COPIES)


class Weights:
    """COPIES copies of one matrix in every form timed: LUT codes, affine q-bits, dense fp16."""

    def __init__(self, n: int, k: int, bits: int):
        self.bits, self.nbytes = bits, {}
        self.luts = [_layer(n, k, bits, 0, seed=n + i)[0] for i in range(COPIES)]
        self.nbytes["lut"] = self.luts[0].packed.nbytes + self.luts[0].lut.nbytes
        self.dense = [
            (0.05 * mx.random.normal((n, k), key=mx.random.key(i))).astype(mx.float16)
            for i in range(COPIES)
        ]
        self.nbytes["fp16"] = self.dense[0].nbytes
        mx.eval([(lay.packed, lay.lut) for lay in self.luts], self.dense)
        try:
            self.affine = [mx.quantize(w, group_size=64, bits=bits) for w in self.dense]
            mx.eval(self.affine)
            self.nbytes["affine"] = sum(a.nbytes for a in self.affine[0])
        except Exception as e:  # this backend may not quantize at these bits
            print(f"  (no affine {bits}-bit on this backend: {type(e).__name__}: {e})")
            self.affine = None

    def lut_fn(self, name: str, x: mx.array, layout: gpu_kernel.GpuLayout):
        def call(i):
            lay = self.luts[i]
            return gpu_kernel.lut_matmul_gpu(name, x, lay.packed, lay.lut, self.bits, 16, 0, layout)

        return call

    def affine_fn(self, x: mx.array):
        def call(i):
            wq, scales, biases = self.affine[i]
            return mx.quantized_matmul(x, wq, scales, biases, True, 64, self.bits)

        return call

    def dense_fn(self, x: mx.array):
        return lambda i: x @ self.dense[i].T


def _label(layout: gpu_kernel.GpuLayout) -> str:
    where = "threadgroup" if layout.lut_shared else "registers"
    return f"{layout.rows} rows x {layout.simdgroups} sg, LUT in {where}, {layout.vec * 8}/lane"


def choose_layout(name: str, repeats: int, results: dict) -> gpu_kernel.GpuLayout:
    print("\n1. layouts, 4-bit, float16, streamed us per call (M = 1 | M = 4); q4 g64 above")
    weights = {shape: Weights(*shape, 4) for shape in MATRICES}
    xs = {(k, m): mx.random.normal((m, k)).astype(mx.float16) for _, k in MATRICES for m in (1, 4)}
    q4 = {
        (n, k, m): _streamed(weights[(n, k)].affine_fn(xs[(k, m)]), repeats)
        for n, k in MATRICES
        for m in (1, 4)
    }
    print(
        "  mx.quantized_matmul q4 g64: "
        + "  ".join(
            f"{n}x{k} {q4[(n, k, 1)] * 1e6:.1f} | {q4[(n, k, 4)] * 1e6:.1f}" for n, k in MATRICES
        )
    )
    timings = {}
    for layout in gpu_kernel.GPU_CANDIDATES:
        row = {}
        try:
            for n, k in MATRICES:
                for m in (1, 4):
                    x = xs[(k, m)]
                    fn = weights[(n, k)].lut_fn(name, x, layout)
                    with kernels.using("off"):  # dequantize + matmul
                        want = weights[(n, k)].luts[0](x.astype(mx.float32))
                    if _error(fn(0), want) > 2e-2:
                        raise ValueError(f"{n}x{k} M={m}: differs from dequantize + matmul")
                    row[(n, k, m)] = _streamed(fn, repeats)
        except Exception as e:
            print(f"  {_label(layout)}: FAILED ({type(e).__name__}: {str(e)[:300]})")
            continue
        timings[layout] = row
        print(
            f"  {_label(layout)}: "
            + "  ".join(
                f"{n}x{k} {row[(n, k, 1)] * 1e6:.1f} | {row[(n, k, 4)] * 1e6:.1f}"
                for n, k in MATRICES
            )
        )
    results["layouts"] = [
        {
            "layout": layout._asdict(),
            "us": {f"{n}x{k} M={m}": t * 1e6 for (n, k, m), t in row.items()},
        }
        for layout, row in timings.items()
    ]
    results["q4_streamed_us"] = {f"{n}x{k} M={m}": t * 1e6 for (n, k, m), t in q4.items()}
    if not timings:
        raise UserError("no candidate layout ran correctly on this GPU")

    def vs_q4(layout):  # geometric mean over the matrices of time / q4's time, at M = 1
        ratios = [timings[layout][(n, k, 1)] / q4[(n, k, 1)] for n, k in MATRICES]
        return math.prod(ratios) ** (1 / len(ratios))

    best = min(timings, key=vs_q4)
    print(f"fastest at M = 1: {_label(best)} ({1 / vs_q4(best):.2f}x q4's speed, geometric mean)")
    return best


def speed(name: str, layouts: list, repeats: int, results: dict) -> None:
    print("\n3. speed, float16 inputs, us per call: per call (eval each) / streamed; GB/s streamed")
    header = f"{'matrix':<10} {'bits':>4} {'M':>2} {'kernel':<52} {'per call':>9} {'streamed':>9} {'GB/s':>7}"
    print(header)
    rows = []
    for bits in (4, 2, 3, 8):
        for n, k in MATRICES:
            w = Weights(n, k, bits)
            for m in (1, 4):
                x = mx.random.normal((m, k)).astype(mx.float16)
                fns = [
                    (f"LUT-{bits} {_label(lay)}", w.lut_fn(name, x, lay), w.nbytes["lut"])
                    for lay in layouts
                ]
                if w.affine is not None:
                    fns.append(
                        (f"mx.quantized_matmul q{bits} g64", w.affine_fn(x), w.nbytes["affine"])
                    )
                fns.append(("dense fp16 matmul", w.dense_fn(x), w.nbytes["fp16"]))
                for label, fn, nbytes in fns:
                    try:
                        call, stream = _per_call(fn, repeats), _streamed(fn, repeats)
                    except Exception as e:
                        print(
                            f"{n}x{k:<5} {bits:>4} {m:>2} {label:<52} FAILED {type(e).__name__}: {str(e)[:200]}"
                        )
                        continue
                    print(
                        f"{n}x{k:<5} {bits:>4} {m:>2} {label:<52} {call * 1e6:9.1f} "
                        f"{stream * 1e6:9.1f} {nbytes / stream / 1e9:7.0f}"
                    )
                    rows.append(
                        {
                            "matrix": f"{n}x{k}",
                            "bits": bits,
                            "M": m,
                            "kernel": label,
                            "per_call_us": call * 1e6,
                            "streamed_us": stream * 1e6,
                            "weight_bytes": nbytes,
                        }
                    )
            del w
    results["speed"] = rows


def main_body(repeats: int, json_path: str | None) -> None:
    if mx.default_device().type != mx.gpu:
        raise UserError(
            "gpu_kernel_check.py needs MLX on a GPU (Metal, or CUDA with the mlx-cuda wheel); "
            "the default device here is the CPU, so nothing was run"
        )
    name = kernels.backend()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout.strip()
    current = gpu_kernel.GPU_LAYOUTS[name]
    print(f"mlx {mx.__version__} on {mx.default_device()} ({name}); afm_mlx commit {commit}")
    print(f"{name}'s layout in gpu_kernel.GPU_LAYOUTS: {current}")
    results: dict = {
        "mlx": mx.__version__,
        "backend": name,
        "commit": commit,
        "current_layout": current._asdict(),
    }
    try:
        _check_and_time(name, current, repeats, results)
    finally:  # whatever was measured, even if a later part failed
        if json_path:
            Path(json_path).write_text(json.dumps(results, indent=1))


def _check_and_time(name: str, current, repeats: int, results: dict) -> None:
    try:
        best = choose_layout(name, repeats, results)
    except Exception as e:  # go on to the other parts with the current layout
        print(f"layout timing FAILED: {type(e).__name__}: {e}")
        best = current
    results["fastest_layout"] = best._asdict()
    layouts = list(dict.fromkeys([current, best]))
    print("\n2. correctness")
    failures = {str(lay): correctness(name, lay) for lay in layouts}
    results["correctness_failures"] = failures
    layer, dense = _layer(256, 512, 4, 0, seed=0)
    try:
        with kernels.using("on"):  # the library's own first-use check, as generate runs it
            y = layer(mx.ones((1, 512)))
            ok = _error(y, mx.ones((1, 512)) @ dense.astype(mx.float32).T) < 1e-3
        print(f"first-use check and layer call: {'ok' if ok else 'WRONG RESULT'}")
    except Exception as e:
        ok = False
        print(f"first-use check FAILED: {type(e).__name__}: {e}")
    results["first_use_ok"] = ok
    print(kernels.describe())
    speed(name, layouts, repeats, results)
    if any(failures.values()) or not ok:
        raise UserError(f"kernel results differ from dequantize + matmul: {failures}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    run_main(lambda: main_body(args.repeats, args.json))


if __name__ == "__main__":
    main()
