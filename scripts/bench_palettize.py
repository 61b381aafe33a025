"""Palettization speed and quality: afm_mlx's grouped k-means vs coremltools, side by side.

Part 1, same matrices and settings in one process (kmeans, per_grouped_channel, group 16): the time of
coremltools 9's public ``palettize_weights`` on a one-weight MIL program against ``kmeans_lut``, each
called twice on the same matrix (first call vs first call, warm vs warm), and the relative MSE
||W - W_hat||^2 / ||W||^2 of
both results (coremltools' LUT and indices are read back from its output program). The matrices are
trained-LLM-like: gaussian, per-row scales, 0.1% heavy-tailed outliers.

Part 2: palettize an AFM-3B-shaped model (26 qwen3 layers, d_model 3072, 24 q / 8 kv heads of 128,
FFN 8192, vocab 49152) layer by layer in bounded memory: each random gaussian weight is drawn,
palettized into a ``PalettizedLinear`` (4-bit, group 16) and dropped; the embedding gets AFM's 8-bit
per-row LUTs. The wall time includes drawing the weights.

    python scripts/bench_palettize.py             # 8192x3072 and 3072x3072, 4/2-bit; full AFM-3B
    python scripts/bench_palettize.py --quick     # 3072x3072 only; 2 AFM layers + 4096 vocab rows
    python scripts/bench_palettize.py --skip-afm | --skip-matrices
"""

from __future__ import annotations

import argparse
import resource
import time

from afm_mlx.core.blas import preload_openblas

preload_openblas()

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402

from afm_mlx.core.blas import backend_report  # noqa: E402
from afm_mlx.palettization.kmeans import kmeans_lut  # noqa: E402
from afm_mlx.palettization.layers import PalettizedEmbedding, PalettizedLinear  # noqa: E402
from afm_mlx.palettization.lut import lut_to_dense  # noqa: E402

AFM_LAYER = (  # (name, out, in) of one qwen3 block at AFM-on-device size
    ("q_proj", 24 * 128, 3072),
    ("k_proj", 8 * 128, 3072),
    ("v_proj", 8 * 128, 3072),
    ("o_proj", 3072, 24 * 128),
    ("gate_proj", 8192, 3072),
    ("up_proj", 8192, 3072),
    ("down_proj", 3072, 8192),
)


