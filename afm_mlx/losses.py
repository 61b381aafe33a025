"""Training objectives: next-token cross-entropy, and distillation from a frozen teacher.

AFM's distillation target is a convex mix of the true label and the teacher's top-1 prediction
(0.9 on the teacher); the KL alternative matches the teacher's full (tempered) distribution.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn


@mx.custom_function
def _softmax_nll(logits: mx.array, targets: mx.array):
    """Per-token negative log-likelihood, also returning exp(logits - max) and its row sums.

    The logits are the largest tensor of a training step, and on the CPU ``exp`` dominates its
    cost; autodiff through ``logsumexp`` would exponentiate them again in the backward pass.
    Returning the exponentials lets the custom VJP below reuse them.
    """
    peak = mx.stop_gradient(mx.max(logits, axis=-1, keepdims=True))
    exps = mx.exp(logits - peak)
    sums = mx.sum(exps, axis=-1, keepdims=True)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)
    return (mx.log(sums) + peak - picked)[..., 0], exps, sums


@_softmax_nll.vjp
def _softmax_nll_vjp(primals, cotangents, outputs):
    _, targets = primals
    _, exps, sums = outputs
    c = cotangents[0][..., None]
    grad = exps * (c / sums)  # softmax * upstream gradient
    idx = targets[..., None]
    grad = mx.put_along_axis(grad, idx, mx.take_along_axis(grad, idx, axis=-1) - c, axis=-1)
    return grad, mx.zeros_like(targets)


def token_nll(logits: mx.array, targets: mx.array) -> mx.array:
    """Next-token negative log-likelihood per position (cross-entropy without reduction)."""
    return _softmax_nll(logits, targets)[0]


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
        return mx.mean(token_nll(model(inputs).astype(mx.float32), targets))

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
