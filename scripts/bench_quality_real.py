"""Compression quality on a real pretrained model, side by side with mlx-lm, with intervals.

    python scripts/bench_quality_real.py [--model smollm2] [--work runs/bench-real]
        [--rows fp,lut4,...] [--recovery-steps 100] [--list]

On SmolLM2-135M-Instruct (``--model smollm2``: its GGUF's weights dequantized to float32 are the
fp model) every row is one compressed model, evaluated on the held-out texts of
``scripts/real_texts.py`` (plays, news: >= 50k tokens in >= 50 documents each) and on a
500-item two-way multiple-choice task (news-mc). Rows:

- ours at fixed bits (``palettize --bits B`` with the defaults) and the settings tried to choose
  those defaults (sensitivity, group axis, embedding bits);
- ours mixed (``--target-bpw`` 3.7 / 3.0 / 2.5: the per-layer damage is measured once with the
  same library calls ``palettize`` makes, and each budget allocated from it);
- ``+rec``: with a rank-16 recovery adapter (``afm_mlx.recover``) trained on the news training
  split for ``--recovery-steps`` steps of 8 x 128 tokens (the stated token budget);
- the peers: mlx-lm ``convert -q`` at 4 / 3 / 2 bits, group 64 (embedding included, as mlx-lm
  does; our default palettizes the embedding at 8 bits: both bits per weight are printed), and
  mlx-lm's learned quantizer DWQ at 4 and 3 bits on the same news training split and step
  budget as our recovery (the peer of the ``+rec`` rows, beside the plain one).

Each row is cached in ``--work``/rows as it finishes, so an interrupted bench resumes where it
stopped. Prints a table: perplexity on each text, the paired bootstrap interval (95%, over
documents) of its difference against the peer at the same bit width (mlx-lm q4 for 4-bit and
above budgets, q3, q2), multiple-choice accuracy, bits per projection weight and per model weight,
and writes ``summary.json`` and ``quality.png`` into ``--work``. All on this machine's CPU, fp32.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from afm_mlx.core.blas import preload_openblas  # noqa: E402

preload_openblas()
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from real_texts import build_texts, paired_bootstrap, paired_bootstrap_accuracy  # noqa: E402

from afm_mlx.core.blas import backend_report  # noqa: E402
from afm_mlx.models.io import load_base, resolve_model_path  # noqa: E402

FIXED = {"lut4": 4, "lut3": 3, "lut2": 2}
MIXED = {"mix3.7": 3.7, "mix3.0": 3.0, "mix2.5": 2.5}
PEERS = {"q4": 4, "q3": 3, "q2": 2}
DWQ = {"dwq4": 4, "dwq3": 3}  # mlx-lm's learned quantizer, same data and steps as our recovery
# Settings tried at 4 and 3 bits to choose palettize's defaults: "none" is the default before
# this bench (plain k-means), the others vary one setting from activation-weighted k-means.
SWEEP = {
    "none": {"sensitivity": "none"},
    "act": {"sensitivity": "activation"},
    "fisher": {"sensitivity": "fisher"},
    "act-axis1": {"sensitivity": "activation", "axis": 1},
    "act-g8": {"sensitivity": "activation", "group_size": 8},
    "act-emb4": {"sensitivity": "activation", "embedding_bits": 4},
}
RECOVERED = ["lut4", "lut3", "lut2", "mix3.7", "mix3.0", "mix2.5"]
# Recovery data at the same token budget (on mix3.0): "+rec" trains on the news training split.
REC_DATA = {"rec": "news-train", "rec-plays": "plays-train", "rec-teacher": "teacher"}
WINDOW = 512


def all_rows() -> list[str]:
    rows = ["fp", *PEERS, *DWQ, *FIXED, *MIXED]
    rows += [f"{n}@{b}" for b in (4, 3) for n in SWEEP]
    return rows + [f"{r}+rec" for r in RECOVERED] + ["mix3.0+rec-plays", "mix3.0+rec-teacher"]


def learned_peer_of(row: str) -> str | None:
    """For a recovered row, mlx-lm's learned quantizer at the same or more bits (DWQ 4 or 3)."""
    peer = peer_of(row)
    return f"dwq{peer[1:]}" if "+rec" in row and f"dwq{peer[1:]}" in DWQ else None


