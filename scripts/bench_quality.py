"""Palettization quality, side by side with mlx-lm's affine quantization.

Held-out perplexity of one model (the demo model by default) at fp32, LUT 4-bit, mixed 3.7 and
3.5 bpw (with and without sensitivity weighting), and mlx-lm's affine q4 g64 and q3 g64 — the
same held-out windows, one run. Decode speed is ``scripts/bench_decode.py``.

    python scripts/bench_quality.py [--model runs/small] [--eval-batches 20] [--sensitivity fisher]

Like with like: both sides compress the same layers, every attention and MLP projection, and keep
the embedding (and tied head) in float. Bits per weight (bpw) count everything stored: ours
indices + fp16 LUTs; mlx-lm's packed weights + fp16 scales and biases (q4 g64 = 4.5). "proj" is
over the projections, "model" over all parameters.
"""

# ruff: noqa: E402  (OpenBLAS must be loaded before mlx is imported)
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from afm_mlx.core.blas import preload_openblas

preload_openblas()

from mlx_lm.utils import dequantize_model
from peers import affine_quantized, is_projection

from afm_mlx.core.blas import backend_report
from afm_mlx.data.batches import corpus_splits, eval_batches
from afm_mlx.evaluate import perplexity
from afm_mlx.models.io import load_model
from afm_mlx.palettize import PalettizeConfig, palettize


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/small")
    parser.add_argument("--data", default="shakespeare")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sensitivity", default="fisher", choices=["activation", "fisher"])
    args = parser.parse_args()
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        sys.exit(f"error: --model {model_dir}: no checkpoint; train one: python -m afm_mlx.train")
    print(backend_report())
    _, valid = corpus_splits(args.data, model_dir, args.seq_len, 0.05, 0)

    def ppl(model) -> float:
        return perplexity(model, eval_batches(valid, args.batch_size, args.eval_batches))

    n_tokens = min(len(valid), args.eval_batches * args.batch_size) * args.seq_len
    print(f"held-out: {n_tokens} tokens of {args.data} (the training run's validation split)\n")
    rows = []
    fp, _, _ = load_model(model_dir)
    rows.append(("fp32", 32.0, 32.0, ppl(fp)))
    variants = [
        ("LUT 4-bit", dict(bits=4)),
        ("mixed 3.7", dict(target_bpw=3.7)),
        (f"mixed 3.7 +{args.sensitivity}", dict(target_bpw=3.7, sensitivity=args.sensitivity)),
        ("mixed 3.5", dict(target_bpw=3.5)),
        (f"mixed 3.5 +{args.sensitivity}", dict(target_bpw=3.5, sensitivity=args.sensitivity)),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name, options in variants:
            out = Path(tmp) / name.replace(" ", "_").replace("+", "")
            start = time.perf_counter()
            config = PalettizeConfig(
                model=str(model_dir), out=str(out), embedding_bits=0, **options
            )
            summary = palettize(config)
            model, _, _ = load_model(out)
            rows.append((name, summary["projection_bpw"], summary["model_bpw"], ppl(model)))
            print(f"  {name}: palettized in {time.perf_counter() - start:.1f} s", flush=True)
        for bits in (4, 3):
            model, proj, whole = affine_quantized(model_dir, bits, class_predicate=is_projection)
            # Same values, evaluated through dense weights: the CPU's quantized matmul is slow.
            rows.append((f"mlx-lm q{bits} g64", proj, whole, ppl(dequantize_model(model))))

        print(f"\n{'variant':<24} {'proj bpw':>9} {'model bpw':>10} {'perplexity':>11}")
        for name, proj, whole, p in rows:
            print(f"{name:<24} {proj:>9.3f} {whole:>10.3f} {p:>11.3f}")
        base = rows[0][3]
        q4 = next(r for r in rows if r[0] == "mlx-lm q4 g64")
        for name, _, _, p in rows[1:]:
            print(f"  {name:<22} {p - base:+.3f} ppl vs fp32")
        best_mixed = min((r for r in rows if r[0].startswith("mixed 3.7")), key=lambda r: r[3])
        print(
            f"\nbest mixed 3.7 ({best_mixed[0]}): ppl {best_mixed[3]:.3f} at {best_mixed[1]:.2f} "
            f"bpw vs mlx-lm q4 g64 {q4[3]:.3f} at {q4[1]:.2f} bpw"
        )


if __name__ == "__main__":
    main()
