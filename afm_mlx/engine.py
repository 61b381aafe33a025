"""The training engine every training stage shares (``train``, ``recover``, ``finetune``).

``OptimConfig`` holds the options they have in common, ``check_run_dir`` the rules for a run
folder (never clobber another run; resume only what matches), ``build_optimizer`` AdamW with
warmup + cosine (restored from a checkpoint when resuming), ``Trainer`` the compiled
optimizer step (gradient accumulation and clipping), and ``run_loop`` the step loop with logging,
evaluation and checkpoints at a resumable data position.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from afm_mlx.checkpoint import latest_checkpoint, restore_optimizer
from afm_mlx.data import DataPosition, PackedDataset, eval_batches, train_batches
from afm_mlx.errors import UserError
from afm_mlx.fileio import atomic_write_text, output_lock, read_json
from afm_mlx.losses import nll_sum
from afm_mlx.report import plot_losses

RUN_FILE = "run.json"
# Options that may change when a run is resumed; every other option must match the original.
RESUMABLE_CHANGES = {
    "resume",
    "max_steps",
    "eval_every",
    "save_every",
    "eval_batches",
    "sample_tokens",
    "sample_prompt",
    "log_every",
    "keep_checkpoints",
    "progress",
    "grad_checkpoint",
    "blockwise",
    "dry_run",
}


@dataclass(frozen=True)
class World:
    """The processes training together (``mlx.launch``), or just this one.

    Data parallelism: every rank holds the whole model, reads its own slice of each global batch,
    and the gradients are combined across ranks before the (identical) optimizer step; rank 0
    alone writes checkpoints, logs, plots and the final model.
    """

    group: Any = None  # mx.distributed.Group, None when alone
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def say(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on rank 0 only."""
        if self.main:
            print(*args, **kwargs, flush=True)

    def barrier(self) -> None:
        if self.size > 1:
            mx.eval(mx.distributed.all_sum(mx.array(1.0), group=self.group))

    def check_agreement(self, parts: dict[str, Callable[[], str]]) -> None:
        """Refuse to start unless every rank computed the same value of each part (e.g. config,
        data, model). All ranks take part in one ``all_gather``, even a rank whose part failed
        (its error is what it reports), so a disagreement is one line on every rank, not a hang.
        """
        if self.size == 1:
            return
        digests, errors = [], {}
        for name, compute in parts.items():
            try:
                value = compute()
            except UserError as e:
                errors[name] = str(e)
                value = f"error on rank {self.rank}: {e}"
            digests.append(np.frombuffer(hashlib.sha256(value.encode()).digest(), np.uint8))
        mine = mx.array(np.concatenate(digests))
        try:
            everyone = np.array(mx.distributed.all_gather(mine[None], group=self.group))
        except RuntimeError as e:  # a rank stopped before the check (its own error says why)
            raise UserError(
                f"rank {self.rank} of {self.size}: lost the other ranks before starting ({e}); "
                "see the first error above"
            ) from None
        everyone = everyone.reshape(self.size, len(parts), 32)
        differ = [
            name
            for i, name in enumerate(parts)
            if any((everyone[r, i] != everyone[0, i]).any() for r in range(self.size))
        ]
        if errors:
            raise UserError(f"rank {self.rank}: {next(iter(errors.values()))}")
        if differ:
            raise UserError(
                f"rank {self.rank} of {self.size}: the ranks do not agree on the "
                f"{' and '.join(differ)}; start every rank with the same flags, data and model"
            )


def init_world() -> World:
    """This process's ``World``: the ``mlx.launch`` group, or a world of one."""
    if not mx.distributed.is_available():
        return World()
    group = mx.distributed.init()
    return World(group, group.rank(), group.size()) if group.size() > 1 else World()


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


@contextmanager
def locked_run(cfg: Any, world: World | None = None) -> Iterator[None]:
    """Validate ``cfg`` and hold the lock on its run folder (``cfg.out``) for the block: a second
    process training into the same folder is refused with one line. Of a data-parallel world
    only rank 0 writes, so only rank 0 holds it; the batch must split evenly over the ranks."""
    cfg.validate()
    world = world or World()
    if cfg.batch_size % world.size:
        raise UserError(
            f"--batch-size {cfg.batch_size} is the global batch: it must divide evenly over the "
            f"{world.size} ranks"
        )
    if not world.main:
        yield
        return
    with output_lock(cfg.out):
        yield