def peer_of(row: str) -> str:
    bits = FIXED.get(row.split("+")[0].split("@")[0]) or MIXED.get(row.split("+")[0])
    if "@" in row:
        bits = int(row.split("@")[1].split("+")[0])
    return "q2" if bits and bits < 3 else "q3" if bits and bits < 3.7 else "q4"


# --- evaluation --------------------------------------------------------------------------------


def doc_nll(model, docs: list[list[int]]) -> np.ndarray:
    """(summed NLL, tokens) of each document, in windows of WINDOW tokens without carried context."""
    out = []
    for ids in docs:
        total, count = 0.0, 0
        for s in range(0, len(ids) - 1, WINDOW):
            x = mx.array(ids[s : s + WINDOW + 1])[None]
            logits = model(x[:, :-1]).astype(mx.float32)
            nll = nn.losses.cross_entropy(logits, x[:, 1:], reduction="sum")
            total += nll.item()
            count += x.shape[1] - 1
        out.append((total, count))
    return np.array(out)


def mc_correct(model, items) -> np.ndarray:
    """1 where the true continuation has the lower mean token loss, per item (both choices in
    one batch, the shorter padded at its end: causal attention keeps its scores exact)."""
    correct = []
    for context, choices, answer in items:
        n = max(map(len, choices))
        rows = [context + c + [c[-1]] * (n - len(c)) for c in choices]
        x = mx.array(rows)
        logits = model(x[:, :-1]).astype(mx.float32)[:, len(context) - 1 :]
        losses = nn.losses.cross_entropy(logits, x[:, len(context) :], reduction="none")
        mask = mx.arange(n)[None] < mx.array([len(c) for c in choices])[:, None]
        mean = (losses * mask).sum(axis=1) / mask.sum(axis=1)
        correct.append(int(np.argmin(np.array(mean)) == answer))
    return np.array(correct)


def bits(model) -> dict[str, float]:
    """Bits per weight as stored (LUTs, scales and biases included): over the projections (the
    blocks' matrices) and over the whole model (embedding and norms too)."""
    sums = {"proj": [0, 0], "model": [0, 0]}  # [stored bits, weights]
    for path, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        params = dict(tree_flatten(m.parameters()))
        if not params:
            continue
        stored = sum(8 * v.nbytes for v in params.values())
        if "lut" in params:  # palettized
            n = m.packed.shape[0] * m._cols
        elif isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding):
            n = m.weight.shape[0] * m.weight.shape[1] * 32 // m.bits
        else:
            n = sum(v.size for v in params.values())
        for key in ("proj", "model") if "layers." in path and n > 4096 else ("model",):
            sums[key][0] += stored
            sums[key][1] += n
    return {
        "projection_bpw": sums["proj"][0] / sums["proj"][1],
        "model_bpw": sums["model"][0] / sums["model"][1],
    }


# --- building each row's model ----------------------------------------------------------------


def _palettize(fp: Path, work: Path, name: str, **options) -> Path:
    """``palettize`` as a user runs it, calibrated (where it calibrates) on the news training split."""
    from afm_mlx.palettize import PalettizeConfig, palettize

    out = work / "models" / name
    if not (out / "config.json").is_file():
        calibration = str(work / "news-train")
        palettize(PalettizeConfig(model=str(fp), out=str(out), calibration=calibration, **options))
    return out


