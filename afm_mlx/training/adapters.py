"""The training loop shared by ``afm_mlx.recover`` and ``afm_mlx.finetune``: LoRA on a frozen base.

The run folder (``--out``) is the adapter folder: ``adapters.safetensors`` + ``adapter_config.json``
(float16, mlx-lm's layout) when done, ``checkpoints/step-N/`` meanwhile (adapter in float32,
optimizer state, step and data position; written under a temporary name and renamed into place,
``latest`` replaced atomically), ``metrics.jsonl``, ``loss.png`` and ``run.json``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from afm_mlx.adapters.lora import (
    DEFAULT_KEYS,
    Adapter,
    LoRASettings,
    attach_lora,
    check_adapter_fits,
    check_base_fingerprint,
    read_adapter,
    save_adapter,
    set_adapter_weights,
    settings_for_model,
)
from afm_mlx.core.blas import backend_report
from afm_mlx.core.errors import UserError
from afm_mlx.core.fileio import atomic_write_json, load_safetensors, read_json
from afm_mlx.models.io import model_fingerprint
from afm_mlx.training.blockwise import blockwise_unsupported
from afm_mlx.training.checkpoint import OPTIMIZER_FILE, STATE_FILE, write_checkpoint
from afm_mlx.training.loop import OptimConfig, Trainer, build_optimizer, run_loop
from afm_mlx.training.memory import use_grad_checkpoint
from afm_mlx.training.run_dir import RUN_FILE, check_run_dir
from afm_mlx.training.world import World


@dataclass
class AdapterTrainConfig(OptimConfig):
    """Options every adapter-training stage shares (each stage's dataclass extends it)."""

    model: str | None = field(
        default=None, metadata={"help": "base model folder, frozen (required; palettized)"}
    )
    out: str | None = field(default=None, metadata={"help": "adapter/run folder (required)"})
    data: str = field(default="shakespeare", metadata={"help": "training data"})
    rank: int = field(default=16, metadata={"help": "LoRA rank (Apple: 16)"})
    scale: float | None = field(
        default=None, metadata={"help": "LoRA scale as mlx-lm uses it (default 2.0)"}
    )
    alpha: float | None = field(
        default=None, metadata={"help": "PEFT-style alpha (= scale * rank); instead of --scale"}
    )
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    keys: list[str] = field(
        default_factory=lambda: list(DEFAULT_KEYS), metadata={"help": "layers given adapters"}
    )
    num_layers: int = field(default=-1, metadata={"help": "last N blocks get adapters (-1: all)"})
    blockwise: bool = field(
        default=True,
        metadata={
            "help": "on a palettized base, compute gradients one block at a time, each block's "
            "weights decoded in turn (a fraction of the memory, 1.2-1.4x the time)"
        },
    )
    # Adapter training defaults that differ from full training: fewer, smaller steps, and no
    # decay or short-memory beta2 on the few, freshly initialized adapter weights.
    max_steps: int = field(default=200, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "sequences per micro-batch"})
    # Measured on the demo model: 2e-3 made rank-32 adapters diverge; 5e-4 let a rank-16 adapter
    # close 93% of a 2-bit base's perplexity gap in 100 steps (scripts/bench_recovery.py).
    learning_rate: float = field(default=5e-4, metadata={"help": "peak learning rate"})
    warmup_steps: int = field(default=10, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decay of the adapters"})
    beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    save_every: int = field(default=50, metadata={"help": "steps between checkpoints"})

    @staticmethod
    def translate_config(values: dict[str, Any], source: str) -> dict[str, Any]:
        """``--config`` YAML may be mlx-lm's LoRA config (``translate_mlx_lm_config``)."""
        return translate_mlx_lm_config(values, source)

    def validate(self) -> None:
        for name in ("model", "out"):
            if not getattr(self, name):
                raise UserError(f"--{name} is required")
        super().validate()
        if not 0 <= self.dropout < 1:
            raise UserError("--dropout must be in [0, 1)")
        self.lora_settings()

    def lora_settings(self) -> LoRASettings:
        return LoRASettings.from_flags(
            self.rank,
            self.scale,
            self.alpha,
            dropout=self.dropout,
            keys=list(self.keys),
            num_layers=self.num_layers,
        )


# mlx-lm's LoRA YAML (``mlx_lm.lora --config``): its key -> ours.
MLX_LM_KEYS = {
    "model": "model",
    "data": "data",
    "adapter_path": "out",
    "iters": "max_steps",
    "batch_size": "batch_size",
    "learning_rate": "learning_rate",
    "num_layers": "num_layers",
    "val_batches": "eval_batches",
    "steps_per_report": "log_every",
    "steps_per_eval": "eval_every",
    "save_every": "save_every",
    "max_seq_length": "seq_len",
    "seed": "seed",
    "grad_checkpoint": "grad_checkpoint",
}
MLX_LM_LORA_KEYS = {"rank": "rank", "scale": "scale", "dropout": "dropout", "keys": "keys"}
# mlx-lm keys accepted only with the value that is what afm_mlx does anyway.
MLX_LM_FIXED = {
    "train": (True,),
    "fine_tune_type": ("lora",),
    "mask_prompt": (True,),  # afm_mlx trains on the completion / assistant tokens only
    "optimizer": ("adam", "adamw"),  # AdamW; its decay is --weight-decay (0 for adapters)
    "test": (False,),
    "lr_schedule": (None,),
}


def translate_mlx_lm_config(values: dict[str, Any], source: str) -> dict[str, Any]:
    """mlx-lm LoRA YAML keys (``iters``, ``adapter_path``, ``lora_parameters``, ...) as afm_mlx
    options; afm_mlx's own keys pass through. An mlx-lm option afm_mlx does not offer (or a
    value it cannot honour) is refused in one line naming each."""
    out: dict[str, Any] = {}
    unsupported = []
    for key, value in values.items():
        if key in MLX_LM_KEYS:
            out[MLX_LM_KEYS[key]] = value
        elif key == "lora_parameters" and isinstance(value, dict):
            for k, v in value.items():
                if k in MLX_LM_LORA_KEYS:
                    out[MLX_LM_LORA_KEYS[k]] = v
                else:
                    unsupported.append(f"lora_parameters.{k}")
        elif key in MLX_LM_FIXED:
            if value not in MLX_LM_FIXED[key]:
                unsupported.append(f"{key}: {value!r}")
        elif key in {"resume_adapter_file", "hf_dataset", "wandb", "report_to", "test_batches",
                     "use_dora", "project_name"}:  # fmt: skip
            if value not in (None, False):
                unsupported.append(key)
        else:
            out[key] = value
    if unsupported:
        raise UserError(
            f"{source}: mlx-lm option(s) afm_mlx does not support: {', '.join(unsupported)}"
        )
    return out


def prepare_run(cfg: AdapterTrainConfig) -> tuple[Path, Path | None]:
    """Validate options and the run folder (writing nothing): (folder, checkpoint to resume).
    ``train_adapter`` calls it; a command calls it first too, to fail before loading anything."""
    cfg.validate()
    return check_run_dir(cfg)  # same rules as every training stage: never clobber another run


def save_adapter_checkpoint(
    out: Path,
    step: int,
    model: nn.Module,
    settings: LoRASettings,
    fingerprint: str,
    optimizer,
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``checkpoints/step-N`` (float32 adapter, optimizer, state) atomically; prune old ones."""
    # float32 so that a resumed run continues from exactly the values it stopped at.
    return write_checkpoint(
        out,
        step,
        lambda d: save_adapter(d, model, settings, fingerprint, dtype=mx.float32),
        optimizer,
        state,
        keep,
    )


@dataclass
class Objective:
    """What an adapter is trained to do: ``loss_fn(model, inputs, targets)``, the arrays the
    compiled step reads besides the model (``extra_state``: a resident teacher's), or a streamed
    teacher's logits for each batch (``teacher_outputs``, see ``training.loop.Trainer``)."""

    loss_fn: Callable[[nn.Module, mx.array, mx.array], mx.array]
    extra_state: list | None = None
    teacher_outputs: Callable[[mx.array], mx.array] | None = None


def train_adapter(
    cfg: AdapterTrainConfig,
    model: nn.Module,
    objective: Objective,
    data: tuple[Any, Any],
    *,
    init_adapter: Adapter | None = None,
    settings: LoRASettings | None = None,
    info: dict[str, Any] | None = None,
    world: World | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Attach LoRA to the frozen ``model`` and train it in ``cfg.out`` (or resume its last
    checkpoint); save the adapter, recording the base's fingerprint and ``info``.

    ``data`` is (train, held-out), each with ``PackedDataset``'s interface. ``settings`` (default:
    from ``cfg``) shape the adapter; ``init_adapter`` gives its starting values (else mlx-lm's
    init: random A, zero B) and must have been trained on this base. Returns a summary with the
    history and the measured training tokens/s. ``world``: data parallel over its ranks (rank 0
    writes). Nothing is written before every input has been checked.
    """
    out, ckpt = prepare_run(cfg)
    train_data, valid_data = data
    world = world or World()
    world.say(backend_report())
    fingerprint = model_fingerprint(model)
    if init_adapter is not None:
        check_base_fingerprint(init_adapter, fingerprint)
    settings = settings_for_model(settings or cfg.lora_settings(), model)
    attach_lora(model, settings, seed=cfg.seed)
    state: dict[str, Any] = {"step": 0, "epoch": 0, "index": 0, "history": []}
    opt_state = None
    if ckpt is not None:
        saved = read_adapter(ckpt)
        check_adapter_fits(model, saved)
        set_adapter_weights(model, saved, mx.float32)
        state = read_json(ckpt / STATE_FILE, "trainer state")
        opt_state = load_safetensors(ckpt / OPTIMIZER_FILE)
        world.say(f"resuming from {ckpt} (step {state['step']})")
    elif init_adapter is not None:
        check_adapter_fits(model, init_adapter)
        set_adapter_weights(model, init_adapter, mx.float32)
    mx.eval(model.parameters())
    if cfg.grad_checkpoint:
        use_grad_checkpoint(model)
    # Layers that decode their weights as they compute (palettized ones, by their
    # ``decodes_on_call`` hook): one step of the whole model would hold them all decoded at once.
    blockwise = cfg.blockwise and any(
        getattr(m, "decodes_on_call", False) for _, m in model.named_modules()
    )
    if blockwise and (why := blockwise_unsupported(model)):
        world.say(f"gradients of the whole model at once: {why}")
        blockwise = False

    world.barrier()  # every rank has checked the run folder before rank 0 writes to it
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        run = {"afm_mlx_run": 1, "config": dataclasses.asdict(cfg), "world_size": world.size}
        atomic_write_json(out / RUN_FILE, run)
    if world.size > 1:
        world.say(
            f"data parallel over {world.size} ranks, {cfg.batch_size // world.size} sequences "
            "per rank per step"
        )
    mx.random.seed(cfg.seed)
    model.train()
    optimizer = build_optimizer(cfg, model, opt_state)
    trainer = Trainer(
        model, optimizer, objective.loss_fn, cfg.grad_accum, cfg.grad_clip, objective.extra_state,
        world, objective.teacher_outputs, blockwise,
    )  # fmt: skip

    n_train = sum(p.size for _, p in tree_flatten(model.trainable_parameters()))
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    world.say(
        f"adapter: rank {settings.rank}, scale {settings.scale:g} (alpha {settings.alpha:g}), "
        f"{n_train / 1e6:.3f}M trainable parameters; {len(train_data)} train / "
        f"{len(valid_data)} valid sequences; {tokens_per_step} tokens per step"
    )

    def checkpoint(step: int, trainer_state: dict[str, Any]) -> None:
        save_adapter_checkpoint(
            out, step, model, settings, fingerprint, optimizer, trainer_state, cfg.keep_checkpoints
        )

    summary = run_loop(cfg, out, trainer, data, state, checkpoint, on_step=on_step)
    if not world.main:
        return {"out": out, **summary}
    save_adapter(
        out,
        model,
        settings,
        fingerprint,
        base_model=str(cfg.model),
        steps=cfg.max_steps,
        **(info or {}),
    )
    return {"out": out, **summary}
