"""Decode speed and peak memory, like with like: ours vs mlx-lm on the same model, same loop.

    python scripts/bench_decode.py                          # random `small` preset (12.6M)
    python scripts/bench_decode.py --model runs/small --tokens 200 --rounds 3

Every variant runs in a fresh process (so its peak memory is its own), warm (a short generation
first), greedy, through mlx-lm's ``generate_step`` for ``--tokens`` tokens after the prompt;
rounds alternate the variants so drift on a shared machine hits all alike. Rows:

- mlx-lm fp32 / ours fp32: the dense model (same dtype);
- mlx-lm q4 g64: affine 4-bit of every projection and the embedding (``mlx_lm.convert -q``);
- ours LUT-4 kernel: 4-bit LUTs (16 rows per LUT) on the same layers as q4, by the LUT kernel;
- ours LUT-4 dequantize: the same model, ``--lut-kernel off`` (dequantize + GEMV per layer);
- ours LUT-4 dense cache: the same model with dense fp32 copies (compare with mlx-lm fp32);
- ours AFM recipe: 4-bit projections + AFM's 8-bit per-row embedding, by the kernel.

Then the kernel alone on 4096x4096 and 8192x3072 matrices at M = 1 and 4 (ours LUT-4 vs mlx's
q4 g64 ``quantized_matmul`` vs fp32 GEMV), in GB/s of stored weights against this machine's
measured memory read bandwidth. Bits per weight count everything stored (LUTs, scales, biases),
whole model and projections alone.
"""

# ruff: noqa: E402  (OpenBLAS must be loaded before mlx is imported)
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from afm_mlx.core.blas import preload_openblas

preload_openblas()

import mlx.core as mx
import mlx.nn as nn

from afm_mlx.core.blas import backend_report
from afm_mlx.models.files import save_model
from afm_mlx.models.io import load_model
from afm_mlx.models.presets import build_model, init_weights, preset_config
from afm_mlx.palettization import kernels
from afm_mlx.palettization.layers import (
    AFM_EMBEDDING_SETTINGS,
    PalettizedLinear,
    bits_per_weight,
    cache_dense_weights,
    palettize_model,
    palettized_layers,
)

PROMPT = list(range(3, 35))  # 32 prompt tokens: the decode speed is what is measured

VARIANTS = {
    "mlx-lm fp32": {"load": "mlx_lm", "model": "fp"},
    "ours fp32": {"load": "afm", "model": "fp"},
    "mlx-lm q4 g64": {"load": "q4", "model": "fp"},
    "ours LUT-4 kernel": {"load": "afm", "model": "lut4", "kernel": "on"},
    "ours LUT-4 dequantize": {"load": "afm", "model": "lut4", "kernel": "off"},
    "ours LUT-4 dense cache": {"load": "afm", "model": "lut4", "kernel": "off", "cache": True},
    "ours AFM recipe (8-bit emb)": {"load": "afm", "model": "afm", "kernel": "on"},
}
PEER = {  # the like-for-like peer of each row
    "ours fp32": "mlx-lm fp32",
    "ours LUT-4 kernel": "mlx-lm q4 g64",
    "ours LUT-4 dequantize": "mlx-lm q4 g64",
    "ours LUT-4 dense cache": "mlx-lm fp32",
    "ours AFM recipe (8-bit emb)": "mlx-lm q4 g64",
}


# --- one variant, in its own process ----------------------------------------------------------------