def _mixed(fp: Path, work: Path, target: float) -> Path:
    """``palettize --target-bpw target`` with the damage table measured once for all budgets."""
    from afm_mlx.calibration.allocation import allocate_bits
    from afm_mlx.calibration.replay import linear_paths
    from afm_mlx.calibration.sensitivity import measure_sensitivity
    from afm_mlx.models.files import save_model
    from afm_mlx.models.io import load_model
    from afm_mlx.palettization.layers import palettize_model
    from afm_mlx.palettize import PalettizeConfig, calibration_batches

    out = work / "models" / f"mix{target}"
    if (out / "config.json").is_file():
        return out
    # One calibration batch (4 x 128 tokens): the measured search replays every (layer, bits)
    # choice, 840 trials on SmolLM2, ~4x cheaper than the default 4 batches here.
    calibration = str(work / "news-train")
    cfg = PalettizeConfig(
        model=str(fp), out=str(out), calibration=calibration, calibration_batches=1
    )
    table = work / "damage.json"
    model, config, _ = load_model(fp)
    paths = linear_paths(model)
    shapes = {
        p: tuple(
            dict(tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module))[p].weight.shape
        )
        for p in paths
    }
    if not table.is_file():
        batches = calibration_batches(cfg, fp, config["vocab_size"])
        damage = measure_sensitivity(model, paths, sorted(cfg.bit_choices), batches)
        table.write_text(json.dumps(damage))
    damage = {
        p: {int(b): d for b, d in v.items()} for p, v in json.loads(table.read_text()).items()
    }
    chosen_bits = allocate_bits(shapes, damage, target, cfg.group_size, cfg.axis)

    def predicate(path, module):
        if path in chosen_bits:
            return {"bits": chosen_bits[path], "group_size": cfg.group_size, "axis": cfg.axis}
        if isinstance(module, nn.Embedding):
            return {"bits": cfg.embedding_bits, "group_size": cfg.embedding_group_size, "axis": 0}
        return False

    layers = palettize_model(model, predicate)
    save_model(
        out,
        model,
        {
            **config,
            "palettization": {
                "method": "grouped-kmeans-lut",
                "target_bpw": target,
                "layers": layers,
            },
        },
        fp,
    )
    return out


def _peer(fp: Path, out: Path, q_bits: int) -> Path:
    from mlx_lm import convert

    if not (out / "config.json").is_file():
        convert(
            str(fp),
            mlx_path=str(out),
            quantize=True,
            q_bits=q_bits,
            q_group_size=64,
            dtype="float32",
        )
    return out


def _dwq(fp: Path, work: Path, q_bits: int, steps: int) -> Path:
    """mlx-lm's DWQ (``mlx_lm.quant.dwq``: affine q{bits} g64 whose scales and biases learn the
    fp model's logits) as its command runs it, but on our news training split (its default data
    is a hub dataset) for ``steps`` steps of 8 x 128 tokens, in float32 on the CPU."""
    import copy

    from mlx_lm.quant.dwq import dwq_quantize
    from mlx_lm.utils import load, quantize_model, save

    out = work / "models" / f"dwq{q_bits}"
    if (out / "config.json").is_file():
        return out
    model, tokenizer, config = load(str(fp), return_config=True)
    docs = [tokenizer.encode(p.read_text()) for p in sorted((work / "news-train").glob("*.txt"))]
    windows = [ids[s : s + 129] for ids in docs for s in range(0, len(ids) - 128, 128)]
    order = np.random.default_rng(0).permutation(len(windows))
    train = [(windows[i], 0) for i in np.resize(order, steps * 8)]
    valid = [(windows[i], 0) for i in order[:32]]
    q_model = copy.deepcopy(model)
    _, config = quantize_model(q_model, config, group_size=64, bits=q_bits)
    opt = optim.Adam(learning_rate=1e-6, bias_correction=True)  # mlx-lm's defaults
    dwq_quantize(
        q_model, lambda batch, idx, split: model(batch), opt, train, valid, batch_size=8,
        max_seq_length=129, seed=0, dtype=mx.float32,
    )  # fmt: skip
    save(str(out), str(fp), q_model, tokenizer, config)
    return out


