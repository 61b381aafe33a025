"""What ``coreml_check.py`` and ``coreai_check.py`` share: the MLX reference (model, adapter,
tokenizer, prompt), MLX's logits on the device's own greedy tokens, and the report.

MLX is teacher-forced with the device's choices, so one divergence does not cascade; both are timed
the same way (time to first token = the whole prefill, decode tokens/s over the remaining steps).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from afm_mlx.core.errors import UserError


@dataclass
class Reference:
    model: Any
    tokenizer: Any | None
    prompt: list[int]
    adapter: str | None  # the adapter's function-name suffix, or None for the bare base


def load_reference(model_dir: str, adapter_spec: str, prompt: str) -> Reference:
    """The MLX model the output was converted from (with ``NAME=DIR`` attached) and the prompt's
    token ids (ids 1..8 when the checkpoint has no tokenizer)."""
    from afm_mlx.models.io import load_model
    from converters.extract import parse_adapter_spec

    model, _, _ = load_model(Path(model_dir))
    adapter = None
    if adapter_spec:
        from afm_mlx.adapters.lora import load_adapter

        adapter, folder = parse_adapter_spec(adapter_spec)
        load_adapter(model, folder)
    try:
        from mlx_lm.utils import load_tokenizer

        tokenizer = load_tokenizer(Path(model_dir))
        ids = list(tokenizer.encode(prompt))
    except Exception as e:  # a bare checkpoint: fall back to fixed token ids
        print(f"no tokenizer ({e}); using token ids 1..8 as the prompt")
        tokenizer, ids = None, list(range(1, 9))
    return Reference(model, tokenizer, ids, adapter)


def check_fits(ref: Reference, steps: int, context: int) -> None:
    if len(ref.prompt) + steps > context:
        raise UserError(f"prompt ({len(ref.prompt)}) + --steps ({steps}) exceed context {context}")


@dataclass
class Run:
    """Per-step logits (first row: the prompt's last token) and timings of one engine."""

    rows: list[np.ndarray]
    ttft: float
    decode_s: float


def mlx_on_tokens(ref: Reference, tokens: list[int]) -> Run:
    """MLX's logits for the prompt, then for each of ``tokens`` but the last (teacher-forced)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(ref.model)
    t = time.perf_counter()
    rows = [ref.model(mx.array([ref.prompt]), cache=cache)[0, -1]]
    mx.eval(rows[-1])
    ttft = time.perf_counter() - t
    t = time.perf_counter()
    for tok in tokens[:-1]:
        rows.append(ref.model(mx.array([[tok]]), cache=cache)[0, -1])
        mx.eval(rows[-1])
    decode_s = time.perf_counter() - t
    return Run([np.array(r.astype(mx.float32)) for r in rows], ttft, decode_s)


def report(engine: str, device: Run, ref: Reference, tokens: list[int], min_agreement: float):
    """Print agreement, worst deviation and speeds side by side; fail below ``min_agreement``."""
    mlx = mlx_on_tokens(ref, tokens)
    agree = sum(int(c.argmax() == m.argmax()) for c, m in zip(device.rows, mlx.rows))
    worst = max(
        float(np.abs(c - m).max() / (m.std() + 1e-9)) for c, m in zip(device.rows, mlx.rows)
    )
    n_dec = max(1, len(tokens) - 1)
    print(f"prompt {len(ref.prompt)} tokens, {len(tokens)} steps")
    print(f"argmax agreement with MLX: {agree}/{len(tokens)}; worst max|diff|/std {worst:.3f}")
    print(
        f"time to first token: {engine} {1e3 * device.ttft:.1f} ms, MLX {1e3 * mlx.ttft:.1f} ms; "
        f"decode: {engine} {n_dec / device.decode_s:.1f} tok/s, MLX {n_dec / mlx.decode_s:.1f} "
        f"tok/s (ratio {mlx.decode_s / device.decode_s:.2f}x)"
    )
    if ref.tokenizer is not None:
        print(f"{engine} text:", repr(ref.tokenizer.decode(tokens)))
    if agree < min_agreement * len(tokens):
        raise UserError(f"only {agree}/{len(tokens)} steps agree with MLX's argmax")