def check_run_dir(cfg: Any) -> tuple[Path, Path | None]:
    """Refuse to clobber another run or foreign files; returns (run folder, checkpoint to resume).

    Writes nothing, so a refused start leaves the folder exactly as it was.
    """
    out = Path(cfg.out)
    run_file = out / RUN_FILE
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if run_file.is_file():
        previous = read_json(run_file, "run description").get("config", {})
        current = dataclasses.asdict(cfg)
        diffs = [
            f"{k}: {previous.get(k)!r} -> {v!r}"
            for k, v in current.items()
            if k not in RESUMABLE_CHANGES and previous.get(k) != v
        ]
        if diffs:
            raise UserError(f"--out {out}: holds a different run ({'; '.join(diffs)})")
        ckpt = latest_checkpoint(out)
        if ckpt is not None and not cfg.resume:
            raise UserError(
                f"--out {out}: already holds a training run (at {ckpt.name}); pass --resume to "
                "continue it or choose another --out"
            )
        return out, ckpt
    if cfg.resume:
        raise UserError(f"--resume: {out} holds no run to resume")
    if out.exists() and any(out.iterdir()):
        raise UserError(
            f"--out {out}: folder is not empty and holds no afm_mlx run; choose another"
        )
    return out, None


ALLOCATOR_MARGIN = 1.10  # measured peaks run ~10% over the sum of the parts (buffers in flight)


def device_memory() -> int:
    """Bytes of memory the default device can use (unified memory on a Mac, RAM elsewhere)."""
    info = getattr(mx, "device_info", None)
    if info is not None:
        try:
            size = int(info().get("memory_size", 0))
            if size:
                return size
        except Exception:  # a backend without device_info: fall back to the RAM size
            pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def plan_memory(
    config: dict[str, Any],
    batch_per_rank: int,
    seq_len: int,
    dtype_bytes: int,
    grad_checkpoint: bool,
    trainable: int | None = None,
) -> dict[str, float]:
    """Estimated peak memory (bytes) of one training rank, without allocating the model.

    Weights, gradients and AdamW's two moments are exact from the shapes (``trainable``
    parameters: all unless given). Activations kept for the backward pass, per token and layer:
    the attention block's inputs, norms, q/k/v before and after their norms and RoPE, its output
    and residual; the attention scores and probabilities (heads x sequence); the MLP's norm,
    gate, up, SiLU, product and output; plus the logits, their exponentials and gradient (fp32).
    With ``grad_checkpoint`` only each block's input is kept, and one block's activations are
    live at a time. Calibrated on the ``small`` preset (tests/test_distributed.py measures it).
    """
    from afm_mlx.families import standard_config
    from afm_mlx.model import count_parameters

    counts = count_parameters(config)
    total = counts["total"]
    trainable = total if trainable is None else trainable
    config = standard_config(config)
    d, n = config["hidden_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads", 0)
    kv = kv or heads
    hd = config.get("head_dim") or d // heads
    f, vocab = config["intermediate_size"], config["vocab_size"]
    tokens = batch_per_rank * seq_len
    per_token_layer = 4 * d + 3 * heads * hd + 4 * kv * hd + heads * hd  # attention block
    per_token_layer += 2 * heads * seq_len  # scores and probabilities
    per_token_layer += 2 * d + 4 * f + d  # MLP block
    layer_bytes = tokens * per_token_layer * dtype_bytes
    if grad_checkpoint:
        activations = n * tokens * d * dtype_bytes + layer_bytes
    else:
        activations = n * layer_bytes
    activations += 3 * tokens * vocab * 4  # logits (fp32), exps, their gradient
    parts = {
        "parameters": float(total),
        "weights": float(total * dtype_bytes),
        "gradients": float(trainable * dtype_bytes),
        "optimizer": float(2 * trainable * dtype_bytes),
        "activations": float(activations),
    }
    parts["total"] = ALLOCATOR_MARGIN * sum(
        parts[k] for k in ("weights", "gradients", "optimizer", "activations")
    )
    return parts


_CHECKPOINTED: dict[type, type] = {}