def _load(spec: dict, dirs: dict):
    from peers import affine_quantized

    if spec["load"] == "mlx_lm":
        from mlx_lm.utils import load_model as mlx_lm_load

        model, _ = mlx_lm_load(Path(dirs["fp"]))
        return model, 32.0, 32.0
    if spec["load"] == "q4":
        model, proj, whole = affine_quantized(Path(dirs["fp"]), 4)
        return model, proj, whole
    kernels.set_mode(spec.get("kernel", "auto"))
    model, _, _ = load_model(dirs[spec["model"]])
    if spec["model"] == "fp":
        return model, 32.0, 32.0
    projections = [m for _, m in palettized_layers(model) if isinstance(m, PalettizedLinear)]
    proj_bits = sum(8 * (m.packed.nbytes + m.lut.nbytes) for m in projections)
    proj_weights = sum(m.packed.shape[0] * m.input_dims for m in projections)
    if spec.get("cache"):
        cache_dense_weights(model, "on")
    return model, proj_bits / proj_weights, bits_per_weight(model)["model"]


def _decode(model, tokens: int) -> float:
    """Tokens/s of ``tokens`` greedy decode steps after the prompt (mlx-lm's loop and cache)."""
    from mlx_lm.generate import generate_step

    steps = generate_step(mx.array(PROMPT), model, max_tokens=tokens + 1, sampler=None)
    next(steps)  # the first token comes out of the prefill
    start = time.perf_counter()
    for _ in steps:
        pass
    return tokens / (time.perf_counter() - start)


def child(name: str, dirs: dict, tokens: int) -> None:
    model, proj_bpw, model_bpw = _load(VARIANTS[name], dirs)
    mx.eval(model.parameters())
    _decode(model, 16)  # warm: kernels checked, caches allocated
    weights = mx.get_active_memory()
    mx.reset_peak_memory()
    tps = _decode(model, tokens)
    print(
        json.dumps(
            {
                "tps": tps,
                "peak_mb": mx.get_peak_memory() / 1e6,
                "weights_mb": weights / 1e6,
                "proj_bpw": proj_bpw,
                "model_bpw": model_bpw,
            }
        )
    )


# --- the kernel alone ---------------------------------------------------------------------------


def _timed(fn, repeats: int = 30) -> float:
    for _ in range(3):
        mx.eval(fn())
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(fn())
    return (time.perf_counter() - start) / repeats


