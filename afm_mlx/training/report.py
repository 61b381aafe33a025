"""Run reports: the loss-curve PNG, a short generated sample, and the pipeline's report.html."""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Any

from afm_mlx.core.fileio import atomic_write_json, atomic_write_text, read_json, safetensors_shapes

# The pipeline's summary table, in report.html and in the terminal.
TABLE_HEADER = [
    "stage", "held-out perplexity", "task: balanced accuracy", "task: answer loss", "time (s)",
]  # fmt: skip


def _figure(width: float = 7, height: float = 4):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=100)


def _save(fig, path: Path) -> None:
    """Write a figure as a PNG, atomically."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    fig.tight_layout()
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def plot_losses(history: list[dict], path: str | Path) -> None:
    """Training and validation loss against step, written atomically as a PNG."""
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    valid = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    if not train and not valid:
        return
    fig, ax = _figure()
    if train:
        ax.plot(*zip(*train), label="train")
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, Path(path))


def sample_text(model_dir: str | Path, prompt: str, max_tokens: int, seed: int = 0) -> str:
    """Generate ``max_tokens`` from a saved model with mlx-lm's generation (temperature 0.8)."""
    import mlx.core as mx
    from mlx_lm.generate import generate
    from mlx_lm.sample_utils import make_sampler

    from afm_mlx.models.io import load

    model, tokenizer = load(model_dir)
    mx.random.seed(seed)
    return prompt + generate(
        model, tokenizer, prompt, max_tokens=max_tokens, sampler=make_sampler(temp=0.8, top_p=0.95)
    )