def use_grad_checkpoint(model: nn.Module) -> int:
    """Recompute each transformer block's activations in the backward pass instead of keeping
    them (``mx.checkpoint``): activation memory falls from all layers' to one layer's plus each
    block's input. Only these blocks change (their class is swapped for a subclass; parameter
    names stay), so other models of the same family in the process are untouched. Returns the
    number of blocks."""
    layers = list(getattr(model, "layers", []))
    for layer in layers:
        cls = type(layer)
        if cls not in _CHECKPOINTED:
            call = cls.__call__

            def checkpointed(self, *args, _call=call, **kwargs):
                def inner(params, *args, **kwargs):
                    self.update(params)
                    return _call(self, *args, **kwargs)

                return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

            _CHECKPOINTED[cls] = type(
                f"Checkpointed{cls.__name__}", (cls,), {"__call__": checkpointed}
            )
        if cls not in _CHECKPOINTED.values():
            layer.__class__ = _CHECKPOINTED[cls]
    return len(layers)


class _StopPass(Exception):
    """Ends a pass at the LM head (what follows is computed separately)."""


class _StandIn:
    """Stands in for a block or the LM head during a blockwise step's passes: its calls go to
    ``run(module, x, ...)`` (a tied head's embedding lookups still go to the embedding)."""

    def __init__(self, module: nn.Module, run: Callable, tied_head: bool = False):
        self.module, self.run, self.tied_head = module, run, tied_head

    def __getattr__(self, name: str):  # a model may read its blocks' settings (use_sliding, ...)
        return getattr(self.module, name)

    def __call__(self, x, *args, **kwargs):
        if self.tied_head:
            return self.module(x, *args, **kwargs)
        return self.run(self.module, x, *args, **kwargs)

    def as_linear(self, x: mx.array) -> mx.array:
        return self.run(self.module, x)


@contextmanager
def _stand_ins(model: nn.Module, blocks: list[Callable], head: Callable):
    """Inside: the model's blocks call ``blocks[i]`` and its LM head ``head``."""
    layers, tied = model.model.layers, "lm_head" not in model
    owner, key = (model.model, "embed_tokens") if tied else (model, "lm_head")
    originals, original_head = list(layers), owner[key]
    try:
        for i, run in enumerate(blocks):
            layers[i] = _StandIn(originals[i], run)
        owner[key] = _StandIn(original_head, head, tied)
        yield
    finally:
        for i, block in enumerate(originals):
            layers[i] = block
        owner[key] = original_head


def blockwise_unsupported(model: nn.Module) -> str | None:
    """Why ``blockwise_value_and_grad`` cannot train ``model`` (None when it can): its blocks
    must form one chain (each block's output is the next one's input, as the families that
    replay blocks guarantee) and every trainable parameter must live in a block."""
    from afm_mlx.families import model_family

    if not model_family(model).replay_blocks:
        return f"{model.model_type} blocks read caches earlier blocks fill during the pass"
    outside = [
        name
        for name, _ in tree_flatten(model.trainable_parameters())
        if not name.startswith("model.layers.")
    ]
    if outside:
        return f"trainable parameters outside the blocks ({outside[0]}, ...)"
    return None