def _recovered(base: Path, fp: Path, work: Path, name: str, rec: str, steps: int) -> Path:
    from afm_mlx.recover import RecoverConfig, recover

    out = work / "adapters" / f"{name}+{rec}"
    data = "teacher" if REC_DATA[rec] == "teacher" else str(work / REC_DATA[rec])
    if not (out / "adapters.safetensors").is_file():
        recover(RecoverConfig(
            model=str(base), teacher=str(fp), data=data, out=str(out),
            max_steps=steps, batch_size=8, seq_len=128, eval_every=10**6, eval_batches=4,
            save_every=max(10, steps // 4), progress=False,
        ))  # fmt: skip
    return out


def build(row: str, fp: Path, work: Path, steps: int) -> tuple[Path, Path | None]:
    """(model folder, adapter folder or None) of ``row``."""
    models = work / "models"
    name, _, rec = row.partition("+")
    if name == "fp":
        folder = fp
    elif name in PEERS:
        folder = _peer(fp, models / name, PEERS[name])
    elif name in DWQ:
        folder = _dwq(fp, work, DWQ[name], steps)
    elif name in FIXED:
        folder = _palettize(fp, work, name, bits=FIXED[name])
    elif name in MIXED:
        folder = _mixed(fp, work, MIXED[name])
    elif "@" in name:
        setting, b = name.split("@")
        folder = _palettize(fp, work, name, bits=int(b), **SWEEP[setting])
    else:
        raise SystemExit(f"error: --rows: unknown row {row!r}; --list shows them")
    if rec and rec not in REC_DATA:
        raise SystemExit(f"error: --rows: unknown recovery {rec!r} in {row!r}; --list shows them")
    adapter = _recovered(folder, fp, work, name, rec, steps) if rec else None
    return folder, adapter


# --- the run -----------------------------------------------------------------------------------


def evaluate_row(row: str, fp: Path, work: Path, texts, steps: int) -> dict:
    from mlx_lm.utils import dequantize_model

    from afm_mlx.adapters.lora import load_adapter
    from afm_mlx.palettization.layers import cache_dense_weights

    start = time.perf_counter()
    folder, adapter = build(row, fp, work, steps)
    built = time.perf_counter() - start
    model, _, _ = load_base(folder)
    if adapter is not None:
        load_adapter(model, adapter)
    size = bits(model)
    # Both sides evaluated as dense GEMMs of exactly their stored values: MLX's CPU
    # quantized_matmul is single-threaded and ~80x slower than a GEMM at 512 rows
    # (scripts/bench_lut_rows.py), ours decodes per call above 128 rows.
    cache_dense_weights(model, "on")
    dequantize_model(model)
    result = {"row": row, **size, "build_s": built}
    for name, docs in texts.held_out.items():
        result[name] = doc_nll(model, docs).tolist()
    result["news-mc"] = mc_correct(model, texts.mc).tolist()
    result["eval_s"] = time.perf_counter() - start - built
    return result


def ppl(docs) -> float:
    a = np.array(docs)
    return float(np.exp(a[:, 0].sum() / a[:, 1].sum()))


def report(results: dict[str, dict], work: Path) -> None:
    header = f"{'row':<22} {'proj bpw':>8} {'model bpw':>9} {'plays ppl':>10} {'news ppl':>9} {'mc acc':>7}  vs peer (95% interval of the difference: plays | news | mc)"
    print("\n" + header)
    summary = {}
    for row, r in results.items():
        peer = results.get(peer_of(row))
        cells = [f"{row:<22} {r['projection_bpw']:>8.2f} {r['model_bpw']:>9.2f}"]
        cells.append(
            f"{ppl(r['plays']):>10.2f} {ppl(r['news']):>9.2f} {np.mean(r['news-mc']):>7.3f}"
        )
        intervals = {}
        ours = row != "fp" and not row.startswith(("q", "dwq"))
        learned = results.get(learned_peer_of(row) or "")
        for other in (peer, learned) if ours else ():
            if other is None:
                continue
            found = {
                text: paired_bootstrap(np.array(r[text]), np.array(other[text]))
                for text in ("plays", "news")
            }
            mc = (np.array(r["news-mc"]), np.array(other["news-mc"]))
            found["mc"] = paired_bootstrap_accuracy(*mc)
            intervals[other["row"]] = found
            shown = " | ".join(f"[{lo:+.2f}, {hi:+.2f}]" for lo, hi in found.values())
            cells.append(f"  {other['row']}: {shown}")
        print(" ".join(cells))
        summary[row] = {
            "projection_bpw": r["projection_bpw"], "model_bpw": r["model_bpw"],
            "plays_ppl": ppl(r["plays"]), "news_ppl": ppl(r["news"]), "mc_accuracy": float(np.mean(r["news-mc"])),
            "intervals": intervals, "build_s": r["build_s"], "eval_s": r["eval_s"],
        }  # fmt: skip
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(summary, work / "quality.png")


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, text in zip(axes, ("plays", "news")):
        for label, pick, marker in (
            ("mlx-lm affine", lambda r: r.startswith("q"), "s"),
            ("mlx-lm DWQ", lambda r: r.startswith("dwq"), "D"),
            ("ours", lambda r: r.startswith(("lut", "mix")) and "+" not in r, "o"),
            ("ours + recovery", lambda r: "+rec" in r, "^"),
        ):
            rows = [(v["model_bpw"], v[f"{text}_ppl"]) for r, v in summary.items() if pick(r)]
            if rows:
                ax.scatter(*zip(*rows), label=label, marker=marker)
        if "fp" in summary:
            ax.axhline(summary["fp"][f"{text}_ppl"], color="gray", ls="--", label="fp")
        ax.set(
            title=f"held-out {text}",
            xlabel="bits per model weight",
            ylabel="perplexity",
            yscale="log",
        )
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="the fp model (folder, .gguf, known name)")
    ap.add_argument("--work", default="runs/bench-real", help="models, adapters, cached rows")
    ap.add_argument("--rows", default=None, help="comma-separated rows (default: all; see --list)")
    ap.add_argument("--recovery-steps", type=int, default=100, help="steps of 8 x 128 tokens")
    ap.add_argument("--list", action="store_true", help="print the rows and exit")
    args = ap.parse_args()
    if args.list:
        print("\n".join(all_rows()))
        return
    rows = args.rows.split(",") if args.rows else all_rows()
    work = Path(args.work)
    (work / "rows").mkdir(parents=True, exist_ok=True)
    fp = resolve_model_path(args.model)
    print(backend_report())
    from mlx_lm.utils import load_tokenizer

    texts = build_texts(load_tokenizer(fp))
    for text in ("news", "plays"):
        folder = work / f"{text}-train"
        folder.mkdir(exist_ok=True)
        for i, doc in enumerate(texts.train[text]):
            (folder / f"{i:04d}.txt").write_text(doc)
    sizes = {k: (len(v), sum(map(len, v))) for k, v in texts.held_out.items()}
    print(f"held out (documents, tokens): {sizes}; news-mc: {len(texts.mc)} items")
    results = {}
    for row in rows:
        cached = work / "rows" / f"{row}.json"
        if not cached.is_file():
            print(f"\n== {row}", flush=True)
            result = evaluate_row(row, fp, work, texts, args.recovery_steps)
            cached.write_text(json.dumps(result))
        results[row] = json.loads(cached.read_text())
        r = results[row]
        print(
            f"{row}: plays {ppl(r['plays']):.2f}, news {ppl(r['news']):.2f}, mc {np.mean(r['news-mc']):.3f}, {r['model_bpw']:.2f} bpw ({r['build_s']:.0f} s + {r['eval_s']:.0f} s)",
            flush=True,
        )
    peers = {peer_of(r) for r in rows} | {learned_peer_of(r) for r in rows}
    for needed in peers - set(results) - {None}:
        cached = work / "rows" / f"{needed}.json"
        if cached.is_file():
            results[needed] = json.loads(cached.read_text())
    report(results, work)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")


if __name__ == "__main__":
    main()