def _read_history(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _folder_bytes(path: Path) -> int | None:
    if not path.exists():
        return None
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _weights_bytes(folder: Path) -> int | None:
    files = sorted(folder.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else None


def bits_per_layer(palettized: Path) -> tuple[dict[str, int], float]:
    """Each palettized projection's bits (from config.json) and their mean weighted by size."""
    config = read_json(palettized / "config.json", "model config")
    layers = config.get("palettization", {}).get("layers", {})
    shapes = {}
    for f in sorted(palettized.glob("*.safetensors")):
        shapes.update(safetensors_shapes(f))
    bits, total, weighted = {}, 0, 0.0
    for name, settings in sorted(layers.items()):
        if "embed" in name:  # the embedding has its own bits; the budget counts projections
            continue
        bits[name] = settings["bits"]
        (rows, packed_cols), _ = shapes[f"{name}.packed"]  # each row: cols * bits / 8 bytes
        n = rows * packed_cols * 8 // settings["bits"]
        total += n
        weighted += n * settings["bits"]
    return bits, (weighted / total if total else float("nan"))


def _png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _plot_pipeline(
    out: Path, curves: dict[str, list[dict]], evaluation: dict, bits: dict
) -> list[Path]:
    """The report's PNGs: loss curves, perplexity per stage, bits per layer, task accuracy."""
    pngs = []
    fig, axes = _figure(11, 3.4 * ((len(curves) + 1) // 2))
    fig.clf()
    for k, (name, history) in enumerate(curves.items(), 1):
        ax = fig.add_subplot((len(curves) + 1) // 2, 2, k)
        train = [(r["step"], r["loss"]) for r in history if "loss" in r]
        valid = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
        if train:
            ax.plot(*zip(*train), "-", color="#4c72b0", label="train")
        # The validation loss gets its own axis: a recovery run trains on the KL to the teacher
        # but is validated on next-token loss, on another scale.
        twin = ax.twinx()
        if valid:
            twin.plot(*zip(*valid), "o-", color="#dd8452", label="validation")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (nats/token)", color="#4c72b0")
        twin.set_ylabel("validation loss", color="#dd8452")
        ax.grid(alpha=0.3)
    _save(fig, out / "losses.png")
    pngs.append(out / "losses.png")

    ppl = evaluation["perplexity"]
    fig, ax = _figure(6, 3.6)
    bars = ax.bar(list(ppl), list(ppl.values()), color=["#4c72b0", "#c44e52", "#55a868"])
    ax.bar_label(bars, fmt="%.2f")
    values = list(ppl.values())
    span = max(values) - min(values) or max(values) * 0.01
    ax.set_ylim(min(values) - 2 * span, max(values) + span)  # the differences are what matters
    ax.set_ylabel("held-out perplexity")
    ax.set_title("perplexity at each stage (lower is better)")
    _save(fig, out / "perplexity.png")
    pngs.append(out / "perplexity.png")

    if bits:
        names = list(bits)
        fig, ax = _figure(max(6, 0.18 * len(names)), 3.8)
        ax.bar(range(len(names)), list(bits.values()), color="#8172b2")
        ax.set_xticks(range(len(names)), [n.removeprefix("model.") for n in names], rotation=90,
                      fontsize=6)  # fmt: skip
        ax.set_ylabel("bits per weight")
        ax.set_title("palettization bits per projection")
        _save(fig, out / "bits.png")
        pngs.append(out / "bits.png")

    task = evaluation["task"]
    fig, ax = _figure(7, 3.6)
    bars = ax.bar(list(task), [row["balanced_accuracy"] for row in task.values()], color="#dd8452")
    ax.bar_label(bars, fmt="%.3f")
    chance = next(iter(task.values()))["chance"]
    ax.axhline(chance, color="gray", linestyle="--", label=f"chance {chance:.3f}")
    ax.set_ylabel("balanced accuracy (mean recall)")
    ax.set_title("speaker attribution (scenes never seen in training)")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend()
    _save(fig, out / "task.png")
    pngs.append(out / "task.png")
    return pngs


def write_pipeline_report(run: Any) -> dict[str, Any]:
    """``report.html`` (self-contained: the PNGs are embedded), the PNGs and ``report.json`` in
    the pipeline's run folder; returns the summary (``report.json``'s content).

    ``run`` is ``afm_mlx.pipeline.Run``: its folder, stage record and every stage's output path.
    """
    out: Path = run.out
    stages = run.state["stages"]
    evaluation = read_json(out / "evaluation.json", "evaluation")
    samples = read_json(out / "samples.json", "samples")
    task = stages["task data"]["task"]
    bits, bpw = bits_per_layer(run.palettized)
    curves = {}
    if "train" in stages:
        curves["train (full precision)"] = _read_history(run.fp)
    curves["recover (distilled from full precision)"] = _read_history(run.recovery)
    for init, folder in run.task_adapters.items():
        curves[f"task adapter from {init}"] = _read_history(folder)
    pngs = _plot_pipeline(out, curves, evaluation, bits)

    ppl, acc = evaluation["perplexity"], evaluation["task"]
    gap = ppl["palettized"] - ppl["full precision"]
    recovered = (ppl["palettized"] - ppl["palettized + recovery"]) / gap if gap > 0 else None
    seconds = {name: info["seconds"] for name, info in stages.items()}
    sizes = {
        "full-precision weights": _weights_bytes(run.fp),
        "palettized weights": _weights_bytes(run.palettized),
        "recovery adapter": _weights_bytes(run.recovery),
        "task adapter": _weights_bytes(run.task_adapters["recovery"]),
        "Core ML package": _folder_bytes(run.mlpackage),
        "Core AI asset": _folder_bytes(run.aimodel),
    }

    def task_row(name: str) -> tuple[float, float]:
        return acc[name]["balanced_accuracy"], acc[name]["nll"]

    table = [
        ("full precision", ppl["full precision"], None, None, seconds.get("train")),
        (f"palettized ({bpw:.2f} bpw)", ppl["palettized"], *task_row("palettized"),
         seconds.get("palettize")),
        ("palettized + recovery", ppl["palettized + recovery"], None, None, seconds.get("recover")),
        ("task adapter from zero", None, *task_row("task adapter from zero"),
         seconds.get("task adapter from zero")),
        ("task adapter from recovery", None, *task_row("task adapter from recovery"),
         seconds.get("task adapter from recovery")),
    ]  # fmt: skip
    summary = {
        "perplexity": ppl,
        "gap_recovered": recovered,
        "bpw": bpw,
        "task": {name: row["balanced_accuracy"] for name, row in acc.items()},
        "task_accuracy": {name: row["accuracy"] for name, row in acc.items()},
        "task_nll": {name: row["nll"] for name, row in acc.items()},
        "chance": next(iter(acc.values()))["chance"],
        "test_examples": task["examples"]["test"],
        "seconds": seconds,
        "sizes": sizes,
        "table": [
            [
                name,
                None if p is None else round(p, 3),
                None if a is None else round(a, 3),
                None if n is None else round(n, 3),
                None if t is None else round(t),
            ]
            for name, p, a, n, t in table
        ],
        "facts": {
            "bits per projection weight": f"{bpw:.3f}",
            "perplexity gap recovered": "n/a" if recovered is None else f"{100 * recovered:.1f}%",
            "chance accuracy": f"{next(iter(acc.values()))['chance']:.3f} "
            f"({task['examples']['test']} test speeches)",
            "total time": f"{sum(seconds.values()):.0f} s",
        },
    }
    atomic_write_json(out / "report.json", summary)
    atomic_write_text(out / "report.html", _html(summary, task, samples, pngs))
    return summary


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.3f}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _html(summary: dict, task: dict, samples: list[dict], pngs: list[Path]) -> str:
    mb = [
        [name, None if b is None else f"{b / 1e6:.2f} MB"] for name, b in summary["sizes"].items()
    ]
    speakers = ", ".join(f"{s['name']} ({s['play']})" for s in task["speakers"])
    sample_rows = [[s["model"], s["prompt"], s["text"], s.get("expected", "")] for s in samples]
    images = "".join(
        f'<figure><img alt="{p.stem}" src="{_png(p)}"><figcaption>{p.name}</figcaption></figure>'
        for p in pngs
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>afm_mlx pipeline report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: .3em .6em; text-align: left; vertical-align: top;
  white-space: pre-wrap; }}
th {{ background: #f2f2f2; }} img {{ max-width: 100%; }} figure {{ margin: 1em 0; }}
</style></head><body>
<h1>afm_mlx: the on-device recipe, end to end</h1>
<p>Train &rarr; palettize &rarr; recover &rarr; task adapters &rarr; evaluate &rarr; Core ML / Core AI.</p>
<h2>Summary</h2>
{_table(TABLE_HEADER, summary["table"])}
{_table(["fact", "value"], [[k, v] for k, v in summary["facts"].items()])}
<h2>Task</h2>
<p>Speaker attribution: name who speaks a speech, among {len(task["speakers"])} characters:
{html.escape(speakers)}. Test speeches come from scenes held out of both the task data and the
language-model corpus; the prediction is the most likely name. Balanced accuracy is the mean over
speakers of the share of their speeches named right: always naming one speaker scores chance
(1 / number of speakers), however the test set is skewed. The answer loss is the mean negative
log-likelihood per answer token (the name, as the plays write it, and EOS) on the test speeches.</p>
<h2>Sizes</h2>
{_table(["artifact", "size"], mb)}
<h2>Plots</h2>
{images}
<h2>Samples</h2>
{_table(["model", "prompt", "generated", "expected"], sample_rows)}
</body></html>
"""
