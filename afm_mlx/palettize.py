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
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from afm_mlx.calibration.allocation import allocate_bits, layer_storage_bits
from afm_mlx.calibration.importance import (
    activation_importance,
    fisher_importance,
    fisher_importance_streamed,
)
from afm_mlx.calibration.replay import BLOCKS_PREFIX, linear_paths
from afm_mlx.calibration.sensitivity import measure_sensitivity
from afm_mlx.core.config import stage_main
from afm_mlx.core.errors import UserError
from afm_mlx.core.families import family_for
from afm_mlx.core.fileio import check_new_output, output_lock, staged_dir
from afm_mlx.data.batches import PackedDataset
from afm_mlx.data.token_cache import build_token_cache, split_train_valid
from afm_mlx.models.files import save_model
from afm_mlx.models.io import load_model
from afm_mlx.models.precision import restore_dtypes, widen_for_cpu
from afm_mlx.models.streaming import block_releaser, stored_tables
from afm_mlx.palettization.layers import bits_per_weight, palettize_model
from afm_mlx.palettization.lut import SUPPORTED_BITS, check_palettization_settings


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
        p.startswith(BLOCKS_PREFIX) for p in paths
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
                model, paths, choices, batches, importance,
                group_size=cfg.group_size, axis=cfg.axis, progress=bar, release=release,
            )  # fmt: skip
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