def blockwise_value_and_grad(model: nn.Module, loss_fn: Callable) -> Callable:
    """``nn.value_and_grad(model, loss_fn)`` computed a block (and a slice of the LM head) at a
    time, so that only that part's working memory is alive: a palettized model decodes each
    weight when it runs, and one evaluation of a whole training step decodes its
    vocabulary-sized head whole (Qwen3-0.6B's tied 151936 x 1024 table: 0.6 GB in float32)
    with many blocks' weights beside it. Measured on Qwen3-0.6B at 4 bits, one 64-token
    sequence: 1.75 GB of peak MLX memory for the whole step, 0.62-0.66 GB this way, 1.2-1.4x
    the time (the small demo model: 1.2x, 0.40 against 0.59 GB).

    1. A forward pass runs and evaluates each block in turn, keeping its input and call
       arguments (block ``i`` draws its random numbers, LoRA dropout, after
       ``mx.random.seed(base + i)``, ``base`` drawn from the random stream: MLX offers no way
       to put a saved key back), and stops at the head, keeping its input;
    2. the logits, one slice of the head at a time (``model.head_slices``); the loss and its
       gradient with respect to them, with the blocks and head standing aside (only the
       embedding lookup runs again); the gradient of the head's input, a slice at a time;
       then through the final norm to the last block's output;
    3. from the last block down, each block is run again from its input under its seed (the
       same dropout masks) and differentiated, evaluating the gradients of its parameters and
       of its input, which is the previous block's output gradient.

    The same values as the whole step (without dropout; with it, other masks of the same
    distribution), for one extra forward pass of the blocks, for a model that
    ``blockwise_unsupported`` accepts. It evaluates eagerly, so it runs outside ``mx.compile``.
    """
    from afm_mlx.model import head_slices

    def value_and_grad(model: nn.Module, *args):
        n = len(model.model.layers)
        records: list[tuple] = []
        outputs: list[mx.array] = []
        base = mx.random.randint(0, 2**31 - n - 1).item()

        def record(block, x, *a, **k):
            mx.random.seed(base + len(records))
            records.append((x, a, k))
            out = block(x, *a, **k)
            mx.eval(out)
            outputs[:] = [out]
            return out

        def identity(block, x, *a, **k):
            return x

        def feeding(h: mx.array) -> list[Callable]:
            return [identity] * (n - 1) + [lambda block, x, *a, **k: h]

        def head_input(blocks: list[Callable]) -> mx.array:
            """The head's input in a pass through ``blocks`` (the pass stops there)."""
            seen = []

            def stop(head, x):
                seen.append(x)
                raise _StopPass

            with _stand_ins(model, blocks, stop):
                try:
                    loss_fn(model, *args)
                except _StopPass:
                    pass
            if len(seen) != 1:
                raise RuntimeError(f"{model.model_type}: the loss did not reach the LM head")
            return seen[0]

        # 1. Forward, block by block.
        h = head_input([record] * n)
        mx.eval(h)
        if len(records) != n:
            raise RuntimeError(f"{model.model_type}: the pass ran {len(records)} of {n} blocks")
        last = outputs.pop()
        # 2. The head and the loss.
        slices = list(head_slices(model, widen=False))
        parts = []
        for logits_of in slices:
            parts.append(logits_of(h))
            mx.eval(parts[-1])
        logits = mx.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]

        def loss_of(logits: mx.array) -> mx.array:
            with _stand_ins(model, feeding(last), lambda head, x: logits):
                return loss_fn(model, *args)

        loss, g_logits = mx.value_and_grad(loss_of)(logits)
        mx.eval(loss, g_logits)
        del logits
        g_h, start = None, 0
        for logits_of, part in zip(slices, parts):
            stop = start + part.shape[-1]
            (g,) = mx.vjp(logits_of, [h], [g_logits[..., start:stop]])[1]
            g_h = g if g_h is None else g_h + g
            mx.eval(g_h)
            start = stop
        del parts, g_logits
        (cotangent,) = mx.vjp(lambda x: head_input(feeding(x)), [last], [g_h])[1]
        mx.eval(cotangent)
        # 3. The blocks, last to first.
        flat: dict[str, mx.array] = {}
        for i in reversed(range(n)):
            x, a, k = records.pop()
            block = model.model.layers[i]

            def block_dot(params, x, block=block, a=a, k=k, g=cotangent):
                block.update(params)
                return (block(x, *a, **k).astype(mx.float32) * g).sum()

            mx.random.seed(base + i)
            grads, cotangent = mx.grad(block_dot, argnums=(0, 1))(block.trainable_parameters(), x)
            mx.eval(grads, cotangent)
            flat.update((f"model.layers.{i}.{p}", g) for p, g in tree_flatten(grads))
        mx.random.seed(base + n)
        return loss, tree_map_with_path(lambda p, _: flat[p], model.trainable_parameters())

    return value_and_grad


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
        a teacher too large to hold can then run block by block (``model.streamed_logits``).
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
    train_data: PackedDataset,
    valid_data: PackedDataset,
    state: dict[str, Any],
    save: Callable[[int, dict[str, Any]], Any],
    resumed: bool,
    on_step: Callable[[int], None] | None = None,
    extra_metrics: Callable[[float], dict[str, float]] | None = None,
) -> dict[str, Any]:
    """The step loop of every training stage (train, recover, finetune).

    Starts after ``state["step"]`` at data position (``epoch``, ``index``); logs to
    ``out/metrics.jsonl`` (rewritten from ``state["history"]`` on a resume, dropping lines the
    interrupted process logged after its last checkpoint), evaluates on ``valid_data``, plots
    ``loss.png`` and calls ``save(step, {"epoch", "index", "history"})`` at each checkpoint.
    ``extra_metrics(tokens_per_s)`` adds fields to each log record. Returns the history and the
    measured training tokens/s (optimizer steps only: evaluation and checkpoints excluded).
    """
    from tqdm import tqdm

    model, optimizer, world = trainer.model, trainer.optimizer, trainer.world
    history: list[dict] = state.get("history", [])
    metrics_path = out / "metrics.jsonl"
    if resumed and world.main:
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
