"""Train an AFM-architecture language model: ``python -m afm_mlx.train``.

With no arguments it trains the ``small`` preset on the embedded Shakespeare corpus for a bounded
number of steps and prints where the checkpoint is. ``TrainConfig`` is the single source of truth
for every option (CLI flags and ``--config file.yaml`` are derived from it).
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

from afm_mlx.core import blas
from afm_mlx.core.config import stage_main
from afm_mlx.core.errors import UserError
from afm_mlx.core.families import standard_config
from afm_mlx.core.fileio import atomic_write_json, staged_dir
from afm_mlx.data.batches import PackedDataset
from afm_mlx.data.corpus import check_corpus, iter_corpus
from afm_mlx.data.token_cache import build_token_cache, split_train_valid
from afm_mlx.models.files import save_model
from afm_mlx.models.io import load_model
from afm_mlx.models.presets import PRESETS, build_model, init_weights, preset_config
from afm_mlx.training.checkpoint import load_checkpoint, save_checkpoint
from afm_mlx.training.loop import OptimConfig, Trainer, build_optimizer, run_loop
from afm_mlx.training.losses import make_loss
from afm_mlx.training.memory import (
    ALLOCATOR_MARGIN,
    device_memory,
    plan_memory,
    use_grad_checkpoint,
)
from afm_mlx.training.report import sample_text
from afm_mlx.training.run_dir import RUN_FILE, check_run_dir, locked_run
from afm_mlx.training.world import World, init_world

__all__ = ["TrainConfig", "OptimConfig", "Trainer", "build_optimizer", "train", "main"]


@dataclass
class TrainConfig(OptimConfig):
    preset: str = field(default="small", metadata={"help": "model size", "choices": list(PRESETS)})
    init: str | None = field(
        default=None,
        metadata={"help": "continue from a qwen3/llama-family checkpoint (folder or HF repo id)"},
    )
    data: str = field(
        default="shakespeare",
        metadata={"help": "corpus: text file/folder, .jsonl with {'text'}, or 'shakespeare'"},
    )
    tokenizer: str | None = field(
        default=None, metadata={"help": "tokenizer folder (default: train one on --data)"}
    )
    out: str = field(default="runs/small", metadata={"help": "run folder"})
    dtype: str = field(
        default="auto",
        metadata={
            "help": "parameter dtype (auto: float32 on CPU, bfloat16 on GPU)",
            "choices": ["auto", "float32", "bfloat16"],
        },
    )
    teacher: str | None = field(
        default=None, metadata={"help": "teacher checkpoint for distillation"}
    )
    distill: str = field(
        default="top1",
        metadata={
            "help": "distillation target: top1 (AFM: mix label and teacher top-1) or kl",
            "choices": ["top1", "kl"],
        },
    )
    distill_weight: float = field(default=0.9, metadata={"help": "weight on the teacher"})
    distill_temperature: float = field(default=1.0, metadata={"help": "KL temperature"})
    sample_prompt: str = field(default="ROMEO.\n", metadata={"help": "prompt of the final sample"})
    sample_tokens: int = field(
        default=80, metadata={"help": "tokens of the final sample (0: none)"}
    )
    dry_run: bool = field(
        default=False,
        metadata={
            "help": "print the parameter count and the memory estimate per rank, then stop "
            "(allocates nothing)"
        },
    )

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.distill_weight <= 1:
            raise UserError("--distill-weight must be in [0, 1]")


def _param_dtype(name: str) -> mx.Dtype:
    if name == "auto":
        return mx.float32 if mx.default_device().type == mx.cpu else mx.bfloat16
    return getattr(mx, name)


def prepare_tokenizer(cfg: TrainConfig, out: Path, world: World) -> Path:
    """The tokenizer folder: --tokenizer, the --init checkpoint's, or one trained on --data."""
    from afm_mlx.data.tokenizer import save_tokenizer, train_sentencepiece

    if cfg.tokenizer:
        path = Path(cfg.tokenizer)
        if not (path / "tokenizer.json").is_file():
            raise UserError(f"--tokenizer {path}: no tokenizer.json in that folder")
        return path
    if cfg.init:
        from afm_mlx.models.io import resolve_model_path

        return resolve_model_path(cfg.init)
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        vocab = PRESETS[cfg.preset]["vocab_size"]
        world.say(f"training a {vocab}-piece SentencePiece BPE tokenizer on {cfg.data} ...")
        model_proto = train_sentencepiece(iter_corpus(cfg.data), vocab)
        with staged_dir(tok_dir, replace=True) as staged:  # replaces only a partial folder
            save_tokenizer(model_proto, staged)
    return tok_dir


