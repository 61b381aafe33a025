"""Palettize a model: ``python -m afm_mlx.palettize --model DIR --out DIR [--bits 4 | --target-bpw 3.7]``.

Every projection (attention and FFN ``nn.Linear``) becomes a ``PalettizedLinear`` with grouped
k-means LUTs; the embedding (and so the tied LM head) becomes an 8-bit ``PalettizedEmbedding``.
With ``--target-bpw`` each layer gets its own bit width: the damage of every (layer, bits) choice
is measured as the KL divergence of the model's next-token distribution on calibration batches
when that layer alone is palettized, and an exact multiple-choice knapsack picks the bits that
meet the budget with the least summed damage.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from afm_mlx.cli import stage_main
from afm_mlx.data import PackedDataset, build_token_cache, split_train_valid
from afm_mlx.errors import UserError
from afm_mlx.families import family_for, model_family
from afm_mlx.fileio import check_new_output, output_lock, staged_dir
from afm_mlx.kmeans import SUPPORTED_BITS, check_palettization_settings
from afm_mlx.losses import token_nll
from afm_mlx.model import (
    StreamedBlock,
    block_releaser,
    blocks_streamed,
    float32_on_cpu,
    head_slices,
    load_model,
    restore_dtypes,
    save_model,
    stored_tables,
    widen_for_cpu,
)
from afm_mlx.packing import packed_length
from afm_mlx.palettized import PalettizedLinear, bits_per_weight, palettize_model


@dataclass
class PalettizeConfig:
    model: str = field(default="", metadata={"help": "fp checkpoint folder or HF repo id"})
    out: str = field(default="", metadata={"help": "output folder for the palettized model"})
    bits: int = field(
        default=4,
        metadata={"help": "bits per weight of every projection", "choices": list(SUPPORTED_BITS)},
    )
    target_bpw: float | None = field(
        default=None, metadata={"help": "mixed bits: average bits per projection weight (2-8)"}
    )
    # 8 is left out by default: its k-means costs ~10x a 4-bit one and budgets under 6 bpw
    # rarely spend it; add it for higher budgets.
    bit_choices: list[int] = field(
        default_factory=lambda: [2, 3, 4, 6],
        metadata={"help": "bit widths --target-bpw may assign"},
    )
    group_size: int = field(default=16, metadata={"help": "channels sharing one LUT"})
    axis: int = field(
        default=0,
        metadata={"help": "0: group output channels, 1: input channels", "choices": [0, 1]},
    )
    embedding_bits: int = field(default=8, metadata={"help": "embedding bits (0: keep float)"})
    embedding_group_size: int = field(
        default=16, metadata={"help": "embedding rows sharing one LUT (1: AFM's per-channel)"}
    )
    calibration: str = field(
        default="shakespeare", metadata={"help": "calibration corpus (text, folder, .jsonl)"}
    )
    calibration_batches: int = field(default=4, metadata={"help": "calibration batches"})
    calibration_seq_len: int = field(default=128, metadata={"help": "calibration sequence length"})
    sensitivity: str = field(
        default="none",
        metadata={
            "help": "per-weight importance for k-means (fisher keeps it on disk beside --out "
            "meanwhile: 4 bytes per weight)",
            "choices": ["none", "activation", "fisher"],
        },
    )
    seed: int = field(default=0, metadata={"help": "seed for calibration sampling"})

    def validate(self) -> None:
        if not self.model or not self.out:
            raise UserError("--model and --out are required")
        if self.target_bpw is not None and not 2.0 <= self.target_bpw <= 8.0:
            raise UserError(f"--target-bpw {self.target_bpw}: must be between 2 and 8 bits")
        bad = [b for b in self.bit_choices if b not in SUPPORTED_BITS]
        if bad or not self.bit_choices:
            raise UserError(f"--bit-choices {bad}: supported bits are {list(SUPPORTED_BITS)}")
        if self.embedding_bits and self.embedding_bits not in SUPPORTED_BITS:
            raise UserError(f"--embedding-bits {self.embedding_bits}: use 0 or {SUPPORTED_BITS}")
        if self.group_size <= 0 or self.calibration_batches <= 0:
            raise UserError("--group-size and --calibration-batches must be positive")


# --- calibration -------------------------------------------------------------------------------


def calibration_batches(cfg: PalettizeConfig, model_dir: Path, vocab: int) -> list[mx.array]:
    """Token windows from the training split of the calibration corpus (held-out data untouched)."""
    cache = build_token_cache(cfg.calibration, model_dir)
    tokens, _ = split_train_valid(cache, 0.05, seed=0)
    data = PackedDataset(tokens, cfg.calibration_seq_len, f"--calibration {cfg.calibration}")
    need = cfg.calibration_batches * 4
    if len(data) < need:
        raise UserError(f"--calibration {cfg.calibration}: too little text for {need} sequences")
    order = np.random.default_rng(cfg.seed).permutation(len(data))[:need]
    batches = [mx.array(data.batch(order[i : i + 4])) for i in range(0, need, 4)]
    if max(int(b.max().item()) for b in batches) >= vocab:
        raise UserError(f"{model_dir}: tokenizer ids exceed the model's vocab_size")
    return batches


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


def linear_paths(model: nn.Module) -> list[str]:
    """Paths of the projection layers (every nn.Linear, the LM head excepted)."""
    return [
        p
        for p, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
        if isinstance(m, nn.Linear) and not p.startswith("lm_head")
    ]


def _swap(model: nn.Module, path: str, module: nn.Module) -> None:
    model.update_modules(tree_unflatten([(path, module)]))


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


_BLOCKS = "model.layers."  # where the blocks a pass streams sit (``blocks_streamed``)


def _per_block(paths: list[str]) -> dict[int, list[str]]:
    """Block index -> the paths of its projections relative to the block (``self_attn.q_proj``)."""
    out: dict[int, list[str]] = {}
    for p in paths:
        i, rel = p.removeprefix(_BLOCKS).split(".", 1)
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
    with ``release`` (``model.block_releaser``), given back to disk afterwards, so the pass
    holds one block; the logits are never computed. Otherwise the model runs whole (widened by
    the caller: afm7's blocks read caches that earlier blocks fill)."""
    modules = dict(tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module))
    shapes = {p: tuple(modules[p].weight.shape) for p in paths}
    sums: dict[str, tuple[mx.array, int]] = {}
    if streamed:
        prefix, per_block = _BLOCKS, _per_block(paths)
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
            _swap(model, p, s)
        for b in batches:
            mx.eval(model(b[:, :-1]), [s.sum_sq for s in stats.values()])
        for p, s in stats.items():
            _swap(model, p, s.inner)
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
    the vocabulary at a time: the normed states and log-sum-exp (``_reference``), then per
    slice the softmax minus the one-hot targets taken back through it, then back through the
    final norm."""
    normed, lse = _reference(model, h)
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
    (``_block_inputs``: each block widened while it runs, then given back to disk with
    ``release``); the loss gradient comes back through the head a slice at a time
    (``_head_grad``); then from the last block down each block is widened, differentiated
    alone on every batch (its weights' squared gradients summed, its input gradient passed
    down) and given back, and its importance saved to ``folder`` (``StoredImportance``).
    Holds one block, its gradients and the calibration activations, not the model."""
    prefix, per_block = _BLOCKS, _per_block(paths)
    calls, last = _block_inputs(model, [b[:, :-1] for b in batches], release)
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


