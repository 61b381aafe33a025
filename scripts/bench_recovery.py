"""Accuracy recovery side by side: held-out perplexity of fp, LUT 4-bit, mixed 3.7 and 3.0 bpw and
LUT 2-bit (each with rank 8/16/32 recovery adapters) and mlx-lm affine q4 g64; a task adapter from
recovery init vs zero init; LoRA training tokens/s over the LUT base vs mlx-lm QLoRA over its q4
base. One run, same data; about an hour on 2 CPU cores with the defaults.

    python scripts/bench_recovery.py [--model runs/small] [--steps 100]
    python scripts/bench_recovery.py --variants lut4 mixed3.7 q4   # only the issue's rows
    python scripts/bench_recovery.py --quick          # minutes; trains a tiny model if none given

Variants: ``lutN`` palettizes every projection to N bits, ``mixedX`` lets the palettize stage spread
X bits per projection weight over the layers by sensitivity, ``q4`` is mlx-lm's affine q4 g64.

Compressed variants palettize/quantize the projection (nn.Linear) layers only; the embedding stays
fp in every variant, so bits per weight (bpw) are over projection weights, storage counted in full
(indices + LUTs, or weights + scales + biases).
"""

# ruff: noqa: E402  (OpenBLAS must be loaded before mlx is imported)
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from afm_mlx.core.blas import preload_openblas

preload_openblas()

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from peers import is_projection

from afm_mlx.adapters.lora import DEFAULT_KEYS, LoRASettings, attach_lora, read_adapter, remove_lora
from afm_mlx.core.blas import backend_report
from afm_mlx.data.batches import DataPosition, corpus_splits, eval_batches, train_batches
from afm_mlx.data.corpus import read_corpus
from afm_mlx.data.tasks import task_datasets
from afm_mlx.models.io import load_base
from afm_mlx.palettization.layers import cache_dense_weights
from afm_mlx.palettization.lut import SUPPORTED_BITS
from afm_mlx.palettize import PalettizeConfig, palettize
from afm_mlx.training.adapters import AdapterTrainConfig, Objective, train_adapter
from afm_mlx.training.loop import Trainer, build_optimizer
from afm_mlx.training.losses import make_loss, masked_nll, nll_sum


def bpw(model: nn.Module) -> float:
    """Stored bits per projection weight (everything the layer stores)."""
    bits = weights = 0
    for _, m in model.named_modules():
        if type(m).__name__ == "PalettizedLinear":
            bits += 8 * (m.packed.nbytes + m.lut.nbytes)
            weights += m.input_dims * m.output_dims
        elif isinstance(m, nn.QuantizedLinear):
            bits += 8 * (m.weight.nbytes + m.scales.nbytes + m.biases.nbytes)
            weights += m.weight.shape[0] * m.weight.shape[1] * 32 // m.bits
        elif isinstance(m, nn.Linear):
            bits += 8 * m.weight.nbytes
            weights += m.weight.size
    return bits / weights


def variant_options(kind: str) -> dict:
    """PalettizeConfig options for a variant name (``{}`` for mlx-lm's q4)."""
    try:
        if kind == "q4":
            return {}
        if kind.startswith("lut") and int(kind[3:]) in SUPPORTED_BITS:
            return {"bits": int(kind[3:])}
        if kind.startswith("mixed") and 2 <= float(kind[5:]) <= 8:
            return {"target_bpw": float(kind[5:])}
    except ValueError:
        pass
    raise ValueError(
        f"--variants {kind}: use lutN (N in {list(SUPPORTED_BITS)}), mixedX (2 <= X <= 8) or q4"
    )


def perplexity(model, valid, args) -> float:
    total, count = nll_sum(model, eval_batches(valid, args.batch_size, args.eval_batches))
    return math.exp(total / count)


