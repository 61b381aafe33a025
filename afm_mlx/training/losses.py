"""Every loss of afm_mlx, one name each, all built on one cross-entropy (``token_nll``).

* ``token_nll(logits, targets)``: next-token negative log-likelihood per position;
* ``masked_nll(model, inputs, targets)``: the training loss, mean over target tokens (windows may
  carry a loss mask, ``afm_mlx.data.tasks.encode_masked``; plain token windows count every token);
* ``nll_sum(model, batches)``: (summed NLL, target tokens) for held-out evaluation;
* ``make_loss(teacher, ...)``: ``masked_nll``, or distillation from a frozen teacher. AFM's
  distillation target is a convex mix of the true label and the teacher's top-1 prediction (0.9 on
  the teacher); the KL alternative matches the teacher's full (tempered) distribution.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from afm_mlx.core.errors import UserError
from afm_mlx.data.tasks import decode_masked


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


def masked_nll(model: nn.Module, inputs: mx.array, targets: mx.array) -> mx.array:
    """Mean next-token loss over target tokens (inputs/targets as ``encode_masked`` stores them;
    for plain token windows that is every token)."""
    inputs, _ = decode_masked(inputs)
    targets, mask = decode_masked(targets)
    loss = token_nll(model(inputs).astype(mx.float32), targets) * mask
    return loss.sum() / mx.maximum(mask.sum(), 1)


def nll_sum(model: nn.Module, batches: Iterable[np.ndarray]) -> tuple[float, int]:
    """(summed next-token NLL, number of target tokens) over windows of ``seq_len + 1`` tokens
    (with or without a loss mask, as ``masked_nll``)."""
    total, count = 0.0, 0
    for b in batches:
        ids, mask = decode_masked(mx.array(b))
        targets = mask[:, 1:]
        nll = token_nll(model(ids[:, :-1]).astype(mx.float32), ids[:, 1:]) * targets
        total += nll.sum().item()
        count += int(targets.sum().item())
    return total, count


@functools.cache
def _tempered_kl(t: float):
    """``kl(logits, teacher_logits)``: t^2 KL(teacher || student) per position at temperature
    ``t``. Its gradient, t (softmax(logits / t) - softmax(teacher_logits / t)), is computed
    from the logits again rather than kept from the forward pass: at a step's many tokens x
    vocabulary entries each kept array is large."""

    @mx.custom_function
    def kl(logits: mx.array, teacher_logits: mx.array) -> mx.array:
        log_q = logits / t - mx.logsumexp(logits / t, -1, keepdims=True)
        log_p = teacher_logits / t - mx.logsumexp(teacher_logits / t, -1, keepdims=True)
        return (t * t) * mx.sum(mx.exp(log_p) * (log_p - log_q), axis=-1)

    @kl.vjp
    def kl_vjp(primals, cotangent, output):
        logits, teacher_logits = primals
        diff = mx.softmax(logits / t, axis=-1) - mx.softmax(teacher_logits / t, axis=-1)
        return t * diff * cotangent[..., None], mx.zeros_like(teacher_logits)

    return kl


def distillation_loss(
    mode: str = "top1", weight: float = 0.9, temperature: float = 1.0
) -> Callable[[nn.Module, mx.array, mx.array, mx.array], mx.array]:
    """``loss(model, inputs, targets, teacher_logits)`` -> mean loss per token: the teacher's
    logits come computed (``make_loss`` runs the teacher in the graph; recovery runs a large
    teacher block by block before each step, ``Trainer(teacher_outputs=...)``)."""

    def distill(
        model: nn.Module, inputs: mx.array, targets: mx.array, teacher_logits: mx.array
    ) -> mx.array:
        logits = model(inputs).astype(mx.float32)
        teacher_logits = mx.stop_gradient(teacher_logits.astype(mx.float32))
        parts = []  # a term of weight 0 is not computed (each is tokens x vocabulary wide)
        if weight < 1:
            parts.append((1 - weight) * token_nll(logits, targets))
        if weight > 0 and mode == "top1":
            parts.append(weight * token_nll(logits, mx.argmax(teacher_logits, axis=-1)))
        elif weight > 0:
            parts.append(weight * _tempered_kl(temperature)(logits, teacher_logits))
        return mx.mean(sum(parts[1:], parts[0]))

    return distill


def make_loss(
    teacher: nn.Module | None = None,
    mode: str = "top1",
    weight: float = 0.9,
    temperature: float = 1.0,
) -> Callable[[nn.Module, mx.array, mx.array], mx.array]:
    """``loss(model, inputs, targets)`` -> mean loss per token, for ``nn.value_and_grad``:
    ``masked_nll``, or ``distillation_loss`` from ``teacher`` run in the same graph."""

    if teacher is None:
        return masked_nll
    distill = distillation_loss(mode, weight, temperature)

    def loss(model: nn.Module, inputs: mx.array, targets: mx.array) -> mx.array:
        return distill(model, inputs, targets, teacher(inputs))

    return loss


def choice_nll(
    model: nn.Module,
    prompt: list[int],
    choices: list[list[int]],
    targets: list[list[bool]] | None = None,
) -> list[float]:
    """Summed NLL of each choice's tokens after ``prompt`` (multiple-choice scoring); with
    ``targets``, of the tokens marked there only.

    The prompt runs once; its KV cache is then repeated for every choice, which run as one batch
    (right-padded: causal attention keeps the padding out of the positions that count).
    """
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    last = model(mx.array(prompt)[None], cache=cache)[:, -1:].astype(mx.float32)
    for c in cache:
        c.state = tuple(
            mx.repeat(a, len(choices), axis=0) if isinstance(a, mx.array) else a for a in c.state
        )
    width = max(len(c) for c in choices)
    ids = np.zeros((len(choices), width), dtype=np.int32)
    mask = np.zeros((len(choices), width), dtype=np.float32)
    for i, c in enumerate(choices):
        ids[i, : len(c)] = c
        mask[i, : len(c)] = 1 if targets is None else targets[i]
    ids_mx = mx.array(ids)
    logits = model(ids_mx[:, :-1], cache=cache).astype(mx.float32) if width > 1 else None
    first = mx.repeat(last, len(choices), axis=0)
    logits = first if logits is None else mx.concatenate([first, logits], axis=1)
    nll = (token_nll(logits, ids_mx) * mx.array(mask)).sum(axis=1)
    return nll.tolist()


def choice_accuracy(
    model: nn.Module, tokenizer, records: list[dict], desc: str = "choices"
) -> dict[str, float]:
    """Accuracy on ``{"prompt", "completion", "choices"}`` records: the prediction is the choice
    (followed by EOS, as the task adapter is trained) with the lowest NLL. Also
    ``balanced_accuracy``, the mean over answers of the share predicted right (a model that always
    names the same choice scores 1 / number of answers however the test set is skewed), and
    ``chance``, the mean of 1 / number of choices. A progress bar (``desc``) shows on a terminal."""
    from tqdm import tqdm

    from afm_mlx.data.tasks import encode_record

    hits: dict[str, list[bool]] = {}
    chance = 0.0
    for n, r in enumerate(tqdm(records, desc=desc, unit="example", disable=None, leave=False), 1):
        # Each choice is tokenized together with the prompt, as training tokenizes a record; the
        # tokens every choice shares (the prompt, unless a choice merges with its last token)
        # run once.
        encoded = [
            encode_record({"prompt": r["prompt"], "completion": c}, tokenizer) for c in r["choices"]
        ]
        shared = 0
        first = encoded[0][0]
        while all(
            shared < len(ids) and not mask[shared] and ids[shared] == first[shared]
            for ids, mask in encoded
        ):
            shared += 1
        if shared == 0:
            raise UserError(f"record {n}: a multiple-choice record needs a non-empty prompt")
        scores = choice_nll(
            model,
            first[:shared],
            [ids[shared:] for ids, _ in encoded],
            [mask[shared:] for _, mask in encoded],
        )
        predicted = r["choices"][int(np.argmin(scores))]
        hits.setdefault(r["completion"], []).append(predicted == r["completion"])
        chance += 1 / len(r["choices"])
    every = [h for per_answer in hits.values() for h in per_answer]
    return {
        "accuracy": sum(every) / len(every),
        "balanced_accuracy": float(np.mean([np.mean(h) for h in hits.values()])),
        "chance": chance / len(records),
    }