# --- mixed-bit allocation ----------------------------------------------------------------------


def layer_storage_bits(shape: tuple[int, int], bits: int, group_size: int, axis: int) -> int:
    """Stored bits of a palettized (out, in) weight: packed indices + fp16 LUTs."""
    rows, cols = shape
    n_groups = (rows if axis == 0 else cols) // group_size
    return 8 * rows * packed_length(cols, bits) + 16 * n_groups * (1 << bits)


def _final_norm(model: nn.Module, h: mx.array) -> mx.array:
    with float32_on_cpu(model.model.norm) as norm:
        h = norm(h).astype(mx.float32)
        mx.eval(h)
    return h


def _reference(model: nn.Module, h: mx.array) -> tuple[mx.array, mx.array]:
    """(normed hidden states, log-sum-exp of the logits) of the fp model's last hidden states:
    what ``_kl_from_hidden`` needs instead of a (tokens x vocabulary) table of log-probabilities
    (1.2 GB for Qwen3-0.6B's default calibration)."""
    h = _final_norm(model, h)
    lse = mx.full(h.shape[:-1], -mx.inf)
    for logits in head_slices(model):
        lse = mx.logaddexp(lse, mx.logsumexp(logits(h), axis=-1))
        mx.eval(lse)
    return h, lse


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
    the fp model's ``_reference``, one head slice at a time (both sets of logits of a slice come
    from one product with the widened slice)."""
    ref_h, ref_lse = ref
    h = _final_norm(model, h)
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


class _BlockCall(StreamedBlock):
    """A ``StreamedBlock`` that records how the model calls it, and its last output."""

    def __init__(self, block: nn.Module, release=None):
        super().__init__(block, release)
        self.calls, self.last = [], None

    def __call__(self, x, *args, **kwargs):
        self.calls.append((x, args, kwargs))
        self.last = super().__call__(x, *args, **kwargs)
        return self.last


def _block_inputs(
    model: nn.Module, inputs: list[mx.array], release=None
) -> tuple[list[list[tuple]], list[mx.array]]:
    """(calls, last hidden states): calls[i][j] is (hidden state, args, kwargs) with which the
    model calls block i on batch j, and the last block's output on each batch.

    The model's own forward pass computes them, so what a family does before and between its
    blocks (Gemma's embedding scale, its sliding-window and global masks, layers without RoPE)
    is replayed exactly; nothing here knows the family. Its logits are never evaluated: the
    head runs widened in slices instead (``_reference``). With ``release``
    (``model.block_releaser``) each block goes back to disk once it has run.
    """
    last = []
    with blocks_streamed(model, release, wrap=_BlockCall) as recorders:
        for x in inputs:
            model(x)
            last.append(recorders[-1].last)
    return [r.calls for r in recorders], last


def measure_sensitivity(
    model: nn.Module,
    paths: list[str],
    choices: list[int],
    cfg: PalettizeConfig,
    batches: list[mx.array],
    importance: dict[str, mx.array] | None,
    progress=None,
    release=None,
) -> dict[str, dict[int, float]]:
    """KL(fp || model with only ``path`` palettized at b bits) for every layer and choice.

    Only the blocks from the changed layer's block onwards are re-run, from the fp hidden states
    (and masks) the model passed to each block, recorded once. A family whose blocks cannot be
    replayed alone (``Family.replay_blocks``: afm7's KV-reuse layers read a cache the earlier
    layers fill during the pass) runs whole forward passes instead. With ``release``
    (``model.block_releaser``, for a lazily loaded model) every block is given back to disk
    after each turn, so the replays hold one block at a time.
    """
    blocks = model.model.layers
    inputs = [b[:, :-1] for b in batches]
    if model_family(model).replay_blocks:
        calls, last = _block_inputs(model, inputs, release)
        ref = [_reference(model, h) for h in last]
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
            candidate = PalettizedLinear.from_linear(original, bits, cfg.group_size, cfg.axis, imp)
            _swap(model, path, candidate)
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
            _swap(model, path, original)
            if release is not None:
                release(block_index)  # the original's weight, read to build the candidate
            if progress is not None:
                progress.update(1)
    return result


def allocate_bits(
    shapes: dict[str, tuple[int, int]],
    damage: dict[str, dict[int, float]],
    target_bpw: float,
    group_size: int,
    axis: int,
    resolution: int = 20_000,
) -> dict[str, int]:
    """Bits per layer minimizing summed damage with total storage <= target_bpw x weights.

    A multiple-choice knapsack solved exactly by dynamic programming over the budget, cut into
    ``resolution`` units; costs are rounded up to whole units, so the budget is never exceeded.
    """
    paths = list(damage)
    n_weights = sum(r * c for r, c in shapes.values())
    budget = target_bpw * n_weights
    unit = budget / resolution
    options = []
    for p in paths:
        bits = sorted(damage[p])
        units = [math.ceil(layer_storage_bits(shapes[p], b, group_size, axis) / unit) for b in bits]
        options.append((bits, units, [damage[p][b] for b in bits]))
    if sum(min(units) for _, units, _ in options) > resolution:
        floor = (
            sum(
                min(layer_storage_bits(shapes[p], b, group_size, axis) for b in damage[p])
                for p in paths
            )
            / n_weights
        )
        raise UserError(
            f"--target-bpw {target_bpw}: below the smallest achievable {floor:.3f} bits per weight "
            f"with --bit-choices {sorted(damage[paths[0]])} and --group-size {group_size}"
        )
    best = np.zeros(resolution + 1)  # best[c]: least damage of the layers so far within c units
    picks = []
    for _, units, dmg in options:
        new = np.full(resolution + 1, np.inf)
        pick = np.zeros(resolution + 1, dtype=np.int8)
        for k, (u, d) in enumerate(zip(units, dmg)):
            if u > resolution:
                continue
            cand = np.full(resolution + 1, np.inf)
            cand[u:] = best[: resolution + 1 - u] + d
            better = cand < new
            new[better], pick[better] = cand[better], k
        best = new
        picks.append(pick)
    choice, c = {}, resolution
    for p, (bits, units, _), pick in zip(reversed(paths), reversed(options), reversed(picks)):
        k = int(pick[c])
        choice[p] = bits[k]
        c -= units[k]
    return {p: choice[p] for p in paths}


# --- the stage ---------------------------------------------------------------------------------


def palettize(cfg: PalettizeConfig) -> dict[str, Any]:
    """Palettize ``cfg.model`` into ``cfg.out``; returns a summary (per-layer table and totals).

    The model is written beside ``--out`` and renamed into place when complete (a kill leaves no
    half-written model), and ``--out`` is locked against a second writer meanwhile.
    """
    cfg.validate()
    out = Path(cfg.out)
    check_new_output(out)
    with output_lock(out):
        check_new_output(out)  # again: another process may have finished it meanwhile
        with contextlib.ExitStack() as cleanup:  # scratch files, removed however it ends
            return _palettize(cfg, out, cleanup)


def check_fused_groups(
    fused: dict[str, list[int]], paths: list[str], group_size: int, axis: int
) -> None:
    """A fused projection (q|k|v rows in one matrix) is palettized as its slices would be one by
    one: with groups of output rows (``axis`` 0), every slice must be a whole number of groups,
    so that no LUT is shared across two slices."""
    if axis != 0:
        return  # groups of input columns span every row of every slice alike
    for p in paths:
        for rel, slices in fused.items():
            if p.endswith("." + rel) and any(n % group_size for n in slices):
                raise UserError(
                    f"--group-size {group_size}: {p} fuses slices of {slices} rows; a group of "
                    f"rows would straddle two of them: pick a group size dividing each"
                )


def _palettize(cfg: PalettizeConfig, out: Path, cleanup: contextlib.ExitStack) -> dict[str, Any]:
    from tqdm import tqdm

    start = time.perf_counter()
    need_calibration = cfg.target_bpw is not None or cfg.sensitivity != "none"
    # The model stays on disk until a pass reads it: each layer is read, palettized and freed in
    # turn (peak: the output + one dense layer), and the sensitivity replays give every block
    # back to disk after its turn (``block_releaser``).
    model, config, model_dir = load_model(cfg.model, lazy=True)
    paths = linear_paths(model)
    if not paths:
        already = " (it is already palettized)" if "palettization" in config else ""
        raise UserError(f"--model {cfg.model}: has no float linear layers to palettize{already}")
    modules = dict(tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module))
    shapes = {p: tuple(modules[p].weight.shape) for p in paths}
    embeddings = {p: m.weight.shape for p, m in modules.items() if isinstance(m, nn.Embedding)}
    del modules  # no reference may keep a dense weight alive once its layer is palettized
    # Refuse impossible settings before any slow work.
    checks = [(p, shapes[p], cfg.group_size, cfg.axis, "--group-size") for p in paths]
    if cfg.embedding_bits:
        for path, shape in embeddings.items():
            checks.append((path, shape, cfg.embedding_group_size, 0, "--embedding-group-size"))
    for p, shape, group, axis, flag in checks:
        try:
            check_palettization_settings(tuple(shape), cfg.bits, group, axis)
        except ValueError as e:
            raise UserError(f"{flag} {group}: {p}: {e}") from e
    check_fused_groups(family_for(config, cfg.model).fused(config), paths, cfg.group_size, cfg.axis)
    batches = calibration_batches(cfg, model_dir, config["vocab_size"]) if need_calibration else []
    # The passes of a family whose blocks cannot run alone (afm7: later blocks read caches that
    # earlier ones fill) take the whole model at once: it is widened to float32 on the CPU.
    # Otherwise each block is widened while it runs (input statistics, gradients, sensitivity
    # replays) and, where the checkpoint allows, given back to disk afterwards.
    streams = family_for(config, cfg.model).replay_blocks and all(
        p.startswith(_BLOCKS) for p in paths
    )
    stored_dtypes = widen_for_cpu(model) if need_calibration and not streams else {}
    release = block_releaser(model, model_dir) if need_calibration and streams else None

    importance = None
    if cfg.sensitivity == "activation":
        importance = activation_importance(model, paths, batches, streams, release)
    elif cfg.sensitivity == "fisher" and streams:
        # Per-weight importance of every layer (4 bytes per weight) waits on disk, beside the
        # output, until its layer is palettized.
        out.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-{out.name}-", dir=out.parent))
        cleanup.callback(shutil.rmtree, scratch, ignore_errors=True)
        importance = fisher_importance_streamed(model, paths, batches, release, scratch)
    elif cfg.sensitivity == "fisher":
        importance = fisher_importance(model, paths, batches)

    if cfg.target_bpw is None:
        bits = {p: cfg.bits for p in paths}
    else:
        choices = sorted(set(cfg.bit_choices))
        with tqdm(total=len(paths) * len(choices), desc="sensitivity", unit="trial") as bar:
            damage = measure_sensitivity(
                model, paths, choices, cfg, batches, importance, bar, release
            )
        bits = allocate_bits(shapes, damage, cfg.target_bpw, cfg.group_size, cfg.axis)

    def predicate(path: str, module: nn.Module):
        if path in bits:
            return {"bits": bits[path], "group_size": cfg.group_size, "axis": cfg.axis}
        if isinstance(module, nn.Embedding) and cfg.embedding_bits:
            return {"bits": cfg.embedding_bits, "group_size": cfg.embedding_group_size, "axis": 0}
        return False

    n_layers = len(paths) + (1 if cfg.embedding_bits else 0)
    with tqdm(total=n_layers, desc="palettizing", unit="layer") as bar:

        def advance(path: str, done: int, total: int) -> None:
            bar.set_postfix_str(path.removeprefix("model."), refresh=False)
            bar.update(1)

        # The embedding's rows come from the file a slice at a time, not the table whole.
        table = stored_tables(model, model_dir)[0]
        sources = {p: table for p in embeddings if p == "model.embed_tokens" and table is not None}
        errors: dict[str, float] = {}
        try:
            chosen = palettize_model(
                model,
                predicate,
                importance=importance,
                on_layer=advance,
                errors=errors,
                sources=sources,
            )
        except ValueError as e:
            raise UserError(f"--group-size/--bits: {e}") from e
    table = [
        {"layer": p, "bits": bits[p], "shape": list(shapes[p]), "rel_mse": errors[p]} for p in paths
    ]
    new_config = dict(config)
    new_config["palettization"] = {
        "method": "grouped-kmeans-lut",
        "sensitivity": cfg.sensitivity,
        "target_bpw": cfg.target_bpw,
        "layers": chosen,
    }
    restore_dtypes(model, stored_dtypes)
    with staged_dir(out) as staged:
        save_model(staged, model, new_config, model_dir)
    bpw = bits_per_weight(model)
    size = sum(f.stat().st_size for f in out.glob("model*.safetensors"))
    proj_bits = sum(layer_storage_bits(shapes[p], bits[p], cfg.group_size, cfg.axis) for p in paths)
    proj_weights = sum(r * c for r, c in shapes.values())
    return {
        "layers": table,
        "projection_bpw": proj_bits / proj_weights,
        "model_bpw": bpw["model"],
        "size_bytes": size,
        "seconds": time.perf_counter() - start,
        "out": str(out),
    }


def print_summary(summary: dict[str, Any]) -> None:
    print(f"{'layer':<44} {'bits':>4} {'shape':>14} {'rel. error':>11}")
    for row in summary["layers"]:
        shape = "x".join(map(str, row["shape"]))
        print(f"{row['layer']:<44} {row['bits']:>4} {shape:>14} {row['rel_mse']:>11.3e}")
    print(
        f"projections {summary['projection_bpw']:.3f} bpw; whole model {summary['model_bpw']:.3f} "
        f"bpw; weights on disk {summary['size_bytes'] / 2**20:.2f} MiB; "
        f"{summary['seconds']:.1f} s; saved to {summary['out']}"
    )


def main(argv: list[str] | None = None) -> None:
    stage_main(
        PalettizeConfig,
        lambda cfg: print_summary(palettize(cfg)),
        "python -m afm_mlx.palettize",
        __doc__,
        argv,
    )


if __name__ == "__main__":
    main()