def quick_teacher(tmp: Path) -> Path:
    from afm_mlx.train import TrainConfig, train

    corpus = tmp / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(read_corpus("shakespeare")[:12]):
        (corpus / f"play{i:02d}.txt").write_text(doc[:40_000])
    cfg = TrainConfig(
        preset="tiny", data=str(corpus), out=str(tmp / "fp"), max_steps=150, batch_size=8,
        seq_len=64, learning_rate=1e-2, eval_every=1000, save_every=1000, sample_tokens=0,
        progress=False,
    )  # fmt: skip
    return train(cfg)


def adapter_cfg(args, out: Path, rank: int, steps: int, lr: float) -> AdapterTrainConfig:
    return AdapterTrainConfig(
        model="(in memory)", out=str(out), rank=rank, max_steps=steps, batch_size=args.batch_size,
        seq_len=args.seq_len, learning_rate=lr, eval_every=10**9, save_every=10**9,
        log_every=max(1, steps // 5), progress=False,
    )  # fmt: skip


def task_file(tmp: Path, n: int = 400) -> Path:
    """A continuation task from the corpus: prompt = a line of verse, completion = the next one."""
    lines = [
        ln.strip() for ln in read_corpus("shakespeare")[-1].splitlines() if len(ln.strip()) > 20
    ]
    path = tmp / "task.jsonl"
    with path.open("w") as f:
        for a, b in list(zip(lines, lines[1:]))[:n]:
            f.write(json.dumps({"prompt": a + "\n", "completion": b}) + "\n")
    return path


def lora_tokens_per_s(model, data, args, steps: int) -> float:
    """Our Trainer on a LoRA-wrapped frozen base (rank 16, next-token loss)."""
    attach_lora(model, LoRASettings(rank=16))
    model.train()
    cfg = adapter_cfg(args, Path("/nonexistent"), 16, steps + 3, 1e-3)
    opt = build_optimizer(cfg, model)
    trainer = Trainer(model, opt, make_loss(), 1, 1.0)
    batches = train_batches(data, args.batch_size, 0, DataPosition())
    for i in range(steps + 3):
        if i == 3:  # after compilation
            start = time.perf_counter()
        loss, norm = trainer.step([next(batches)[0]])
        mx.eval(loss, norm, model.trainable_parameters(), opt.state)
    tps = steps * args.batch_size * args.seq_len / (time.perf_counter() - start)
    remove_lora(model)
    model.eval()
    return tps


def mlx_lm_lora_tokens_per_s(model, data, args, steps: int) -> float:
    """mlx-lm's own trainer, LoRA rank 16 on the same keys over ``model`` (QLoRA over q4)."""
    from mlx_lm.tuner.trainer import TrainingArgs, TrainingCallback
    from mlx_lm.tuner.trainer import train as mlx_lm_train
    from mlx_lm.tuner.utils import linear_to_lora_layers, remove_lora_layers

    class Reports(TrainingCallback):
        reports: list = []

        def on_train_loss_report(self, info):
            self.reports.append(info)

    model.freeze()
    lora = {"rank": 16, "scale": 2.0, "dropout": 0.0, "keys": list(DEFAULT_KEYS)}
    linear_to_lora_layers(model, len(model.layers), lora)
    n = args.seq_len + 1
    dataset = [(data.window(i).astype(np.int64).tolist(), 0) for i in range(min(len(data), 512))]
    reports = Reports()
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArgs(
            batch_size=args.batch_size, iters=3 + steps, steps_per_report=3 if steps % 3 == 0 else 1,
            steps_per_eval=10**9, steps_per_save=10**9, max_seq_length=n,
            adapter_file=str(Path(tmp) / "adapters.safetensors"),
        )  # fmt: skip
        mlx_lm_train(model, optim.Adam(1e-3), dataset, None, args=targs, training_callback=reports)
    remove_lora_layers(model)
    steady = [r["tokens_per_second"] for r in reports.reports if r["iteration"] > 3]
    return float(np.mean(steady))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/small", help="fp demo model (the teacher)")
    ap.add_argument("--quick", action="store_true", help="small, fast settings")
    ap.add_argument("--steps", type=int, default=100, help="recovery steps")
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--task-steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--eval-batches", type=int, default=0, help="0: all held-out windows")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--kd-weight", type=float, default=1.0, help="KL share (rest: next-token)")
    ap.add_argument(
        "--variants",
        nargs="+",
        default=["lut4", "mixed3.7", "mixed3.0", "lut2", "q4"],
        help="lutN, mixedX, q4 (the 3.0 / 2-bit rows show recovery where there is a gap)",
    )
    ap.add_argument("--speed-only", action="store_true", help="only the LoRA tokens/s comparison")
    ap.add_argument("--no-speed", action="store_true", help="skip the LoRA tokens/s comparison")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # rows appear as measured, also in a log file
    for kind in args.variants:
        try:
            variant_options(kind)
        except ValueError as e:
            ap.error(str(e))
    if "lut4" not in args.variants:
        ap.error("--variants: lut4 is required (the task adapter and speed rows use it)")
    tmp = Path(tempfile.mkdtemp(prefix="bench_recovery_"))
    if args.quick:
        args.steps, args.task_steps, args.seq_len, args.eval_batches = 40, 30, 64, 10
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        if not args.quick:
            raise SystemExit(
                f"{model_dir}: no model; train one (python -m afm_mlx.train) or use --quick"
            )
        print("no --model found: training a tiny fp model for the quick run ...", flush=True)
        model_dir = quick_teacher(tmp)
    print(backend_report())
    teacher, tokenizer, _ = load_base(model_dir)
    teacher.freeze()
    train, valid = corpus_splits("shakespeare", model_dir, args.seq_len, 0.05, 0)
    print(
        f"model {model_dir}; {len(train)} train / {len(valid)} held-out windows of {args.seq_len}"
    )
    ppl_fp = perplexity(teacher, valid, args)
    rows = [("fp32", 32.0, ppl_fp, {})]

    def compressed(kind: str) -> tuple[nn.Module, float]:
        """(model, bits per projection weight): our stage's palettization (fp embedding, like
        every variant here), or mlx-lm's affine q4 g64 from fp16 weights (fp16 scales: 4.5)."""
        if kind == "q4":
            model, _, _ = load_base(model_dir)
            model.set_dtype(mx.float16)
            nn.quantize(model, group_size=64, bits=4, class_predicate=is_projection)
            bits = bpw(model)
            model.set_dtype(mx.float32)  # fp32 compute on the CPU; stored values unchanged
        else:
            options = variant_options(kind)
            out = tmp / f"{kind}-model"
            palettize(PalettizeConfig(model=str(model_dir), out=str(out), embedding_bits=0,
                                      **options))  # fmt: skip
            model, _, _ = load_base(out)
            bits = bpw(model)
        mx.eval(model.parameters())
        return model, bits

    recovery_dirs, bases = {}, {}
    for kind in ("lut4", "q4") if args.speed_only else args.variants:
        model, bits = compressed(kind)
        bases[kind] = model
        if args.speed_only:
            continue
        ppl = perplexity(model, valid, args)
        recovered = {}
        for rank in args.ranks if kind != "q4" else []:
            out = tmp / f"{kind}-r{rank}"
            objective = Objective(make_loss(teacher, "kl", args.kd_weight, 1.0), [teacher.state])
            summary = train_adapter(
                adapter_cfg(args, out, rank, args.steps, args.lr), model, objective, (train, valid)
            )
            recovered[rank] = (perplexity(model, valid, args), summary["tokens_per_s"])
            recovery_dirs[(kind, rank)] = out
            remove_lora(model)
        rows.append((kind, bits, ppl, recovered))

    if not args.speed_only:
        print("\nheld-out perplexity (same data, same run)")
        print(
            f"{'variant':<9} {'bpw':>6} {'bare':>9}"
            + "".join(f" {'+r' + str(r):>16}" for r in args.ranks)
        )
        for kind, bits, ppl, rec in rows:
            # A gap under 0.2% of the fp perplexity is within what a different eval subset moves;
            # a share of it closed would be a ratio of noise, so none is printed.
            gap = ppl - ppl_fp > 0.002 * ppl_fp
            cells = "".join(
                f" {rec[r][0]:>8.3f} " + (
                    f"({100 * (ppl - rec[r][0]) / (ppl - ppl_fp):>4.0f}%)" if gap else f"{'(-)':>7}"
                ) if r in rec else f" {'':>16}"
                for r in args.ranks
            )  # fmt: skip
            print(f"{kind:<9} {bits:>6.2f} {ppl:>9.3f}{cells}")
        print("(% = share of the gap to fp32 closed by the adapter; (-) = gap under 0.2% of fp32)")

        # Task adapter on the LUT-4 base: starting from the rank-16 (or first) recovery adapter vs zero.
        rank = 16 if 16 in args.ranks else args.ranks[0]
        task_train, task_valid = task_datasets(task_file(tmp), tokenizer, args.seq_len, 0.1, 0)
        base = bases["lut4"]
        task_loss = {}
        for init in ("recovery", "zero"):
            out = tmp / f"task-{init}"
            init_adapter = (
                read_adapter(recovery_dirs[("lut4", rank)]) if init == "recovery" else None
            )
            train_adapter(
                adapter_cfg(args, out, rank, args.task_steps, 1e-3), base, Objective(masked_nll),
                (task_train, task_valid), init_adapter=init_adapter,
            )  # fmt: skip
            total, count = nll_sum(base, eval_batches(task_valid, args.batch_size, 0))
            task_loss[init] = total / count
            remove_lora(base)
        print(
            f"\ntask adapter (rank {rank}, LUT-4 base, {args.task_steps} steps): held-out answer loss "
            f"recovery init {task_loss['recovery']:.4f} vs zero init {task_loss['zero']:.4f}"
        )

    if args.no_speed:
        return
    steps = 6 if args.quick else 30
    print(
        f"\nLoRA training tokens/s (rank 16, batch {args.batch_size} x {args.seq_len}, same run):"
    )
    # Training batches are far beyond the LUT kernel's rows: ours dequantizes each layer and runs
    # OpenBLAS GEMMs, mlx-lm's QLoRA runs MLX's CPU quantized matmul (no BLAS path). That pair is
    # "quantized base vs quantized base" as users run them, not one kernel against another; the
    # like-for-like pair is our dense cache vs mlx-lm's LoRA over the same fp32 model.
    lut = lora_tokens_per_s(bases["lut4"], train, args, steps)
    print(f"  afm_mlx over LUT-4 base (dequantize per step): {lut:>9,.0f}", flush=True)
    cache_dense_weights(bases["lut4"], "on")
    lut_cached = lora_tokens_per_s(bases["lut4"], train, args, steps)
    print(f"  afm_mlx over LUT-4 base (dense weights cached): {lut_cached:>8,.0f}", flush=True)
    q4_mlx_lm = mlx_lm_lora_tokens_per_s(bases["q4"], train, args, steps)
    print(f"  mlx-lm QLoRA trainer over q4 base:              {q4_mlx_lm:>8,.0f}")
    fp_mlx_lm = mlx_lm_lora_tokens_per_s(load_base(model_dir)[0], train, args, steps)
    print(f"  mlx-lm LoRA trainer over the fp32 base:         {fp_mlx_lm:>8,.0f}")
    print(
        f"  LUT-4 (dequantize + BLAS) / mlx-lm QLoRA (CPU quantized matmul): {lut / q4_mlx_lm:.2f}x"
    )
    print(
        f"  LUT-4 dense cache / mlx-lm LoRA over fp32 (both dense): {lut_cached / fp_mlx_lm:.2f}x"
    )


if __name__ == "__main__":
    main()
