"""The measured damage of palettizing one layer: KL(fp || model with that layer alone
palettized at b bits) on calibration batches, for every (layer, bits) choice
(``palettize --target-bpw``).

Only the blocks from the changed layer's block onwards are re-run, from the fp hidden states the
model passed to each block; the KL is computed a head slice at a time from the difference of the
logits, which keeps the KL of a barely changed layer precise.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from afm_mlx.calibration.replay import block_inputs, final_norm, reference_stats, swap_module
from afm_mlx.core.families import model_family
from afm_mlx.models.streaming import StreamedBlock, head_slices
from afm_mlx.palettization.layers import PalettizedLinear


def _kl_sums(zp: mx.array, zq: mx.array, ref_lse: mx.array) -> list[mx.array]:
    """Per-token sums over a slice of the vocabulary, for ``_kl``: with reference logits z_p,
    candidate logits z_q, d = z_q - z_p and w = exp(z_p - L_p): sum w (exp(d) - 1), sum w d,
    sum w, and the candidate's log-sum-exp."""
    zp, zq = zp.astype(mx.float32), zq.astype(mx.float32)
    d = zq - zp
    w = mx.exp(zp - ref_lse[..., None])
    return [
        mx.sum(w * mx.expm1(d), axis=-1),
        mx.sum(w * d, axis=-1),
        mx.sum(w, axis=-1),
        mx.logsumexp(zq, axis=-1),
    ]


def _kl(sums: list[mx.array], ref_lse: mx.array) -> float:
    """Mean KL(reference || candidate) over tokens from ``_kl_sums`` of the whole vocabulary:
    KL = log(1 + E[exp(d) - 1]) - E[d], E[f] = sum w f / sum w. It is computed from d, not from
    two log-sum-exps of ~10 whose difference loses the KL of a layer barely changed (1e-4
    relative error against float64 at a KL of 1e-3, instead of 1e-7). Where exp(d) overflows,
    the log-sum-exp form is used instead."""
    shift, diff, mass, lse = sums
    precise = mx.log1p(shift / mass) - diff / mass
    robust = lse - ref_lse - mx.log(mass) - diff / mass
    return mx.mean(mx.where(mx.isfinite(shift), precise, robust)).item()


def _kl_from_hidden(model: nn.Module, h: mx.array, ref: tuple[mx.array, mx.array]) -> float:
    """Mean KL(fp || candidate) over tokens, from the candidate's last hidden states ``h`` and
    the fp model's ``reference_stats``, one head slice at a time (both sets of logits of a slice come
    from one product with the widened slice)."""
    ref_h, ref_lse = ref
    h = final_norm(model, h)
    n = ref_h.shape[0]
    sums = None
    for logits in head_slices(model):
        both = logits(mx.concatenate([ref_h, h]))
        part = _kl_sums(both[:n], both[n:], ref_lse)
        sums = (
            part
            if sums is None
            else [*map(mx.add, sums[:3], part[:3]), mx.logaddexp(sums[3], part[3])]
        )
        mx.eval(sums)
    return _kl(sums, ref_lse)


def measure_sensitivity(
    model: nn.Module,
    paths: list[str],
    choices: list[int],
    batches: list[mx.array],
    importance: Mapping[str, mx.array] | None = None,
    *,
    group_size: int = 16,
    axis: int = 0,
    progress=None,
    release=None,
) -> dict[str, dict[int, float]]:
    """KL(fp || model with only ``path`` palettized at b bits) for every layer and choice, each
    candidate palettized with ``group_size`` channels per LUT along ``axis`` (weighted by
    ``importance`` where given).

    Only the blocks from the changed layer's block onwards are re-run, from the fp hidden states
    (and masks) the model passed to each block, recorded once. A family whose blocks cannot be
    replayed alone (``Family.replay_blocks``: afm7's KV-reuse layers read a cache the earlier
    layers fill during the pass) runs whole forward passes instead. With ``release``
    (``models.streaming.block_releaser``, for a lazily loaded model) every block is given back to disk
    after each turn, so the replays hold one block at a time.
    """
    blocks = model.model.layers
    inputs = [b[:, :-1] for b in batches]
    if model_family(model).replay_blocks:
        calls, last = block_inputs(model, inputs, release)
        ref = [reference_stats(model, h) for h in last]
    else:
        logits = [model(x).astype(mx.float32) for x in inputs]
        calls, ref = None, [(z, mx.logsumexp(z, axis=-1)) for z in logits]
        mx.eval(ref)
    modules = dict(tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module))
    replays = [
        StreamedBlock(b, None if release is None else functools.partial(release, i))
        for i, b in enumerate(blocks)
    ]
    result: dict[str, dict[int, float]] = {}
    for path in paths:
        block_index = int(path.split("layers.")[1].split(".")[0])
        original = modules[path]
        result[path] = {}
        for bits in choices:
            imp = importance.get(path) if importance else None
            candidate = PalettizedLinear.from_linear(original, bits, group_size, axis, imp)
            swap_module(model, path, candidate)
            kls = []
            for j in range(len(batches)):
                if calls is None:
                    zp, ref_lse = ref[j]
                    kls.append(_kl(_kl_sums(zp, model(inputs[j]), ref_lse), ref_lse))
                    continue
                x = calls[block_index][j][0]
                for k in range(block_index, len(blocks)):
                    _, args, kwargs = calls[k][j]
                    x = replays[k](x, *args, **kwargs)
                kls.append(_kl_from_hidden(model, x, ref[j]))
            result[path][bits] = float(np.mean(kls))
            swap_module(model, path, original)
            if release is not None:
                release(block_index)  # the original's weight, read to build the candidate
            if progress is not None:
                progress.update(1)
    return result
