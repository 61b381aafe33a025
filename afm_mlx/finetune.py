"""Train a task adapter: ``python -m afm_mlx.finetune --model PALETTIZED --init-adapter RECOVERY``.

Apple's step 4: a task adapter starts from the accuracy-recovery adapter's weights (its rank,
scale and target layers too) and is fine-tuned on task data with the compressed base frozen and
shared. ``--init-adapter none`` starts from mlx-lm's zero-output init instead (the baseline).
``--data`` is a ``.jsonl`` of ``{"text"}``, ``{"prompt","completion"}`` or chat ``{"messages"}``
records (loss on answer tokens only; see ``afm_mlx.data.tasks``), an mlx-lm data folder
(``train.jsonl`` + ``valid.jsonl``), or a plain text corpus. ``--config`` takes mlx-lm's LoRA YAML
too (``iters``, ``adapter_path``, ``lora_parameters``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from afm_mlx.adapters.lora import DEFAULT_KEYS, Adapter, LoRASettings, read_adapter
from afm_mlx.core.config import stage_main
from afm_mlx.core.errors import UserError
from afm_mlx.data.batches import corpus_splits
from afm_mlx.data.tasks import is_task_folder, task_datasets
from afm_mlx.models.io import load_base, resolve_model_path
from afm_mlx.training.adapters import AdapterTrainConfig, Objective, prepare_run, train_adapter
from afm_mlx.training.losses import masked_nll
from afm_mlx.training.run_dir import locked_run
from afm_mlx.training.world import World, init_world


@dataclass
class FinetuneConfig(AdapterTrainConfig):
    data: str | None = field(
        default=None, metadata={"help": "task .jsonl (text/prompt-completion/chat) or corpus"}
    )
    rank: int | None = field(
        default=None, metadata={"help": "LoRA rank (default: the init adapter's, else 16)"}
    )
    init_adapter: str | None = field(
        default=None,
        metadata={"help": "recovery adapter to start from, or 'none' for zero init (required)"},
    )
    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate"})

    def validate(self) -> None:
        if not self.data:
            raise UserError("--data is required (a task .jsonl, or an mlx-lm data folder)")
        if not self.init_adapter:
            raise UserError("--init-adapter is required: a recovery adapter folder, or 'none'")
        super().validate()

    def lora_settings(self) -> LoRASettings:
        return LoRASettings.from_flags(
            self.rank or 16,
            self.scale,
            self.alpha,
            dropout=self.dropout,
            keys=list(self.keys),
            num_layers=self.num_layers,
        )


def task_settings(cfg: FinetuneConfig, init: Adapter | None) -> LoRASettings:
    """The task adapter's shape: the init adapter's, refusing flags that contradict it."""
    if init is None:
        return cfg.lora_settings()
    s = init.settings
    clashes = []
    if cfg.rank is not None and cfg.rank != s.rank:
        clashes.append(f"--rank {cfg.rank} vs {s.rank}")
    if cfg.scale is not None and cfg.scale != s.scale:
        clashes.append(f"--scale {cfg.scale} vs {s.scale}")
    if cfg.alpha is not None and cfg.alpha != s.alpha:
        clashes.append(f"--alpha {cfg.alpha} vs {s.alpha}")
    if list(cfg.keys) != list(DEFAULT_KEYS) and list(cfg.keys) != list(s.keys):
        clashes.append("--keys differ")
    if cfg.num_layers != -1 and cfg.num_layers != s.num_layers:
        clashes.append(f"--num-layers {cfg.num_layers} vs {s.num_layers}")
    if clashes:
        raise UserError(
            f"--init-adapter {init.path}: the task adapter takes its shape from it; "
            f"drop the contradicting flags ({'; '.join(clashes)})"
        )
    return LoRASettings(s.rank, s.scale, cfg.dropout, list(s.keys), s.num_layers)


def finetune(cfg: FinetuneConfig, on_step=None) -> dict:
    """Train (or resume) the task adapter in ``cfg.out``; returns the training summary."""
    world = init_world()
    with locked_run(cfg, world):
        world.check_same_run(cfg, cfg.data, (cfg.model,))
        return _finetune(cfg, world, on_step)


def _finetune(cfg: FinetuneConfig, world: World, on_step=None) -> dict:
    out, _ = prepare_run(cfg)  # fails here, before anything is loaded
    init = None if cfg.init_adapter.lower() == "none" else read_adapter(cfg.init_adapter)
    settings = task_settings(cfg, init)
    model, tokenizer, _ = load_base(cfg.model)
    if cfg.data.endswith(".jsonl") or is_task_folder(cfg.data):
        train_data, valid_data = task_datasets(
            cfg.data, tokenizer, cfg.seq_len, cfg.valid_fraction, cfg.seed
        )
        if train_data.truncated:
            world.say(f"note: {train_data.truncated} records cut to --seq-len {cfg.seq_len} tokens")
    else:
        train_data, valid_data = corpus_splits(
            cfg.data, resolve_model_path(cfg.model), cfg.seq_len, cfg.valid_fraction, cfg.seed
        )
    info = {"kind": "task", "init_adapter": str(cfg.init_adapter)}
    summary = train_adapter(
        cfg, model, Objective(masked_nll), (train_data, valid_data),
        init_adapter=init, settings=settings, info=info, world=world, on_step=on_step,
    )  # fmt: skip
    world.say(f"task adapter saved to {out} (use it with --adapter {out})")
    return summary


def main(argv: list[str] | None = None) -> None:
    stage_main(FinetuneConfig, finetune, "python -m afm_mlx.finetune", __doc__, argv)


if __name__ == "__main__":
    main()