def flops_per_token(model: nn.Module, seq_len: int, config: dict[str, Any]) -> float:
    """Training FLOPs per token: 6 x matmul parameters (LM head included) + attention scores."""
    n = sum(p.size for _, p in tree_flatten(model.parameters()))
    config = standard_config(config)
    heads_dim = config["num_attention_heads"] * config.get(
        "head_dim", config["hidden_size"] // config["num_attention_heads"]
    )
    return 6 * n + 6 * config["num_hidden_layers"] * seq_len * heads_dim


def _new_model(cfg: TrainConfig, tok_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    """A freshly initialized preset model sized to the tokenizer's vocabulary."""
    from afm_mlx.data.tokenizer import TextTokenizer

    vocab = TextTokenizer(tok_dir).vocab_size
    config = preset_config(cfg.preset, vocab_size=max(vocab, PRESETS[cfg.preset]["vocab_size"]))
    model = build_model(config)
    init_weights(model, config, cfg.seed)
    return model, config


def train(cfg: TrainConfig, on_step: Callable[[int], None] | None = None) -> Path:
    """Run (or resume) training as configured; returns the run folder. ``on_step`` sees each step."""
    world = init_world()
    if cfg.dry_run:
        cfg.validate()
        print_memory_plan(cfg, world)
        return Path(cfg.out)
    with locked_run(cfg, world):
        return _train(cfg, world, on_step)


def print_memory_plan(cfg: TrainConfig, world: World) -> dict[str, float]:
    """``--dry-run``: parameters and the estimated memory per rank; nothing is allocated."""
    if cfg.init:
        from afm_mlx.core.fileio import read_json
        from afm_mlx.models.io import resolve_model_path
        from afm_mlx.models.presets import validate_config

        path = resolve_model_path(cfg.init) / "config.json"
        config = read_json(path, "model config (config.json)")
        validate_config(config, str(path))
        name = str(cfg.init)
    else:
        config, name = preset_config(cfg.preset), f"preset {cfg.preset}"
    dtype = _param_dtype(cfg.dtype)
    per_rank = cfg.batch_size // world.size
    plan = plan_memory(config, per_rank, cfg.seq_len, dtype.size, cfg.grad_checkpoint)
    available = device_memory()
    gb = 1e9
    world.say(
        f"dry run: {name}, {plan['parameters'] / 1e9:.3f}B parameters, "
        f"{str(dtype).split('.')[-1]}; {cfg.batch_size} sequences x {cfg.seq_len} tokens per "
        f"step, {per_rank} per rank on {world.size} rank(s); grad checkpoint "
        f"{'on' if cfg.grad_checkpoint else 'off'}\n"
        f"  weights      {plan['weights'] / gb:9.3f} GB\n"
        f"  gradients    {plan['gradients'] / gb:9.3f} GB\n"
        f"  optimizer    {plan['optimizer'] / gb:9.3f} GB (AdamW: two moments)\n"
        f"  activations  {plan['activations'] / gb:9.3f} GB\n"
        f"  total        {plan['total'] / gb:9.3f} GB per rank (with a "
        f"{round(100 * (ALLOCATOR_MARGIN - 1))}% allocator margin); this device has "
        f"{available / gb:.1f} GB: {'fits' if plan['total'] <= available else 'does NOT fit'}"
    )
    return plan


def _train(cfg: TrainConfig, world: World, on_step: Callable[[int], None] | None) -> Path:
    world.check_same_run(cfg, cfg.data, (cfg.init, cfg.teacher))
    out, ckpt = check_run_dir(cfg)
    # Validate every input before the run folder is touched.
    check_corpus(cfg.data)  # streamed: nothing of the corpus is kept in memory
    teacher = None
    if cfg.teacher:
        teacher, teacher_config, _ = load_model(cfg.teacher)
        teacher.freeze()
    init = load_model(cfg.init)[:2] if cfg.init and ckpt is None else None

    world.barrier()  # every rank has checked the run folder before rank 0 writes to it
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        run = {"afm_mlx_run": 1, "config": dataclasses.asdict(cfg), "world_size": world.size}
        atomic_write_json(out / RUN_FILE, run)
    mx.random.seed(cfg.seed)
    peak_gflops = blas.matmul_gflops(n=1024)
    world.say(blas.backend_report(peak_gflops))
    if world.size > 1:
        world.say(
            f"data parallel over {world.size} ranks, {cfg.batch_size // world.size} sequences "
            "per rank per step"
        )
    # Rank 0 trains the tokenizer (when one is needed); the others then read it.
    tok_dir = prepare_tokenizer(cfg, out, world) if world.main else None
    world.barrier()
    tok_dir = tok_dir or prepare_tokenizer(cfg, out, world)
    cache = build_token_cache(cfg.data, tok_dir)
    train_tokens, valid_tokens = split_train_valid(cache, cfg.valid_fraction, cfg.seed)
    train_data = PackedDataset(train_tokens, cfg.seq_len, f"--data {cfg.data}")
    valid_data = PackedDataset(valid_tokens, cfg.seq_len, "validation split")

    opt_state = None
    if ckpt is not None:
        model, model_config, state, opt_state = load_checkpoint(ckpt)
        world.say(f"resuming from {ckpt} (step {state['step']})")
    else:
        model, model_config = init or _new_model(cfg, tok_dir)
        state = {"step": 0, "epoch": 0, "index": 0, "history": []}
    model.set_dtype(_param_dtype(cfg.dtype))
    if cfg.grad_checkpoint:
        use_grad_checkpoint(model)
    if cache.max_id >= model_config["vocab_size"]:
        raise UserError(f"--tokenizer {tok_dir}: token ids exceed the model's vocab_size")
    if teacher is not None and teacher_config["vocab_size"] != model_config["vocab_size"]:
        raise UserError(
            f"--teacher {cfg.teacher}: vocab_size {teacher_config['vocab_size']} differs from "
            f"the student's {model_config['vocab_size']}; they must share a tokenizer"
        )
    loss_fn = make_loss(teacher, cfg.distill, cfg.distill_weight, cfg.distill_temperature)

    model.train()
    optimizer = build_optimizer(cfg, model, opt_state)
    trainer = Trainer(
        model,
        optimizer,
        loss_fn,
        cfg.grad_accum,
        cfg.grad_clip,
        [teacher.state] if teacher is not None else None,
        world,
    )

    n_params = sum(p.size for _, p in tree_flatten(model.parameters()))
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    peak = peak_gflops * 1e9
    fpt = flops_per_token(model, cfg.seq_len, model_config)
    world.say(
        f"model: {n_params / 1e6:.2f}M parameters; {len(train_data)} train / {len(valid_data)} "
        f"valid sequences of {cfg.seq_len}; {tokens_per_step} tokens per step"
    )

    def checkpoint(step: int, trainer_state: dict[str, Any]) -> None:
        save_checkpoint(
            out,
            step,
            model,
            model_config,
            optimizer,
            trainer_state,
            tok_dir,
            keep=cfg.keep_checkpoints,
        )

    run_loop(
        cfg,
        out,
        trainer,
        (train_data, valid_data),
        state,
        checkpoint,
        on_step=on_step,
        extra_metrics=lambda tps: {"mfu": tps * fpt / peak},
    )
    if not world.main:
        return out
    save_model(out, model, model_config, tok_dir)
    if cfg.sample_tokens > 0:
        print("sample:", repr(sample_text(out, cfg.sample_prompt, cfg.sample_tokens, cfg.seed)))
    print(f"model saved to {out} (load it with afm_mlx.load('{out}') or mlx_lm.load)")
    return out


def main(argv: list[str] | None = None) -> None:
    stage_main(TrainConfig, train, "python -m afm_mlx.train", __doc__, argv)


if __name__ == "__main__":
    main()