def memory_bandwidth() -> float:
    """Read bandwidth in GB/s: every core reducing its share of a 512 MiB float32 array (well
    beyond any cache; NumPy's reductions release the GIL), best of three."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    a = np.random.default_rng(0).random(128 * 1024 * 1024, dtype=np.float32)
    parts = np.array_split(a, os.cpu_count() or 1)
    best = float("inf")
    with ThreadPoolExecutor(len(parts)) as pool:
        for _ in range(3):
            start = time.perf_counter()
            list(pool.map(np.max, parts))
            best = min(best, time.perf_counter() - start)
    return a.nbytes / best / 1e9


def kernel_table() -> None:
    bandwidth = memory_bandwidth()
    print(f"\nthe kernel alone (this machine's memory read bandwidth: {bandwidth:.1f} GB/s)")
    print(
        f"{'matrix':<12} {'M':>2} {'LUT-4 us':>9} {'GB/s':>6} {'q4 us':>9} {'fp32 us':>9}  ratios"
    )
    for n, k in ((4096, 4096), (8192, 3072)):
        linear = nn.Linear(k, n, bias=False)
        lut = PalettizedLinear.from_linear(linear, bits=4, group_size=16)
        w, scales, biases = mx.quantize(linear.weight.astype(mx.float16), group_size=64, bits=4)
        scales, biases, dense = scales.astype(mx.float32), biases.astype(mx.float32), linear.weight
        mx.eval(lut.parameters(), w, scales, biases, dense)
        stored = lut.packed.nbytes + lut.lut.nbytes
        for m in (1, 4):
            x = mx.random.normal((m, k))
            with kernels.using("on"):
                ours = _timed(lambda: lut(x))  # noqa: B023
            q4 = _timed(lambda: mx.quantized_matmul(x, w, scales, biases, True, 64, 4))  # noqa: B023
            fp = _timed(lambda: x @ dense.T)  # noqa: B023
            gbs = stored / ours / 1e9
            print(
                f"{n}x{k:<7} {m:>2} {ours * 1e6:9.0f} {gbs:6.1f} {q4 * 1e6:9.0f} {fp * 1e6:9.0f}"
                f"  {q4 / ours:.2f}x q4, {fp / ours:.2f}x fp32; {100 * gbs / bandwidth:.0f}% of "
                "bandwidth"
            )


# --- the parent -----------------------------------------------------------------------------------


def prepare(work: Path, model_dir: str | None) -> dict:
    """The fp checkpoint and its two palettized versions."""
    if model_dir:
        fp = Path(model_dir)
        if not (fp / "config.json").is_file():
            sys.exit(f"error: --model {fp}: no checkpoint (python -m afm_mlx.train makes one)")
    else:
        config = preset_config("small")
        model = build_model(config)
        init_weights(model, config, seed=0)
        fp = save_model(work / "fp", model, config)
    dirs = {"fp": str(fp)}
    for name, embedding in (("lut4", {"bits": 4, "group_size": 16, "axis": 0}),
                            ("afm", dict(AFM_EMBEDDING_SETTINGS))):  # fmt: skip
        model, config, _ = load_model(fp)
        chosen = palettize_model(
            model,
            class_predicate=lambda p, m, e=embedding: e if isinstance(m, nn.Embedding) else True,
        )
        out = save_model(work / name, model, {**config, "palettization": {"layers": chosen}})
        dirs[name] = str(out)
    return dirs


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="fp checkpoint (default: a random `small` preset)")
    ap.add_argument("--tokens", type=int, default=200, help="decode steps timed per run")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds over the variants")
    ap.add_argument("--only", nargs="+", choices=list(VARIANTS), help="run these variants only")
    ap.add_argument("--no-kernel-table", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--dirs", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, json.loads(args.dirs), args.tokens)
        return

    print(backend_report())
    print(kernels.describe())
    names = args.only or list(VARIANTS)
    results: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="bench_decode_") as tmp:
        dirs = prepare(Path(tmp), args.model)
        print(f"model {dirs['fp']}; {args.tokens} greedy tokens per run, {args.rounds} rounds\n")
        for r in range(args.rounds):
            for name in names:
                cmd = [sys.executable, __file__, "--child", name, "--dirs", json.dumps(dirs)]
                cmd += ["--tokens", str(args.tokens)]
                root = str(Path(__file__).resolve().parents[1])
                path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
                env = {**os.environ, "PYTHONPATH": path}
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    sys.exit(f"error: {name} failed:\n{proc.stderr[-2000:]}")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                results[name].append(row)
                print(f"  round {r + 1}: {name:<28} {row['tps']:8.1f} tok/s", flush=True)

    print(
        f"\n{'variant':<28} {'model bpw':>9} {'proj bpw':>8} {'tok/s':>8} {'(range)':>15} "
        f"{'peak MB':>8} {'weights MB':>10}  vs peer (tok/s, peak memory)"
    )
    median = {n: statistics.median(r["tps"] for r in rows) for n, rows in results.items()}
    peak = {n: max(r["peak_mb"] for r in rows) for n, rows in results.items()}
    for name, rows in results.items():
        lo, hi = min(r["tps"] for r in rows), max(r["tps"] for r in rows)
        peer = PEER.get(name)
        versus = ""
        if peer in median:
            versus = f"{median[name] / median[peer]:.2f}x, {peak[name] / peak[peer]:.2f}x {peer}"
        print(
            f"{name:<28} {rows[0]['model_bpw']:9.2f} {rows[0]['proj_bpw']:8.2f} "
            f"{median[name]:8.1f} {f'({lo:.1f}-{hi:.1f})':>15} {peak[name]:8.1f} "
            f"{rows[0]['weights_mb']:10.1f}  {versus}"
        )
    if not args.no_kernel_table:
        kernel_table()


if __name__ == "__main__":
    main()
