"""Perplexity of a model, bare and with adapters: ``python -m afm_mlx.evaluate``.

``--data`` is a corpus (``shakespeare``, a text file or folder: its held-out documents, split as
training splits them) or a task ``.jsonl`` (every record; loss on answer tokens only, as
``afm_mlx.finetune`` trains). Every ``--adapter`` is evaluated on the one loaded base. When every
record of a task file carries ``"choices"`` (a multiple-choice task, e.g. ``afm_mlx.data.speakers``),
each row also reports ``accuracy`` (the choice the model finds most likely, against the answer)
and ``balanced_accuracy`` (its mean over answers: chance for a model that always says the same).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import mlx.nn as nn
import numpy as np

from afm_mlx.core.config import stage_main
from afm_mlx.core.errors import UserError
from afm_mlx.data.batches import corpus_splits, eval_batches
from afm_mlx.data.tasks import read_task_records, task_datasets
from afm_mlx.models.io import load_base, resolve_model_path
from afm_mlx.palettization import kernels
from afm_mlx.training.losses import choice_accuracy, nll_sum


def perplexity(model: nn.Module, batches: Iterable[np.ndarray]) -> float:
    """exp(mean NLL per target token)."""
    total, count = nll_sum(model, batches)
    if count == 0:
        raise UserError("no target tokens to evaluate")
    return math.exp(min(total / count, 50.0))


@dataclass
class EvaluateConfig:
    model: str | None = field(default=None, metadata={"help": "model folder (required)"})
    adapter: list[str] = field(
        default_factory=list, metadata={"help": "adapter folder(s); each is evaluated"}
    )
    data: str = field(
        default="shakespeare",
        metadata={"help": "corpus (held-out part) or task .jsonl (answer tokens)"},
    )
    seq_len: int = field(default=128, metadata={"help": "tokens per window"})
    batch_size: int = field(default=8, metadata={"help": "windows per batch"})
    max_batches: int = field(default=0, metadata={"help": "batches evaluated (0: all)"})
    valid_fraction: float = field(
        default=0.05, metadata={"help": "held-out share of a corpus (as training split it)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the held-out split"})
    skip_base: bool = field(default=False, metadata={"help": "do not evaluate the bare base"})
    json: bool = field(default=False, metadata={"help": "print one JSON object instead of a table"})
    lut_kernel: str | None = kernels.flag_field()

    def validate(self) -> None:
        if not self.model:
            raise UserError("--model is required")
        for name in ("seq_len", "batch_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive")
        if not 0 < self.valid_fraction < 1:
            raise UserError("--valid-fraction must be in (0, 1)")


def evaluate(cfg: EvaluateConfig) -> list[dict]:
    """Perplexity rows: the base (unless skipped) and each adapter."""
    from afm_mlx.adapters.lora import AdapterCache, read_adapter

    cfg.validate()
    kernels.apply_flag(cfg.lut_kernel)
    adapters = [read_adapter(p) for p in cfg.adapter]  # validate every input first
    model, tokenizer, _ = load_base(cfg.model)
    choices = None
    if cfg.data.endswith(".jsonl"):
        data, _ = task_datasets(cfg.data, tokenizer, cfg.seq_len, 0.0, cfg.seed)
        records = read_task_records(cfg.data)
        if all("choices" in r for r in records):
            choices = records
    else:
        # The corpus is tokenized with the model's own tokenizer files: a hub repo id is resolved
        # to its local snapshot first.
        tokenizer_dir = resolve_model_path(cfg.model)
        _, data = corpus_splits(cfg.data, tokenizer_dir, cfg.seq_len, cfg.valid_fraction, cfg.seed)
    if len(data) == 0:
        raise UserError(f"--data {cfg.data}: nothing to evaluate at --seq-len {cfg.seq_len}")
    cache = AdapterCache(model)
    rows = []
    for name, adapter in [(None, None)] * (not cfg.skip_base) + [(a.path, a) for a in adapters]:
        cache.activate(adapter)
        total, count = nll_sum(model, eval_batches(data, cfg.batch_size, cfg.max_batches))
        row = {
            "adapter": str(name) if name else None,
            "nll": total / count,
            "perplexity": math.exp(min(total / count, 50.0)),
            "tokens": count,
        }
        if choices is not None:
            row.update(
                choice_accuracy(model, tokenizer, choices, desc=str(name or "base")),
                examples=len(choices),
            )
        rows.append(row)
    return rows


def _report(cfg: EvaluateConfig) -> None:
    rows = evaluate(cfg)
    if cfg.json:
        print(json.dumps({"model": cfg.model, "data": cfg.data, "results": rows}))
        return
    accuracy = "accuracy" in rows[0]
    print(
        f"{'adapter':<40} {'perplexity':>11} {'nll':>8} {'tokens':>9}"
        + (f" {'accuracy':>9} {'balanced':>9}" if accuracy else "")
    )
    for r in rows:
        name = r["adapter"] or "(base)"
        print(
            f"{name:<40} {r['perplexity']:>11.3f} {r['nll']:>8.4f} {r['tokens']:>9}"
            + (f" {r['accuracy']:>9.3f} {r['balanced_accuracy']:>9.3f}" if accuracy else "")
        )
    if accuracy:
        print(
            f"accuracy over {rows[0]['examples']} examples (balanced: the mean over answers); "
            f"chance {rows[0]['chance']:.3f}"
        )


def main(argv: list[str] | None = None) -> None:
    stage_main(EvaluateConfig, _report, "python -m afm_mlx.evaluate", __doc__, argv)


if __name__ == "__main__":
    main()
