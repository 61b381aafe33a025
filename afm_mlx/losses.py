"""Training objectives: next-token cross-entropy, and distillation from a frozen teacher.

AFM's distillation target is a convex mix of the true label and the teacher's top-1 prediction
(0.9 on the teacher); the KL alternative matches the teacher's full (tempered) distribution.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn


def _token_logprob(logits: mx.array, lse: mx.array, ids: mx.array) -> mx.array:
    return mx.take_along_axis(logits, ids[..., None], axis=-1)[..., 0] - lse


def make_loss(
    teacher: nn.Module | None = None,
    mode: str = "top1",
    weight: float = 0.9,
    temperature: float = 1.0,
) -> Callable[[nn.Module, mx.array, mx.array], mx.array]:
    """``loss(model, inputs, targets)`` -> mean loss per token, for ``nn.value_and_grad``."""

    def cross_entropy(model: nn.Module, inputs: mx.array, targets: mx.array) -> mx.array:
        logits = model(inputs).astype(mx.float32)
        return nn.losses.cross_entropy(logits, targets, reduction="mean")

    if teacher is None:
        return cross_entropy

    def distill(model: nn.Module, inputs: mx.array, targets: mx.array) -> mx.array:
        logits = model(inputs).astype(mx.float32)
        teacher_logits = mx.stop_gradient(teacher(inputs).astype(mx.float32))
        lse = mx.logsumexp(logits, axis=-1)
        label_nll = -_token_logprob(logits, lse, targets)
        if mode == "top1":
            top1 = mx.argmax(teacher_logits, axis=-1)
            teacher_nll = -_token_logprob(logits, lse, top1)
        else:
            t = temperature
            p_teacher = mx.softmax(teacher_logits / t, axis=-1)
            log_p_teacher = teacher_logits / t - mx.logsumexp(teacher_logits / t, -1, keepdims=True)
            log_p_student = logits / t - mx.logsumexp(logits / t, -1, keepdims=True)
            teacher_nll = (t * t) * mx.sum(p_teacher * (log_p_teacher - log_p_student), axis=-1)
        return mx.mean((1 - weight) * label_nll + weight * teacher_nll)

    return distill
