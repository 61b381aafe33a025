"""Replaying a model's blocks on calibration batches: what the importance and sensitivity
passes share.

``block_inputs`` records how the model's own forward pass calls each block (so what a family does
before and between its blocks is replayed exactly), ``reference_stats`` keeps what a KL against the
fp model needs of its logits (the normed states and the log-sum-exp, not a tokens x vocabulary
table), and ``linear_paths`` / ``swap_module`` name and swap the projections a pass studies.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from afm_mlx.models.precision import float32_on_cpu
from afm_mlx.models.streaming import StreamedBlock, blocks_streamed, head_slices


def linear_paths(model: nn.Module) -> list[str]:
    """Paths of the projection layers (every nn.Linear, the LM head excepted)."""
    return [
        p
        for p, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
        if isinstance(m, nn.Linear) and not p.startswith("lm_head")
    ]


def swap_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` (a candidate or a watcher in place of a projection)."""
    model.update_modules(tree_unflatten([(path, module)]))


BLOCKS_PREFIX = "model.layers."  # where the blocks a pass streams sit (``blocks_streamed``)


def final_norm(model: nn.Module, h: mx.array) -> mx.array:
    with float32_on_cpu(model.model.norm) as norm:
        h = norm(h).astype(mx.float32)
        mx.eval(h)
    return h


def reference_stats(model: nn.Module, h: mx.array) -> tuple[mx.array, mx.array]:
    """(normed hidden states, log-sum-exp of the logits) of the fp model's last hidden states:
    what ``_kl_from_hidden`` needs instead of a (tokens x vocabulary) table of log-probabilities
    (1.2 GB for Qwen3-0.6B's default calibration)."""
    h = final_norm(model, h)
    lse = mx.full(h.shape[:-1], -mx.inf)
    for logits in head_slices(model):
        lse = mx.logaddexp(lse, mx.logsumexp(logits(h), axis=-1))
        mx.eval(lse)
    return h, lse


class _BlockCall(StreamedBlock):
    """A ``StreamedBlock`` that records how the model calls it, and its last output."""

    def __init__(self, block: nn.Module, release=None):
        super().__init__(block, release)
        self.calls, self.last = [], None

    def __call__(self, x, *args, **kwargs):
        self.calls.append((x, args, kwargs))
        self.last = super().__call__(x, *args, **kwargs)
        return self.last


def block_inputs(
    model: nn.Module, inputs: list[mx.array], release=None
) -> tuple[list[list[tuple]], list[mx.array]]:
    """(calls, last hidden states): calls[i][j] is (hidden state, args, kwargs) with which the
    model calls block i on batch j, and the last block's output on each batch.

    The model's own forward pass computes them, so what a family does before and between its
    blocks (Gemma's embedding scale, its sliding-window and global masks, layers without RoPE)
    is replayed exactly; nothing here knows the family. Its logits are never evaluated: the
    head runs widened in slices instead (``reference_stats``). With ``release``
    (``models.streaming.block_releaser``) each block goes back to disk once it has run.
    """
    last = []
    with blocks_streamed(model, release, wrap=_BlockCall) as recorders:
        for x in inputs:
            model(x)
            last.append(recorders[-1].last)
    return [r.calls for r in recorders], last
