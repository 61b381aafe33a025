"""The training loop every training command shares (``train``, ``recover``, ``finetune``).

``OptimConfig`` holds the options they have in common, ``build_optimizer`` AdamW with warmup +
cosine (restored from a checkpoint when resuming), ``Trainer`` the compiled optimizer step
(gradient accumulation and clipping), and ``run_loop`` the step loop with logging, evaluation and
checkpoints at a resumable data position.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from afm_mlx.core.errors import UserError
from afm_mlx.core.fileio import atomic_write_text
from afm_mlx.data.batches import DataPosition, PackedDataset, eval_batches, train_batches
from afm_mlx.training.blockwise import blockwise_value_and_grad
from afm_mlx.training.checkpoint import restore_optimizer
from afm_mlx.training.losses import nll_sum
from afm_mlx.training.report import plot_losses
from afm_mlx.training.world import World


@dataclass
class OptimConfig:
    """Optimization, evaluation and checkpoint options of every training stage (train, recover,
    finetune); each stage's config extends it and may change the defaults."""

    max_steps: int = field(default=300, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "sequences per micro-batch"})
    seq_len: int = field(default=128, metadata={"help": "tokens per sequence"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    learning_rate: float = field(default=2e-3, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final lr as a fraction of peak"})
    warmup_steps: int = field(default=30, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decay (matrices only)"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    grad_clip: float = field(default=1.0, metadata={"help": "global gradient-norm clip (0: off)"})
    valid_fraction: float = field(default=0.05, metadata={"help": "held-out share of the data"})
    eval_every: int = field(default=50, metadata={"help": "steps between evaluations"})
    eval_batches: int = field(default=20, metadata={"help": "validation batches (0: all)"})
    save_every: int = field(default=100, metadata={"help": "steps between checkpoints"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept on disk"})
    log_every: int = field(default=10, metadata={"help": "steps between metric log lines"})
    seed: int = field(default=0, metadata={"help": "seed for init and data order"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    grad_checkpoint: bool = field(
        default=False,
        metadata={"help": "recompute each block's activations in the backward pass (less memory)"},
    )

    def validate(self) -> None:
        positive = ["max_steps", "batch_size", "seq_len", "grad_accum", "eval_every", "save_every"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive")
        if not 0 <= self.valid_fraction < 1:
            raise UserError("--valid-fraction must be in [0, 1)")
        if self.learning_rate <= 0:
            raise UserError("--learning-rate must be positive")


_CHECKPOINTED: dict[type, type] = {}


def make_optimizer(cfg: OptimConfig) -> optim.Optimizer:
    """AdamW, decoupled decay on matrices only (norm gains are not decayed), warmup + cosine."""
    warmup = min(cfg.warmup_steps, cfg.max_steps)
    decay_steps = max(1, cfg.max_steps - warmup)
    cosine = optim.cosine_decay(
        cfg.learning_rate, decay_steps, cfg.learning_rate * cfg.min_lr_ratio
    )
    if warmup > 0:
        schedule = optim.join_schedules(
            [optim.linear_schedule(cfg.learning_rate / warmup, cfg.learning_rate, warmup), cosine],
            [warmup],
        )
    else:
        schedule = cosine

    def adamw(wd: float) -> optim.AdamW:
        return optim.AdamW(schedule, betas=[cfg.beta1, cfg.beta2], weight_decay=wd)

    return optim.MultiOptimizer(
        [adamw(cfg.weight_decay), adamw(0.0)], [lambda path, w: w.ndim >= 2]
    )


class Trainer:
    """Owns the model, optimizer, compiled steps and the data position of one run."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: optim.Optimizer,
        loss_fn: Callable,
        grad_accum: int,
        grad_clip: float,
        extra_state: list | None = None,
        world: World | None = None,
        teacher_outputs: Callable[[mx.array], mx.array] | None = None,
        blockwise: bool = False,
    ):
        """``teacher_outputs(inputs)``, when given, is computed before each micro-batch's
        compiled step, outside it, and passed to ``loss_fn(model, inputs, targets, outputs)``:
        a teacher too large to hold can then run block by block (``models.streaming.streamed_logits``).
        ``blockwise``: gradients one block at a time (``blockwise_value_and_grad``), eagerly;
        only the optimizer update is compiled."""
        self.model = model
        self.teacher_outputs = teacher_outputs
        self.optimizer = optimizer
        self.grad_accum = grad_accum
        self.grad_clip = grad_clip
        self.world = world = world or World()
        if blockwise:
            local_value_and_grad = blockwise_value_and_grad(model, loss_fn)
        else:
            local_value_and_grad = nn.value_and_grad(model, loss_fn)
        state = [model.state, optimizer.state, mx.random.state, *(extra_state or [])]

        def value_and_grad(model, inputs, targets, *extra):
            """Loss and gradients of the global batch: each rank's weighted by its share of the
            target tokens, so that masked (task) data combine exactly as in one process."""
            loss, grads = local_value_and_grad(model, inputs, targets, *extra)
            if world.size == 1:
                return loss, grads
            weight = (targets >= 0).sum().astype(mx.float32)
            total = mx.distributed.all_sum(weight, group=world.group)
            share = weight * world.size / total  # average_gradients divides by the size
            grads = nn.average_gradients(tree_map(lambda g: g * share, grads), group=world.group)
            loss = mx.distributed.all_sum(loss * weight, group=world.group) / total
            return loss, grads

        def update(grads):
            if grad_clip > 0:
                grads, norm = optim.clip_grad_norm(grads, grad_clip)
            else:
                norm = mx.sqrt(
                    sum(mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grads))
                )
            optimizer.update(model, grads)
            return norm

        compiled = partial(mx.compile, inputs=state, outputs=state)
        step_compiled = (lambda f: f) if blockwise else compiled

        @compiled
        def apply(acc):
            return update(tree_map(lambda g: g / grad_accum, acc))

        @step_compiled
        def full_step(inputs, targets, *extra):
            loss, grads = value_and_grad(model, inputs, targets, *extra)
            return loss, apply(grads) if blockwise else update(grads)

        @step_compiled
        def accumulate(inputs, targets, acc, *extra):
            loss, grads = value_and_grad(model, inputs, targets, *extra)
            return loss, tree_map(mx.add, acc, grads)

        self._full_step, self._accumulate, self._apply = full_step, accumulate, apply

    def _extra(self, batch: mx.array) -> tuple[mx.array, ...]:
        return () if self.teacher_outputs is None else (self.teacher_outputs(batch[:, :-1]),)

    def step(self, micro_batches: list[np.ndarray]) -> tuple[mx.array, mx.array]:
        """One optimizer step over ``grad_accum`` micro-batches; returns (mean loss, grad norm)."""
        if self.grad_accum == 1:
            batch = mx.array(micro_batches[0])
            return self._full_step(batch[:, :-1], batch[:, 1:], *self._extra(batch))
        acc = tree_map(mx.zeros_like, self.model.trainable_parameters())
        total = mx.array(0.0)
        for b in micro_batches:
            batch = mx.array(b)
            loss, acc = self._accumulate(batch[:, :-1], batch[:, 1:], acc, *self._extra(batch))
            total = total + loss
        return total / len(micro_batches), self._apply(acc)


def build_optimizer(
    cfg: OptimConfig, model: nn.Module, opt_state: dict[str, mx.array] | None = None
) -> optim.Optimizer:
    """``make_optimizer`` initialized on the model's trainable parameters, restored from a
    checkpoint's flat ``opt_state`` when resuming."""
    optimizer = make_optimizer(cfg)
    optimizer.init(model.trainable_parameters())
    if opt_state is not None:
        restore_optimizer(optimizer, opt_state)
        optimizer.init(model.trainable_parameters())  # no-op on a restored state; keeps the tree
    return optimizer


def run_loop(
    cfg: OptimConfig,
    out: Path,
    trainer: Trainer,
    data: tuple[PackedDataset, PackedDataset],
    state: dict[str, Any],
    save: Callable[[int, dict[str, Any]], Any],
    on_step: Callable[[int], None] | None = None,
    extra_metrics: Callable[[float], dict[str, float]] | None = None,
) -> dict[str, Any]:
    """The step loop of every training stage (train, recover, finetune) over ``data`` (train,
    held-out).

    Starts after ``state["step"]`` at data position (``epoch``, ``index``): a step above 0 is a
    resumed run, whose ``out/metrics.jsonl`` is rewritten from ``state["history"]`` (dropping
    lines the interrupted process logged after its last checkpoint). Logs there, evaluates on the
    held-out data, plots
    ``loss.png`` and calls ``save(step, {"epoch", "index", "history"})`` at each checkpoint.
    ``extra_metrics(tokens_per_s)`` adds fields to each log record. Returns the history and the
    measured training tokens/s (optimizer steps only: evaluation and checkpoints excluded).
    """
    from tqdm import tqdm

    model, optimizer, world = trainer.model, trainer.optimizer, trainer.world
    train_data, valid_data = data
    history: list[dict] = state.get("history", [])
    metrics_path = out / "metrics.jsonl"
    if state.get("step", 0) > 0 and world.main:
        atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in history))
    position = DataPosition(state.get("epoch", 0), state.get("index", 0))
    # The position counts global batches: a run resumes with any number of ranks.
    batches = train_batches(
        train_data, cfg.batch_size, cfg.seed, position, shard=(world.rank, world.size)
    )
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum

    def log(record: dict) -> None:
        history.append(record)
        if world.main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    start_step = state.get("step", 0)
    bar = tqdm(
        total=cfg.max_steps,
        initial=start_step,
        disable=not cfg.progress or not world.main,
        dynamic_ncols=True,
        unit="step",
    )
    window_tokens, window_start, losses = 0, time.perf_counter(), []
    train_time, train_tokens = 0.0, 0
    mx.reset_peak_memory()
    for step in range(start_step + 1, cfg.max_steps + 1):
        t0 = time.perf_counter()
        micro = []
        for _ in range(cfg.grad_accum):
            batch, position = next(batches)
            micro.append(batch)
        loss, grad_norm = trainer.step(micro)
        mx.eval(loss, grad_norm, model.trainable_parameters(), optimizer.state)
        train_time += time.perf_counter() - t0
        train_tokens += tokens_per_step
        losses.append(loss.item())
        window_tokens += tokens_per_step
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            tps = window_tokens / (time.perf_counter() - window_start)
            record = {
                "step": step,
                "loss": float(np.mean(losses)),
                "grad_norm": grad_norm.item(),
                "lr": float(optimizer.learning_rate.item()),
                "tokens_per_s": tps,
                **(extra_metrics(tps) if extra_metrics else {}),
            }
            log(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tps:.0f}")
            window_tokens, window_start, losses = 0, time.perf_counter(), []
        if len(valid_data) and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            model.eval()
            total, count = nll_sum(
                model, eval_batches(valid_data, cfg.batch_size, cfg.eval_batches)
            )
            model.train()
            val = total / max(count, 1)
            log({"step": step, "val_loss": val, "val_ppl": math.exp(min(val, 50))})
            if world.main:
                bar.write(f"step {step}: validation loss {val:.4f}, perplexity {math.exp(val):.2f}")
                plot_losses(history, out / "loss.png")
            window_start = time.perf_counter()
        if world.main and (step % cfg.save_every == 0 or step == cfg.max_steps):
            save(step, {"epoch": position.epoch, "index": position.index, "history": history})
            window_start = time.perf_counter()
        bar.update(1)
        if on_step is not None:
            on_step(step)
    bar.close()
    model.eval()
    peak = mx.get_peak_memory()
    if world.main:
        plot_losses(history, out / "loss.png")
    world.say(f"peak memory of the training steps: {peak / 1e9:.3f} GB per rank")
    return {
        "history": history,
        "tokens_per_s": train_tokens / train_time if train_time else float("nan"),
        "peak_memory": peak,
    }
