"""Per-weight importance for weighted k-means (``palettize --sensitivity``).

``activation_importance``: E[x_j^2] of each projection's input channel j, gathered while each
block runs (kept as one vector per layer). ``fisher_importance``: the diagonal Fisher (mean squared
gradient of the loss, as in SqueezeLLM), for a whole model or, ``fisher_importance_streamed``, one
block at a time with the head a vocabulary slice at a time, each layer's importance waiting on disk.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from afm_mlx.calibration.replay import BLOCKS_PREFIX, block_inputs, reference_stats, swap_module
from afm_mlx.models.precision import float32_on_cpu
from afm_mlx.models.streaming import StreamedBlock, blocks_streamed, head_slices
from afm_mlx.training.losses import token_nll


class _InputStats(nn.Module):
    """Wraps a Linear to accumulate the second moment of each input channel."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.sum_sq = mx.zeros((inner.weight.shape[1],))
        self.count = 0

    def __call__(self, x: mx.array) -> mx.array:
        flat = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        self.sum_sq = self.sum_sq + mx.sum(flat * flat, axis=0)
        self.count += flat.shape[0]
        return self.inner(x)


class ColumnImportance(Mapping):
    """Per-weight importance that is the same down each column (``E[x_j^2]`` of input channel
    ``j``), kept as one vector per layer: a lookup broadcasts it to the weight's shape afresh,
    so (rows x cols) float32 arrays never pile up (4 bytes per weight of the whole model)."""

    def __init__(self, columns: dict[str, mx.array], shapes: dict[str, tuple[int, int]]):
        self.columns, self.shapes = columns, shapes

    def __getitem__(self, path: str) -> mx.array:
        return mx.broadcast_to(self.columns[path][None, :], self.shapes[path])

    def __iter__(self):
        return iter(self.columns)

    def __len__(self) -> int:
        return len(self.columns)


def _per_block(paths: list[str]) -> dict[int, list[str]]:
    """Block index -> the paths of its projections relative to the block (``self_attn.q_proj``)."""
    out: dict[int, list[str]] = {}
    for p in paths:
        i, rel = p.removeprefix(BLOCKS_PREFIX).split(".", 1)
        out.setdefault(int(i), []).append(rel)
    return out


class _StatsBlock(StreamedBlock):
    """A ``StreamedBlock`` that adds up the second moment of its projections' inputs each time
    it runs (``sums[rel]``: (sum of x_j^2 per input channel, tokens))."""

    def __init__(self, block: nn.Module, release=None, rels: list[str] = ()):
        super().__init__(block, release)
        self.rels, self.sums = rels, {}

    def run(self, block: nn.Module, x, *args, **kwargs):
        leaves = dict(tree_flatten(block.leaf_modules(), is_leaf=nn.Module.is_module))
        stats = {rel: _InputStats(leaves[rel]) for rel in self.rels}
        block.update_modules(tree_unflatten(list(stats.items())))
        try:
            out = block(x, *args, **kwargs)
            mx.eval(out, [s.sum_sq for s in stats.values()])
        finally:
            block.update_modules(tree_unflatten([(r, s.inner) for r, s in stats.items()]))
        for rel, s in stats.items():
            total, count = self.sums.get(rel, (0, 0))
            self.sums[rel] = (total + s.sum_sq, count + s.count)
        return out


def activation_importance(
    model: nn.Module, paths: list[str], batches, streamed: bool = False, release=None
) -> ColumnImportance:
    """Per-weight importance E[x_j^2] of each layer's input channel j (the same down a column).

    ``streamed``: the blocks run one at a time, each widened to float32 only while it runs and,
    with ``release`` (``models.streaming.block_releaser``), given back to disk afterwards, so the pass
    holds one block; the logits are never computed. Otherwise the model runs whole (widened by
    the caller: afm7's blocks read caches that earlier blocks fill)."""
    modules = dict(tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module))
    shapes = {p: tuple(modules[p].weight.shape) for p in paths}
    sums: dict[str, tuple[mx.array, int]] = {}
    if streamed:
        prefix, per_block = BLOCKS_PREFIX, _per_block(paths)
        with blocks_streamed(model, release, wrap=_StatsBlock) as blocks:
            for i, block in enumerate(blocks):
                block.rels = per_block.get(i, [])
            for b in batches:
                model(b[:, :-1])  # the logits stay an unevaluated graph
        for i, block in enumerate(blocks):
            sums.update({f"{prefix}{i}.{rel}": v for rel, v in block.sums.items()})
    else:
        stats = {p: _InputStats(modules[p]) for p in paths}
        for p, s in stats.items():
            swap_module(model, p, s)
        for b in batches:
            mx.eval(model(b[:, :-1]), [s.sum_sq for s in stats.values()])
        for p, s in stats.items():
            swap_module(model, p, s.inner)
        sums = {p: (s.sum_sq, s.count) for p, s in stats.items()}
    columns = {p: sums[p][0] / sums[p][1] + 1e-8 for p in paths}
    mx.eval(columns)
    return ColumnImportance(columns, shapes)


