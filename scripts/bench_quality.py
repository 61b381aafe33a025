"""Palettization quality and decode speed, side by side with mlx-lm's affine quantization.

Held-out perplexity of one model (the demo model by default) at fp32, LUT 4-bit, mixed 3.7 and
3.5 bpw (with and without sensitivity weighting), and mlx-lm's affine q4 g64 and q3 g64 — the
same held-out windows, one run. Then decode tokens/s of the LUT 4-bit model vs mlx-lm q4 g64
through mlx-lm's own generation loop.

    python scripts/bench_quality.py [--model runs/small] [--eval-batches 20] [--sensitivity fisher]

Bits per weight (bpw) count everything stored: ours indices + fp16 LUTs; mlx-lm's packed weights
+ fp16 scales and biases (q4 g64 = 4.5). "proj" is over the projection layers, "model" over all
parameters (our embedding is 8-bit LUT, mlx-lm's is quantized like its projections).
"""

# ruff: noqa: E402  (OpenBLAS must be loaded before mlx is imported)
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from afm_mlx.runtime import preload_openblas

preload_openblas()

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler
from mlx_lm.utils import dequantize_model

from afm_mlx.data import eval_batches
from afm_mlx.evaluate import corpus_splits, perplexity
from afm_mlx.model import load, load_model
from afm_mlx.palettize import PalettizeConfig, palettize
from afm_mlx.palettized import cache_dense_weights
from afm_mlx.runtime import backend_report


def affine_quantized(model_dir: Path, bits: int, group_size: int = 64):
    """mlx-lm's affine quantization of every Linear and the embedding, scales stored in fp16."""
    model, _, _ = load_model(model_dir)
    model.set_dtype(mx.float16)
    nn.quantize(model, group_size=group_size, bits=bits)
    stored = 0
    proj_bits = proj_weights = 0
    total_weights = 0
    for _, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        params = dict(tree_flatten(m.parameters()))
        bits_here = sum(8 * a.nbytes for a in params.values())
        stored += bits_here
        if isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding):
            n = m.weight.shape[0] * m.weight.shape[1] * 32 // bits
            total_weights += n
            if isinstance(m, nn.QuantizedLinear):
                proj_bits += bits_here
                proj_weights += n
        else:
            total_weights += sum(a.size for a in params.values())
    # Compute in fp32 on the CPU (fp16 matmul is several times slower there); values unchanged.
    model.set_dtype(mx.float32)
    return model, proj_bits / proj_weights, stored / total_weights


def decode_tps(model, tokenizer, prompt: str, tokens: int) -> float:
    """mlx-lm's own generation-speed figure for ``tokens`` greedy tokens."""
    responses = stream_generate(
        model, tokenizer, prompt, max_tokens=tokens, sampler=make_sampler(temp=0.0)
    )
    return list(responses)[-1].generation_tps


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/small")
    parser.add_argument("--data", default="shakespeare")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sensitivity", default="fisher", choices=["activation", "fisher"])
    parser.add_argument("--decode-tokens", type=int, default=128)
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
    lut4_dir = None
    with tempfile.TemporaryDirectory() as tmp:
        for name, options in variants:
            out = Path(tmp) / name.replace(" ", "_").replace("+", "")
            start = time.perf_counter()
            summary = palettize(PalettizeConfig(model=str(model_dir), out=str(out), **options))
            model, _, _ = load_model(out)
            rows.append((name, summary["projection_bpw"], summary["model_bpw"], ppl(model)))
            print(f"  {name}: palettized in {time.perf_counter() - start:.1f} s", flush=True)
            if name == "LUT 4-bit":
                lut4_dir = Path(tmp) / "lut4_kept"
                out.rename(lut4_dir)
        for bits in (4, 3):
            model, proj, whole = affine_quantized(model_dir, bits)
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

        # Decode speed through mlx-lm's generation loop, same prompt and length.
        prompt = "ROMEO.\nBut soft, what light through yonder window breaks?"
        lut, tokenizer = load(lut4_dir)
        q4_model, _, _ = affine_quantized(model_dir, 4)
        decode_tps(lut, tokenizer, prompt, 8)  # warm-up
        per_call = decode_tps(lut, tokenizer, prompt, args.decode_tokens)
        cache_dense_weights(lut, "on")
        cached = decode_tps(lut, tokenizer, prompt, args.decode_tokens)
        decode_tps(q4_model, tokenizer, prompt, 8)
        theirs = decode_tps(q4_model, tokenizer, prompt, args.decode_tokens)
        print(f"\ndecode, {args.decode_tokens} tokens (mlx-lm stream_generate, greedy):")
        print(f"  LUT 4-bit, dequantize per call: {per_call:8.1f} tok/s ({per_call / theirs:.2f}x)")
        print(f"  LUT 4-bit, dense weights cached: {cached:7.1f} tok/s ({cached / theirs:.2f}x)")
        print(f"  mlx-lm affine q4 g64:            {theirs:7.1f} tok/s")


if __name__ == "__main__":
    main()
