"""Fold an adapter into its base: ``python -m afm_mlx.fuse --model DIR --adapter DIR --out DIR``.

Into a full-precision base the fuse is exact. A palettized (or affine-quantized) base would have
to be re-compressed, which can round the adapter's small update away (the mlx-lm bug users hit,
#1172); that is refused unless ``--allow-lossy`` is given, and then the loss is measured: each
layer's adapter error ``||W_fused - (W + dW)|| / ||dW||`` (1 = adapter erased) and held-out
perplexity before and after. ``--dequantize`` writes a dense full-precision model instead, exactly.
The unfused adapter over the LUT base is the deployment path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from afm_mlx.adapters.lora import fuse_lora, is_lossless_base, load_adapter, lora_layers
from afm_mlx.core.config import stage_main
from afm_mlx.core.errors import UserError
from afm_mlx.core.fileio import check_new_output, output_lock, staged_dir
from afm_mlx.data.batches import corpus_splits, eval_batches
from afm_mlx.models.files import save_model
from afm_mlx.models.io import load_base, resolve_model_path
from afm_mlx.palettization.layers import recorded_palettization
from afm_mlx.training.losses import nll_sum


@dataclass
class FuseConfig:
    model: str | None = field(default=None, metadata={"help": "base model folder (required)"})
    adapter: str | None = field(default=None, metadata={"help": "adapter folder (required)"})
    out: str | None = field(default=None, metadata={"help": "new model folder (required)"})
    allow_lossy: bool = field(
        default=False, metadata={"help": "re-compress a palettized/quantized base anyway"}
    )
    dequantize: bool = field(default=False, metadata={"help": "write a dense fp model (exact)"})
    data: str = field(default="shakespeare", metadata={"help": "held-out text for the loss check"})
    eval_batches: int = field(default=10, metadata={"help": "batches of the loss check (0: skip)"})
    seq_len: int = field(default=128, metadata={"help": "tokens per window of the loss check"})

    def validate(self) -> None:
        for name in ("model", "adapter", "out"):
            if not getattr(self, name):
                raise UserError(f"--{name} is required")
        check_new_output(Path(self.out))


def fuse(cfg: FuseConfig) -> dict:
    """Fuse as configured, save to ``cfg.out``; returns the measured report.

    The model is written beside ``--out`` and renamed into place when complete; ``--out`` is
    locked against a second writer meanwhile.
    """
    cfg.validate()
    with output_lock(cfg.out):
        check_new_output(Path(cfg.out))  # again, now that no one else can be writing it
        return _fuse(cfg)


def _fuse(cfg: FuseConfig) -> dict:
    model, _, config = load_base(cfg.model)
    load_adapter(model, cfg.adapter)
    lossy = not cfg.dequantize and not all(
        is_lossless_base(m.linear) for _, m in lora_layers(model)
    )
    if lossy and not cfg.allow_lossy:
        fuse_lora(model, allow_lossy=False)  # raises the explanation
    path = resolve_model_path(cfg.model)

    def ppl() -> float:
        _, valid = corpus_splits(cfg.data, path, cfg.seq_len, 0.05, 0)
        total, count = nll_sum(model, eval_batches(valid, 8, cfg.eval_batches))
        return math.exp(total / max(count, 1))

    check = lossy and cfg.eval_batches > 0
    report: dict = {"perplexity_unfused": ppl()} if check else {}
    layers = fuse_lora(model, allow_lossy=cfg.allow_lossy, dequantize=cfg.dequantize)
    errors = np.array([r["adapter_error"] for r in layers])
    report.update(
        {
            "layers": len(layers),
            "exact": not lossy,
            "adapter_error_mean": float(errors.mean()),
            "adapter_error_max": float(errors.max()),
            "layers_adapter_erased": int((errors > 0.99).sum()),
        }
    )
    if check:
        report["perplexity_fused"] = ppl()
    # config.json lists the layers left palettized (the embedding, and every layer when the fuse
    # re-compressed); with --dequantize the adapted projections are dense now. Layers of an mlx-lm
    # affine-quantized base are found by their stored scales when mlx-lm loads the model.
    with staged_dir(cfg.out) as staged:
        save_model(staged, model, recorded_palettization(model, config), path)
    return report


def _fuse_cli(cfg: FuseConfig) -> None:
    r = fuse(cfg)
    if r["exact"]:
        print(f"fused {r['layers']} layers exactly into {cfg.out}")
        return
    print(
        f"LOSSY fuse of {r['layers']} layers: adapter error mean {r['adapter_error_mean']:.3f}, "
        f"max {r['adapter_error_max']:.3f} (1 = erased); {r['layers_adapter_erased']} layers "
        "lost the adapter entirely"
    )
    if "perplexity_fused" in r:
        print(
            f"held-out perplexity: with adapter {r['perplexity_unfused']:.3f} -> fused "
            f"{r['perplexity_fused']:.3f}"
        )
    print(f"saved to {cfg.out}; the unfused adapter over the compressed base is exact")


def main(argv: list[str] | None = None) -> None:
    stage_main(FuseConfig, _fuse_cli, "python -m afm_mlx.fuse", __doc__, argv)


if __name__ == "__main__":
    main()