def fisher_importance(model: nn.Module, paths: list[str], batches) -> dict[str, mx.array]:
    """Diagonal Fisher (mean squared gradient of the loss) per weight, as in SqueezeLLM."""

    def loss(m, b):
        return mx.mean(token_nll(m(b[:, :-1]).astype(mx.float32), b[:, 1:]))

    grad_fn = nn.value_and_grad(model, loss)
    wanted = {f"{p}.weight" for p in paths}
    acc: dict[str, mx.array] = {}
    for b in batches:
        _, grads = grad_fn(model, b)
        for name, g in tree_flatten(grads):
            if name in wanted:
                acc[name] = acc.get(name, 0) + g.astype(mx.float32) ** 2
        mx.eval(acc)
    return {p: acc[f"{p}.weight"] / len(batches) + 1e-12 for p in paths}


class StoredImportance(Mapping):
    """Per-weight importance kept on disk, one safetensors file per block (``files[path]``): a
    lookup reads that layer's array afresh (lazily: when the caller evaluates it), so the
    importance of the whole model (4 bytes per weight) is never in memory at once."""

    def __init__(self, files: dict[str, Path]):
        self.files = files

    def __getitem__(self, path: str) -> mx.array:
        return mx.load(str(self.files[path]))[path]

    def __iter__(self):
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def _head_grad(model: nn.Module, h: mx.array, targets: mx.array) -> mx.array:
    """d(mean next-token NLL)/d(last block's output ``h``), with the head widened one slice of
    the vocabulary at a time: the normed states and log-sum-exp (``reference_stats``), then per
    slice the softmax minus the one-hot targets taken back through it, then back through the
    final norm."""
    normed, lse = reference_stats(model, h)
    start, grad = 0, mx.zeros_like(normed)
    for logits in head_slices(model):
        z = logits(normed)
        ids = mx.arange(start, start + z.shape[-1])
        cot = (mx.exp(z - lse[..., None]) - (targets[..., None] == ids)) / targets.size
        grad = grad + mx.vjp(logits, [normed], [cot])[1][0]
        mx.eval(grad)
        start += z.shape[-1]
    with float32_on_cpu(model.model.norm) as norm:
        back = mx.vjp(lambda x: norm(x).astype(mx.float32), [h], [grad])[1][0]
        mx.eval(back)
    return back


def fisher_importance_streamed(
    model: nn.Module, paths: list[str], batches, release, folder: Path
) -> StoredImportance:
    """``fisher_importance`` a block at a time: a forward pass records each block's inputs
    (``block_inputs``: each block widened while it runs, then given back to disk with
    ``release``); the loss gradient comes back through the head a slice at a time
    (``_head_grad``); then from the last block down each block is widened, differentiated
    alone on every batch (its weights' squared gradients summed, its input gradient passed
    down) and given back, and its importance saved to ``folder`` (``StoredImportance``).
    Holds one block, its gradients and the calibration activations, not the model."""
    prefix, per_block = BLOCKS_PREFIX, _per_block(paths)
    calls, last = block_inputs(model, [b[:, :-1] for b in batches], release)
    cots = [_head_grad(model, h, b[:, 1:]) for h, b in zip(last, batches)]
    del last
    blocks = model.model.layers
    files: dict[str, Path] = {}
    for i in reversed(range(len(blocks))):
        rels = per_block.get(i, [])
        names = [f"{rel}.weight" for rel in rels]
        acc = [0.0] * len(names)
        with float32_on_cpu(blocks[i]) as block:
            params = dict(tree_flatten(block.parameters()))
            weights = [params[n] for n in names]
            for j, (x, args, kwargs) in enumerate(calls[i]):

                def run(x, *ws, names=names, args=args, kwargs=kwargs):
                    block.update(tree_unflatten(list(zip(names, ws))))
                    return block(x, *args, **kwargs)

                _, grads = mx.vjp(run, [x, *weights], [cots[j]])
                cots[j] = grads[0]
                acc = [a + g.astype(mx.float32) ** 2 for a, g in zip(acc, grads[1:])]
                mx.eval(cots[j], acc)
            block.update(tree_unflatten(list(zip(names, weights))))
        calls[i] = None  # this block's inputs are no longer needed
        if release is not None:
            release(i)
        if rels:
            arrays = {f"{prefix}{i}.{rel}": a / len(batches) + 1e-12 for rel, a in zip(rels, acc)}
            file = folder / f"block{i}.safetensors"
            mx.save_safetensors(str(file), arrays)
            files.update({p: file for p in arrays})
            del arrays, acc
    return StoredImportance({p: files[p] for p in paths})
