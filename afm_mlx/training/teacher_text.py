"""Text sampled from the full-precision teacher: recovery data for a model with no corpus in its
domain at hand (data-free distillation, as LLM-QAT does: Liu et al., 2023).

Each document starts from a token drawn uniformly from the vocabulary (special tokens left out)
and continues with the teacher's own samples at temperature 1 (mlx-lm's batched generation),
up to ``doc_tokens`` tokens or the end of sequence. Documents are written a batch at a time
into a cache folder keyed by the teacher's checkpoint and the seed; a batch depends only on
(seed, batch index), so a killed run continues where it stopped and a longer run reuses what a
shorter one sampled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np

from afm_mlx.core.fileio import atomic_write_text, output_lock, staged_dir

TEACHER_DATA = "teacher"  # the --data value that asks for it


def cache_folder(teacher_digest: str, seed: int) -> Path:
    root = Path(os.environ.get("AFM_MLX_CACHE", Path.home() / ".cache" / "afm_mlx"))
    return root / "teacher-text" / f"{teacher_digest[:16]}-seed{seed}"


def _sampled_tokens(folder: Path) -> tuple[int, int]:
    """(batches written, tokens in them)."""
    batches = sorted(folder.glob("batch-*/meta.json"))
    return len(batches), sum(json.loads(p.read_text())["tokens"] for p in batches)


def sample_teacher_text(
    model, tokenizer, folder: Path, n_tokens: int, seed: int = 0, doc_tokens: int = 256,
    batch: int = 32, say=print,
) -> Path:  # fmt: skip
    """Sample documents from ``model`` into ``folder`` until it holds ``n_tokens`` tokens;
    returns ``folder`` (a corpus folder of ``.txt`` documents)."""
    from mlx_lm.generate import batch_generate
    from mlx_lm.sample_utils import make_sampler

    folder.mkdir(parents=True, exist_ok=True)
    with output_lock(folder, flag="--data teacher"):
        done, total = _sampled_tokens(folder)
        if total >= n_tokens:
            return folder
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        vocab = np.array([i for i in range(tokenizer.vocab_size) if i not in special])
        say(f"sampling {n_tokens - total} more tokens of teacher text into {folder}")
        while total < n_tokens:
            rng = np.random.default_rng([seed, done])
            mx.random.seed(int(rng.integers(2**31)))
            prompts = [[int(t)] for t in rng.choice(vocab, size=batch)]
            result = batch_generate(
                model, tokenizer, prompts, max_tokens=doc_tokens - 1,
                sampler=make_sampler(temp=1.0), completion_batch_size=batch,
                return_token_ids=True,
            )  # fmt: skip
            tokens = sum(1 + len(ids) for ids in result.token_ids)
            with staged_dir(folder / f"batch-{done:05d}") as staged:
                staged.mkdir()
                for i, (p, ids) in enumerate(zip(prompts, result.token_ids)):
                    atomic_write_text(staged / f"{i:03d}.txt", tokenizer.decode(p + ids))
                atomic_write_text(staged / "meta.json", json.dumps({"tokens": tokens}))
            done, total = done + 1, total + tokens
    return folder
