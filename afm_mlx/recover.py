"""Train an accuracy-recovery adapter: ``python -m afm_mlx.recover --model PALETTIZED --teacher FP``.

Apple's step 3: rank-16 LoRA on every attention and FFN projection of the frozen palettized model,
trained on general text to match the full-precision teacher's next-token distribution (KL on the
logits, optionally mixed with the next-token loss). At the end it prints held-out perplexity of
the teacher, the bare compressed base and base + adapter, and the share of the gap closed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from afm_mlx.adapters.lora import adapters_disabled
from afm_mlx.core.config import stage_main
from afm_mlx.core.errors import UserError
from afm_mlx.core.families import model_family
from afm_mlx.core.fileio import atomic_write_json
from afm_mlx.data.batches import corpus_splits, eval_batches
from afm_mlx.models.io import checkpoint_digest, load_base, load_model, resolve_model_path
from afm_mlx.models.precision import needs_widening, widen_for_cpu
from afm_mlx.models.streaming import block_releaser, stored_tables, streamed_logits
from afm_mlx.training.adapters import AdapterTrainConfig, Objective, prepare_run, train_adapter
from afm_mlx.training.losses import distillation_loss, make_loss, nll_sum
from afm_mlx.training.run_dir import locked_run
from afm_mlx.training.teacher_text import TEACHER_DATA, cache_folder, sample_teacher_text
from afm_mlx.training.world import World, init_world


@dataclass
class RecoverConfig(AdapterTrainConfig):
    data: str = field(
        default="shakespeare",
        metadata={
            "help": "training data: a corpus (text, folder, .jsonl, shakespeare), or 'teacher': "
            "text sampled from --teacher (data-free, cached)"
        },
    )
    teacher: str | None = field(
        default=None, metadata={"help": "full-precision model the base was compressed from"}
    )
    kd_weight: float = field(
        default=1.0, metadata={"help": "weight of the KL to the teacher (rest: next-token loss)"}
    )
    temperature: float = field(default=1.0, metadata={"help": "distillation temperature"})

    def validate(self) -> None:
        super().validate()
        if not self.teacher:
            raise UserError("--teacher is required (the full-precision model)")
        if not 0 <= self.kd_weight <= 1:
            raise UserError("--kd-weight must be in [0, 1]")
        if self.temperature <= 0:
            raise UserError("--temperature must be positive")


def gap_closed(fp: float, compressed: float, recovered: float) -> float:
    """Share of the perplexity lost to compression that the adapter wins back (nan if no loss)."""
    gap = compressed - fp
    return (compressed - recovered) / gap if gap > 0 else float("nan")


def _load_teacher(path_or_repo: str):
    """(teacher, config, streamed): ``streamed(inputs)`` gives the teacher's float32 logits with
    one block in memory at a time (``models.streaming.streamed_logits``), when the teacher is stored in
    half precision and runs on the CPU, where it would otherwise be widened whole: a float32
    copy of Llama-3.2-1B is 4.9 GB. None otherwise (the teacher then runs inside the compiled
    step, widened if it must be)."""
    try:
        teacher, config, path = load_model(path_or_repo, lazy=True)
    except UserError:
        teacher, _, config = load_base(path_or_repo)  # an mlx-lm quantized checkpoint
        path = None
    teacher.freeze()
    if path is not None and needs_widening(teacher) and model_family(teacher).replay_blocks:
        release = block_releaser(teacher, path)
        if release is not None:
            tables = stored_tables(teacher, path)  # the headers are read once, not per pass
            streamed = functools.partial(streamed_logits, teacher, release, tables=tables)
            return teacher, config, streamed
    widen_for_cpu(teacher)  # a bfloat16 teacher's passes are 15-25x slower on the CPU
    mx.eval(teacher.parameters())
    return teacher, config, None


def recover(cfg: RecoverConfig, on_step=None) -> dict[str, Any]:
    """Train (or resume) the recovery adapter in ``cfg.out``; returns the perplexity report."""
    world = init_world()
    with locked_run(cfg, world):
        corpus = None if cfg.data == TEACHER_DATA else cfg.data  # sampled: the teacher's digest
        world.check_same_run(cfg, corpus, (cfg.model, cfg.teacher))
        return _recover(cfg, world, on_step)


def _recover(cfg: RecoverConfig, world: World, on_step=None) -> dict[str, Any]:
    out, _ = prepare_run(cfg)  # fails here, before anything is loaded
    # Every input is loaded and checked before the run folder is touched.
    model, tokenizer, config = load_base(cfg.model)
    teacher, teacher_config, streamed = _load_teacher(cfg.teacher)
    if teacher_config["vocab_size"] != config["vocab_size"]:
        raise UserError(
            f"--teacher {cfg.teacher}: vocab_size {teacher_config['vocab_size']} differs from the "
            f"base's {config['vocab_size']}; they must share a tokenizer"
        )
    data = cfg.data
    if cfg.data == TEACHER_DATA:
        data = str(cache_folder(checkpoint_digest(cfg.teacher), cfg.seed))
        if world.main:
            # The steps' tokens, plus the held-out share, plus room for window boundaries.
            tokens = cfg.max_steps * cfg.batch_size * cfg.grad_accum * (cfg.seq_len + 1)
            needed = math.ceil(1.1 * tokens / (1 - cfg.valid_fraction))
            sample_teacher_text(teacher, tokenizer, Path(data), needed, cfg.seed, say=world.say)
        world.barrier()
    train_data, valid_data = corpus_splits(
        data, resolve_model_path(cfg.model), cfg.seq_len, cfg.valid_fraction, cfg.seed
    )
    if len(valid_data) == 0:
        raise UserError(f"--data {cfg.data}: nothing held out to measure recovery on")
    if streamed is None:
        objective = Objective(
            make_loss(teacher, "kl", cfg.kd_weight, cfg.temperature), [teacher.state]
        )
    else:
        loss_fn = distillation_loss("kl", cfg.kd_weight, cfg.temperature)
        objective = Objective(loss_fn, teacher_outputs=streamed)
    info = {"kind": "recovery", "teacher": str(cfg.teacher)}
    summary = train_adapter(
        cfg, model, objective, (train_data, valid_data), info=info, world=world, on_step=on_step
    )

    if not world.main:
        return {"tokens_per_s": summary["tokens_per_s"]}

    def ppl(m) -> float:
        total, count = nll_sum(m, eval_batches(valid_data, cfg.batch_size, cfg.eval_batches))
        return math.exp(total / count)

    report = {"teacher": ppl(streamed or teacher), "adapter": ppl(model)}
    with adapters_disabled(model):
        report["base"] = ppl(model)
    report["gap_closed"] = gap_closed(report["teacher"], report["base"], report["adapter"])
    report["tokens_per_s"] = summary["tokens_per_s"]
    atomic_write_json(out / "recovery.json", report)
    print(
        f"held-out perplexity: full precision {report['teacher']:.3f} | compressed "
        f"{report['base']:.3f} | compressed + adapter {report['adapter']:.3f} | "
        f"gap closed {100 * report['gap_closed']:.1f}%"
    )
    print(f"recovery adapter saved to {out} (use it with --adapter {out})")
    return report


def main(argv: list[str] | None = None) -> None:
    stage_main(RecoverConfig, recover, "python -m afm_mlx.recover", __doc__, argv)


if __name__ == "__main__":
    main()