def random_weight(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Trained-LLM-like fp16 weight: gaussian body, per-row scales, a few heavy-tailed outliers."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape, dtype=np.float32) * 0.02
    w *= rng.uniform(0.5, 1.5, size=(shape[0], 1)).astype(np.float32)
    outliers = rng.random(shape) < 1e-3
    w[outliers] = rng.standard_t(3, size=int(outliers.sum())).astype(np.float32) * 0.1
    return w.astype(np.float16)


def coreml_palettize(weight: np.ndarray, bits: int) -> tuple[float, float, np.ndarray]:
    """(first-call seconds, warm seconds) spent in coremltools' public palettize_weights on the
    same model, and its dense result."""
    import coremltools as ct
    import coremltools.optimize as cto
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types
    from coremltools.optimize._utils import lut_to_dense as ct_lut_to_dense

    spec = [mb.TensorSpec(shape=(1, weight.shape[1]), dtype=types.fp16)]

    @mb.program(input_specs=spec, opset_version=ct.target.iOS18)
    def program(x):
        return mb.linear(x=x, weight=weight, name="y")

    model = ct.convert(
        program,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT16,
        skip_model_load=True,
    )
    op_config = cto.coreml.OpPalettizerConfig(
        mode="kmeans", nbits=bits, granularity="per_grouped_channel", group_size=16
    )
    config = cto.coreml.OptimizationConfig(global_config=op_config)
    times = []
    for _ in range(2):  # cold and warm, as ours: the speedups compare like with like
        start = time.perf_counter()
        compressed = cto.coreml.palettize_weights(model, config)
        times.append(time.perf_counter() - start)
    ops = compressed._mil_program.functions["main"].operations
    lut_op = next(op for op in ops if op.op_type == "constexpr_lut_to_dense")
    return times[0], times[1], ct_lut_to_dense(lut_op.indices.val, lut_op.lut.val, None)


def ours_palettize(weight: np.ndarray, bits: int) -> tuple[float, float, np.ndarray]:
    """(first-call seconds, warm seconds, dense result) of kmeans_lut on the same matrix."""
    w = mx.array(weight)
    mx.eval(w)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        lut, idx = kmeans_lut(w, bits, group_size=16, axis=0)
        mx.eval(lut, idx)
        times.append(time.perf_counter() - start)
    return times[0], times[1], np.array(lut_to_dense(lut, idx, 16))


def rel_mse(dense: np.ndarray, weight: np.ndarray) -> float:
    w = weight.astype(np.float64)
    return float(np.sum((dense.astype(np.float64) - w) ** 2) / np.sum(w**2))


def bench_matrices(shapes: list[tuple[int, int]], bit_widths: list[int]) -> None:
    print("\n== kmeans palettization, per_grouped_channel group 16: coremltools 9 vs afm_mlx ==")
    header = (
        f"{'matrix':>11} {'bits':>4} {'coreml s':>9} {'(1st)':>7} {'ours s':>7} {'(1st)':>7} "
        f"{'warm/warm':>9} {'1st/1st':>7} {'coreml MSE':>11} {'ours MSE':>10} {'MSE ratio':>9}"
    )
    print(header)
    for shape in shapes:
        weight = random_weight(shape, seed=shape[0])
        for bits in bit_widths:
            ct_first, ct_warm, ct_dense = coreml_palettize(weight, bits)
            first_s, warm_s, dense = ours_palettize(weight, bits)
            ct_err, err = rel_mse(ct_dense, weight), rel_mse(dense, weight)
            print(
                f"{shape[0]:>5}x{shape[1]:<5} {bits:>4} {ct_warm:>9.2f} {ct_first:>7.2f} "
                f"{warm_s:>7.3f} {first_s:>7.3f} {ct_warm / warm_s:>8.1f}x "
                f"{ct_first / first_s:>6.1f}x {ct_err:>11.5e} {err:>10.5e} {err / ct_err:>9.5f}",
                flush=True,
            )


class WeightPool:
    """Random weights without paying for a fresh gaussian per matrix: MLX's normal sampler costs
    about as much per value as palettizing it. Each matrix is a random window of one gaussian pool,
    so every group still sees gaussian data (values repeat across layers, which k-means cannot
    notice or exploit)."""

    def __init__(self, size: int = 1 << 26, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        pool = self.rng.standard_normal(size, dtype=np.float32)
        pool *= 0.02
        self.pool = mx.array(pool.astype(np.float16))
        mx.eval(self.pool)

    def weight(self, rows: int, cols: int) -> mx.array:
        size, parts, got = rows * cols, [], 0
        while got < size:
            take = min(size - got, self.pool.size // 2)
            start = int(self.rng.integers(0, self.pool.size - take))
            parts.append(self.pool[start : start + take])
            got += take
        w = (mx.concatenate(parts) if len(parts) > 1 else parts[0]).reshape(rows, cols)
        mx.eval(w)
        return w


def bench_afm(layers: int, vocab: int, bits: int) -> None:
    print(
        f"\n== AFM-3B-shaped model, layer by layer: {layers} layers x 7 projections at {bits}-bit "
        f"group 16, embedding {vocab}x3072 8-bit per row =="
    )
    start = time.perf_counter()
    pool = WeightPool()
    gen_s, pal_s = time.perf_counter() - start, 0.0
    stored_bits = weights = 0
    by_name: dict[str, float] = {}
    for i in range(layers):
        for name, out_dims, in_dims in AFM_LAYER:
            t0 = time.perf_counter()
            linear = nn.Linear(in_dims, out_dims, bias=False)
            linear.weight = pool.weight(out_dims, in_dims)
            t1 = time.perf_counter()
            layer = PalettizedLinear.from_linear(linear, bits=bits, group_size=16)
            mx.eval(layer.packed, layer.lut)
            t2 = time.perf_counter()
            gen_s, pal_s = gen_s + t1 - t0, pal_s + t2 - t1
            by_name[name] = by_name.get(name, 0.0) + t2 - t1
            stored_bits += 8 * (layer.packed.nbytes + layer.lut.nbytes)
            weights += out_dims * in_dims
            del linear, layer
        print(f"  layer {i + 1}/{layers}: {time.perf_counter() - start:.1f}s elapsed", flush=True)
    linear_bpw = stored_bits / weights
    t0 = time.perf_counter()
    embedding = nn.Embedding(vocab, 3072)
    embedding.weight = pool.weight(vocab, 3072)
    t1 = time.perf_counter()
    palettized = PalettizedEmbedding.from_embedding(embedding)
    mx.eval(palettized.packed, palettized.lut)
    t2 = time.perf_counter()
    gen_s, pal_s = gen_s + t1 - t0, pal_s + t2 - t1
    stored_bits += 8 * (palettized.packed.nbytes + palettized.lut.nbytes)
    weights += vocab * 3072
    total = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    per_layer = ", ".join(f"{n} {s / layers:.2f}s" for n, s in by_name.items())
    print(f"  per projection (mean): {per_layer}; embedding {t2 - t1:.1f}s")
    print(
        f"  wall {total:.1f}s = palettize {pal_s:.1f}s + random weights {gen_s:.1f}s; "
        f"{weights / 1e9:.2f}B weights; bits/weight: projections {linear_bpw:.3f}, "
        f"all {stored_bits / weights:.3f}; peak RSS {peak_gb:.1f} GB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3072x3072 only and 2 AFM layers")
    parser.add_argument("--skip-matrices", action="store_true", help="skip the coremltools part")
    parser.add_argument("--skip-afm", action="store_true", help="skip the AFM-3B part")
    parser.add_argument("--afm-bits", type=int, default=4, help="projection bits for AFM-3B")
    args = parser.parse_args()
    print(backend_report())
    if not args.skip_matrices:
        shapes = [(3072, 3072)] if args.quick else [(8192, 3072), (3072, 3072)]
        bench_matrices(shapes, [4, 2])
    if not args.skip_afm:
        layers, vocab = (2, 4096) if args.quick else (26, 49152)
        bench_afm(layers, vocab, args.afm_bits)


if __name__ == "__main__":
    main()
