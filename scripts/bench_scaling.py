"""Data-parallel scaling on this host: tokens/s with 1 vs 2 ranks, and the communication share.

    python scripts/bench_scaling.py                 # small preset, global batch 16 x 128
    python scripts/bench_scaling.py --preset tiny --steps 20 --batch-size 8

Each configuration is a fresh launch (``mlx.launch -n 2 --backend ring`` for two ranks) of the
same training step afm_mlx uses (``afm_mlx.training.loop.Trainer``: token-weighted gradient averaging
across ranks, clipping, AdamW) on the same global batch. Per rank it times ``--steps`` warm steps,
then ``--steps`` gradient all-reduces alone (the same tree of gradients through
``nn.average_gradients``): their ratio is the communication share of a step. Peer: the 1-rank
run of the same step. On a 2-core machine two ranks share the cores, so expect little gain; on
two Macs (Thunderbolt ring or jaccl RDMA) the compute halves and the all-reduce is what remains.
"""

# ruff: noqa: E402  (OpenBLAS must be loaded before mlx is imported)
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from afm_mlx.core.blas import preload_openblas

preload_openblas()

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map


def worker(args: argparse.Namespace) -> None:
    """One rank: time training steps, then the gradient all-reduce alone."""
    from afm_mlx.models.presets import build_model, init_weights, preset_config
    from afm_mlx.training.loop import OptimConfig, Trainer, build_optimizer
    from afm_mlx.training.losses import make_loss
    from afm_mlx.training.world import init_world

    world = init_world()
    config = preset_config(args.preset)
    model = build_model(config)
    init_weights(model, config, 0)
    model.train()
    cfg = OptimConfig(batch_size=args.batch_size, seq_len=args.seq_len)
    optimizer = build_optimizer(cfg, model)
    trainer = Trainer(model, optimizer, make_loss(), 1, 1.0, world=world)
    per_rank = args.batch_size // world.size
    rng = np.random.default_rng(world.rank)
    batches = [
        rng.integers(0, config["vocab_size"], (per_rank, args.seq_len + 1)).astype(np.int32)
        for _ in range(4)
    ]

    def steps(n: int) -> float:
        start = time.perf_counter()
        for i in range(n):
            loss, norm = trainer.step([batches[i % len(batches)]])
            mx.eval(loss, norm, model.parameters(), optimizer.state)
        return time.perf_counter() - start

    steps(3)  # warm: compile, allocate
    world.barrier()
    step_time = steps(args.steps) / args.steps
    comm_time = 0.0
    if world.size > 1:
        grads = tree_map(lambda p: mx.ones_like(p), model.trainable_parameters())
        mx.eval(grads)
        reduce = mx.compile(lambda g: nn.average_gradients(g, group=world.group))
        mx.eval(reduce(grads))
        world.barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            mx.eval(reduce(grads))
        comm_time = (time.perf_counter() - start) / args.steps
    if world.main:
        print(
            json.dumps(
                {
                    "ranks": world.size,
                    "step_s": step_time,
                    "tokens_per_s": args.batch_size * args.seq_len / step_time,
                    "comm_s": comm_time,
                    "peak_memory_gb": mx.get_peak_memory() / 1e9,
                }
            ),
            flush=True,
        )


def launch(ranks: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--preset", args.preset, "--steps",
           str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]  # fmt: skip
    if ranks > 1:
        launcher = shutil.which("mlx.launch")
        if launcher is None:
            raise SystemExit("mlx.launch not found (it comes with the mlx package)")
        cmd = [launcher, "-n", str(ranks), "--backend", "ring", "--", *cmd]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # Ranks on one host share its cores: each BLAS gets its share, not all of them (with all of
    # them, 2 ranks on 2 cores run 4 BLAS threads and thrash).
    threads = str(max(1, (os.cpu_count() or 1) // ranks))
    env.update(OPENBLAS_NUM_THREADS=threads, OMP_NUM_THREADS=threads)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"{ranks}-rank run failed: {out.stderr[-2000:]}")
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16, help="global batch")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    from afm_mlx.core.blas import backend_report

    print(backend_report(), f"| {os.cpu_count()} CPU cores", flush=True)
    print(
        f"preset {args.preset}, global batch {args.batch_size} x {args.seq_len} tokens, "
        f"{args.steps} timed steps per run",
        flush=True,
    )
    results = {}
    for ranks in (1, 2):
        r = results[ranks] = launch(ranks, args)
        share = ""
        if ranks > 1:
            share = (
                f", all-reduce {1000 * r['comm_s']:.1f} ms = "
                f"{100 * r['comm_s'] / r['step_s']:.0f}% of a step"
            )
        print(
            f"{ranks} rank(s): {r['tokens_per_s']:8.0f} tokens/s, step {1000 * r['step_s']:.1f} ms"
            f"{share}, peak {r['peak_memory_gb']:.3f} GB per rank",
            flush=True,
        )
    ratio = results[2]["tokens_per_s"] / results[1]["tokens_per_s"]
    print(f"2 ranks / 1 rank: {ratio:.2f}x tokens/s", flush=True)


if __name__ == "__main__":
    main()
