"""Training throughput: afm_mlx's trainer vs mlx-lm's trainer (full fine-tune), side by side.

Same model config and initial weights, same batch size and sequence length, same AdamW settings,
in one process. mlx-lm's number is its own ``tokens_per_second`` report (which excludes batch
preparation); ours is wall time over whole steps, batch preparation included.

    python scripts/bench_train.py [--preset small] [--batch-size 16] [--seq-len 128] [--steps 30]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from afm_mlx.core.blas import preload_openblas

preload_openblas()

import mlx.core as mx  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.tuner.trainer import TrainingArgs, TrainingCallback  # noqa: E402
from mlx_lm.tuner.trainer import train as mlx_lm_train  # noqa: E402

from afm_mlx.core.blas import backend_report  # noqa: E402
from afm_mlx.data.batches import DataPosition, PackedDataset, train_batches  # noqa: E402
from afm_mlx.models.presets import build_model, init_weights, preset_config  # noqa: E402
from afm_mlx.train import TrainConfig  # noqa: E402
from afm_mlx.training.loop import Trainer, build_optimizer  # noqa: E402
from afm_mlx.training.losses import make_loss  # noqa: E402


def fresh_model(config: dict, seed: int = 0):
    model = build_model(config)
    init_weights(model, config, seed)
    mx.eval(model.parameters())
    model.train()
    return model


def bench_ours(config, tokens, args) -> float:
    model = fresh_model(config)
    cfg = TrainConfig(max_steps=args.warmup + args.steps, warmup_steps=5, learning_rate=1e-3)
    optimizer = build_optimizer(cfg, model)
    trainer = Trainer(model, optimizer, make_loss(), 1, cfg.grad_clip)
    data = PackedDataset(tokens, args.seq_len)
    batches = train_batches(data, args.batch_size, 0, DataPosition())
    for _ in range(args.warmup):
        loss, norm = trainer.step([next(batches)[0]])
        mx.eval(loss, norm, model.parameters(), optimizer.state)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss, norm = trainer.step([next(batches)[0]])
        mx.eval(loss, norm, model.parameters(), optimizer.state)
    elapsed = time.perf_counter() - start
    return args.steps * args.batch_size * args.seq_len / elapsed


class _Reports(TrainingCallback):
    def __init__(self):
        self.reports = []

    def on_train_loss_report(self, info):
        self.reports.append(info)


def bench_mlx_lm(config, tokens, args) -> float:
    model = fresh_model(config)
    optimizer = optim.AdamW(learning_rate=1e-3, betas=[0.9, 0.95], weight_decay=0.1)
    n = args.seq_len + 1
    # mlx-lm datasets yield (tokens, prompt offset); offset 0 trains on every token.
    dataset = [(tokens[i * args.seq_len : i * args.seq_len + n].tolist(), 0) for i in range(512)]
    reports = _Reports()
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArgs(
            batch_size=args.batch_size,
            iters=args.warmup + args.steps,
            steps_per_report=args.warmup,
            steps_per_eval=10**9,
            steps_per_save=10**9,
            max_seq_length=n,
            adapter_file=str(Path(tmp) / "adapters.safetensors"),
        )
        mlx_lm_train(model, optimizer, dataset, None, args=targs, training_callback=reports)
    # The first report covers the warm-up (compilation); the rest are steady state.
    steady = [r for r in reports.reports if r["iteration"] > args.warmup]
    return float(np.mean([r["tokens_per_second"] for r in steady]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    args.steps = (args.steps // args.warmup) * args.warmup  # whole mlx-lm report windows

    print(backend_report())
    config = preset_config(args.preset)
    n_params = sum(p.size for _, p in tree_flatten(build_model(config).parameters()))
    print(
        f"model: {args.preset} ({n_params / 1e6:.1f}M params), batch {args.batch_size} x "
        f"seq {args.seq_len}, {args.steps} timed steps after {args.warmup} warm-up"
    )
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, config["vocab_size"], 600 * (args.seq_len + 1)).astype(np.uint16)
    ours, theirs = [], []
    for r in range(args.rounds):  # interleaved, so drift in machine load hits both sides
        ours.append(bench_ours(config, tokens, args))
        theirs.append(bench_mlx_lm(config, tokens, args))
        print(f"round {r + 1}: afm_mlx {ours[-1]:,.0f} tok/s   mlx-lm {theirs[-1]:,.0f} tok/s")
    best_ours, best_theirs = max(ours), max(theirs)
    print(f"afm_mlx train step: {best_ours:,.0f} tokens/s")
    print(f"mlx-lm trainer:     {best_theirs:,.0f} tokens/s")
    print(f"ratio (afm_mlx / mlx-lm): {best_ours / best_theirs:.2f}x")


if __name__ == "__main__":
    main()
