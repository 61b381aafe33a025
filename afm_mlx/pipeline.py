"""The whole recipe in one command: ``python -m afm_mlx.pipeline [--preset tiny|small] [--out DIR]``.

train (or take ``--model``) -> palettize to a bits-per-weight budget -> recover (LoRA distilled
from the full-precision model) -> a task adapter started from the recovery adapter, and one from
zero for comparison -> evaluate (held-out perplexity at every stage; task accuracy) -> sample
generations -> Core ML ``.mlpackage`` and Core AI ``.aimodel`` -> ``report.html``.

The task is the demo of ``afm_mlx.data.speakers``: name the speaker of a speech from the bundled plays,
tested on scenes that neither the task adapters nor the language model saw. Every stage runs as
its own ``python -m`` process, exactly as a user would run it, into its own folder under
``--out``; ``pipeline.json`` records the finished ones. Re-running the same command resumes:
finished stages are skipped, a training stage that was cut short resumes from its last
checkpoint, and any other unfinished stage is redone.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from afm_mlx.core.config import stage_main
from afm_mlx.core.errors import UserError
from afm_mlx.core.fileio import atomic_write_json, output_lock, read_json

STATE_FILE = "pipeline.json"
# What each preset runs. ``train_steps`` etc. may be overridden by flags of the same name.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {  # the integration test: about two and a half minutes here
        "model_preset": "tiny",
        "train_steps": 150,
        "train_flags": ["--batch-size", "8", "--seq-len", "64", "--learning-rate", "1e-2",
                        "--eval-every", "60", "--save-every", "40", "--sample-tokens", "0"],
        "target_bpw": 2.1,
        "palettize_flags": ["--bit-choices", "2", "4", "--calibration-batches", "1",
                            "--calibration-seq-len", "64"],
        "recover_steps": 40,
        "recover_flags": ["--batch-size", "8", "--seq-len", "64", "--learning-rate", "2e-3",
                          "--eval-every", "20", "--eval-batches", "4", "--save-every", "10"],
        "task_steps": 30,
        "task_flags": ["--batch-size", "8", "--seq-len", "64", "--learning-rate", "2e-3",
                       "--eval-every", "15", "--eval-batches", "4", "--save-every", "15"],
        "task_caps": {"train_per_speaker": 40, "eval_per_speaker": 8},
        "eval_flags": ["--seq-len", "64", "--batch-size", "8", "--max-batches", "8"],
        "context": 128,
    },
    "small": {  # the README's main job: about 15 minutes on a 2-core CPU
        "model_preset": "small",
        "train_steps": 150,
        "train_flags": ["--eval-every", "75", "--save-every", "50"],
        # A harsh budget on purpose: at 3.5 bpw this small, briefly trained model loses almost
        # nothing (0.1% in perplexity), so there would be nothing for recovery to win back.
        "target_bpw": 2.1,
        "palettize_flags": ["--bit-choices", "2", "4", "--calibration-batches", "2"],
        "recover_steps": 40,
        "recover_flags": ["--batch-size", "8", "--learning-rate", "1e-3", "--eval-every", "20",
                          "--eval-batches", "10", "--save-every", "20"],
        "task_steps": 70,
        "task_flags": ["--batch-size", "16", "--seq-len", "64", "--learning-rate", "5e-4",
                       "--eval-every", "35", "--eval-batches", "8", "--save-every", "35"],
        "task_caps": {"train_per_speaker": 200, "eval_per_speaker": 30},
        "eval_flags": ["--seq-len", "128", "--batch-size", "8", "--max-batches", "25"],
        "context": 256,
    },
}  # fmt: skip
SAMPLE_PROMPT = "ROMEO.\n"


@dataclass
class PipelineConfig:
    preset: str = field(
        default="small",
        metadata={"help": "sizes and steps of every stage", "choices": list(PRESETS)},
    )
    model: str | None = field(
        default=None,
        metadata={"help": "start from this full-precision model (folder or HF repo id) "
                  "instead of training one"},
    )  # fmt: skip
    out: str | None = field(
        default=None, metadata={"help": "run folder (default: runs/pipeline-PRESET)"}
    )
    target_bpw: float | None = field(
        default=None, metadata={"help": "palettization budget, bits per weight (preset's)"}
    )
    train_steps: int | None = field(default=None, metadata={"help": "train steps (preset's)"})
    recover_steps: int | None = field(default=None, metadata={"help": "recovery steps (preset's)"})
    task_steps: int | None = field(
        default=None, metadata={"help": "steps of each task adapter (preset's)"}
    )
    coreml: bool = field(default=True, metadata={"help": "convert to a Core ML .mlpackage"})
    coreai: bool = field(
        default=True, metadata={"help": "convert to a Core AI .aimodel (Python >= 3.11)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of every stage and of the task split"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})

    def resolved(self) -> dict[str, Any]:
        """The preset with this run's overrides: what the run folder records and is checked by."""
        preset = dict(PRESETS[self.preset])
        for name in ("target_bpw", "train_steps", "recover_steps", "task_steps"):
            value = getattr(self, name)
            if value is not None:
                preset[name] = value
        return {
            **preset,
            "preset": self.preset,
            "model": self.model,
            "coreml": self.coreml,
            "coreai": self.coreai,
            "seed": self.seed,
        }

    def validate(self) -> None:
        for name in ("train_steps", "recover_steps", "task_steps"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive")
        if self.target_bpw is not None and not 2 <= self.target_bpw <= 8:
            raise UserError("--target-bpw must be in [2, 8]")
        if self.model is not None and self.train_steps is not None:
            raise UserError("--train-steps has no use with --model (nothing is trained)")


class Run:
    """The run folder: paths of every stage's output and the record of finished stages."""

    def __init__(self, out: Path, plan: dict[str, Any], progress: bool):
        self.out, self.plan, self.progress = out, plan, progress
        self.data = out / "data"
        self.corpus, self.task = self.data / "corpus", self.data / "task"
        self.fp = Path(plan["model"]) if plan["model"] else out / "fp"
        self.palettized = out / "palettized"
        self.recovery = out / "recovery"
        self.task_adapters = {
            "recovery": out / "task-from-recovery",
            "zero": out / "task-from-zero",
        }
        self.mlpackage, self.aimodel = out / "model.mlpackage", out / "model.aimodel"
        self.state_path = out / STATE_FILE
        self.state: dict[str, Any] = {"plan": plan, "stages": {}}

    def load_state(self) -> None:
        """Adopt the folder's record, refusing one made by a different plan."""
        if not self.state_path.is_file():
            if self.out.exists() and any(self.out.iterdir()):
                raise UserError(
                    f"--out {self.out}: folder is not empty and holds no pipeline run; choose another"
                )
            return
        state = read_json(self.state_path, "pipeline record")
        old = state.get("plan", {})
        diffs = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in self.plan.items() if old.get(k) != v]
        if diffs:
            raise UserError(
                f"--out {self.out}: holds a pipeline run with other settings ({'; '.join(diffs)}); "
                "re-run with the same flags to resume it, or choose another --out"
            )
        self.state = state

    def done(self, stage: str) -> bool:
        return stage in self.state["stages"]

    def finish(self, stage: str, seconds: float, **info: Any) -> None:
        self.state["stages"][stage] = {"seconds": round(seconds, 1), **info}
        atomic_write_json(self.state_path, self.state)


def _module_cmd(module: str, *args: Any) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


def _run(cmd: list[str], capture: bool = False) -> str:
    """Run one stage process (its progress bars on this terminal); its output when ``capture``."""
    cmd = [str(c) for c in cmd]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE if capture else None, text=True)
    if proc.returncode != 0:
        shown = " ".join(cmd[1:])
        raise UserError(
            f"stage failed (exit {proc.returncode}): {shown}; fix it and re-run to resume"
        )
    return proc.stdout if capture else ""


def _resume_flag(folder: Path) -> list[str]:
    """``--resume`` where a training stage was started before (its run.json exists)."""
    return ["--resume"] if (folder / "run.json").is_file() else []


def _clear(path: Path) -> None:
    """Remove an unfinished stage's output before redoing it (only ever inside the run folder)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _stages(run: Run) -> list[tuple[str, Any]]:
    """(name, action) in order; each action runs the stage and returns extra info to record."""
    p, r = run.plan, run
    progress = [] if run.progress else ["--no-progress"]
    seed = ["--seed", p["seed"]]

    def task() -> dict:
        from afm_mlx.data.speakers import write_task

        _clear(r.data)
        return {"task": write_task(r.data, seed=p["seed"], **p["task_caps"])}

    def train() -> dict:
        _run(
            _module_cmd(
                "afm_mlx.train", "--preset", p["model_preset"], "--data", r.corpus, "--out", r.fp,
                "--max-steps", p["train_steps"], *p["train_flags"], *seed, *progress,
                *_resume_flag(r.fp),
            )
        )  # fmt: skip
        return {}

    def palettize() -> dict:
        _clear(r.palettized)
        _run(
            _module_cmd(
                "afm_mlx.palettize", "--model", r.fp, "--out", r.palettized, "--target-bpw",
                p["target_bpw"], *p["palettize_flags"], "--calibration", r.corpus, *seed,
            )
        )  # fmt: skip
        return {}

    def recover() -> dict:
        _run(
            _module_cmd(
                "afm_mlx.recover", "--model", r.palettized, "--teacher", r.fp, "--data", r.corpus,
                "--out", r.recovery, "--max-steps", p["recover_steps"], *p["recover_flags"],
                *seed, *progress, *_resume_flag(r.recovery),
            )
        )  # fmt: skip
        return {}

    def finetune(init: str):
        def action() -> dict:
            folder = r.task_adapters[init]
            _run(
                _module_cmd(
                    "afm_mlx.finetune", "--model", r.palettized, "--data", r.task, "--out", folder,
                    "--init-adapter", r.recovery if init == "recovery" else "none",
                    "--max-steps", p["task_steps"], *p["task_flags"], *seed, *progress,
                    *_resume_flag(folder),
                )
            )  # fmt: skip
            return {}

        return action

    def evaluate() -> dict:
        def ev(model: Path, data: Path, *adapters: Path) -> list[dict]:
            """evaluate --json's rows: the bare model, then each adapter."""
            cmd = _module_cmd("afm_mlx.evaluate", "--model", model, "--data", data, "--json")
            cmd += [*p["eval_flags"], *seed, *(["--adapter", *adapters] if adapters else [])]
            return json.loads(_run(cmd, capture=True))["results"]

        fp = ev(r.fp, r.corpus)[0]
        pal, rec = ev(r.palettized, r.corpus, r.recovery)
        task_rows = ev(r.palettized, r.task / "test.jsonl", *r.task_adapters.values())
        evaluation = {
            "perplexity": {
                "full precision": fp["perplexity"],
                "palettized": pal["perplexity"],
                "palettized + recovery": rec["perplexity"],
            },
            "task": dict(
                zip(
                    ["palettized", "task adapter from recovery", "task adapter from zero"],
                    task_rows,
                )
            ),
        }  # fmt: skip
        atomic_write_json(r.out / "evaluation.json", evaluation)
        return {}

    def samples() -> dict:
        found = []
        gen = ["--max-tokens", "48", "--no-verbose", *seed]
        for labels, model, adapters in (
            (["full precision"], r.fp, []),
            (["palettized", "palettized + recovery"], r.palettized, ["none", r.recovery]),
        ):
            cmd = _module_cmd("afm_mlx.generate", "--model", model, "--prompt", SAMPLE_PROMPT)
            text = _run(cmd + gen + (["--adapter", *adapters] if adapters else []), capture=True)
            found += _sections(text, labels, SAMPLE_PROMPT)
        tests = [json.loads(line) for line in (r.task / "test.jsonl").read_text().splitlines()]
        for record in tests[:2]:
            cmd = _module_cmd(
                "afm_mlx.generate", "--model", r.palettized, "--prompt", record["prompt"],
                "--adapter", r.task_adapters["recovery"], "--max-tokens", "6", "--no-verbose",
            )  # fmt: skip
            text = _run(cmd, capture=True)
            found.append(
                {
                    "model": "task adapter from recovery",
                    "prompt": record["prompt"],
                    "text": text.rstrip("\n"),
                    "expected": record["completion"],
                }
            )
        atomic_write_json(r.out / "samples.json", found)
        return {}

    def convert(module: str, out: Path):
        """Both converters take the palettized base with the recovery and task adapters."""

        def action() -> dict:
            _clear(out)
            _run(
                _module_cmd(
                    module, "--model", r.palettized, "--adapter", f"recovery={r.recovery}",
                    "--adapter", f"task={r.task_adapters['recovery']}", "--out", out,
                    "--context", p["context"],
                )
            )  # fmt: skip
            return {}

        return action

    stages: list[tuple[str, Any]] = [("task data", task)]
    if not p["model"]:
        stages.append(("train", train))
    stages += [
        ("palettize", palettize),
        ("recover", recover),
        ("task adapter from recovery", finetune("recovery")),
        ("task adapter from zero", finetune("zero")),
        ("evaluate", evaluate),
        ("samples", samples),
    ]
    if p["coreml"]:
        stages.append(("Core ML", convert("converters.coreml", r.mlpackage)))
    if p["coreai"]:
        stages.append(("Core AI", convert("converters.coreai", r.aimodel)))
    return stages


def _sections(text: str, names: list[str], prompt: str) -> list[dict]:
    """generate's output: one section per adapter (``=== name ===`` headers when several)."""
    if len(names) == 1:
        return [{"model": names[0], "prompt": prompt, "text": text.rstrip("\n")}]
    parts = text.split("=== ")[1:]
    return [
        {"model": name, "prompt": prompt, "text": part.split(" ===\n", 1)[1].rstrip("\n")}
        for name, part in zip(names, parts)
    ]


def _check_coreai(plan: dict[str, Any]) -> None:
    if plan["coreai"] and sys.version_info < (3, 11):
        print("note: no Core AI asset on this Python (coreai-core needs >= 3.11); --no-coreai")
        plan["coreai"] = False


def pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """Run (or resume) every stage in ``cfg.out``; returns the report's summary."""
    cfg.validate()
    plan = cfg.resolved()
    _check_coreai(plan)
    if plan["model"]:
        from afm_mlx.models.io import resolve_model_path

        plan["model"] = str(resolve_model_path(plan["model"]))
    out = Path(cfg.out or f"runs/pipeline-{cfg.preset}")
    with output_lock(out):
        run = Run(out, plan, cfg.progress)
        run.load_state()
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run.state_path, run.state)
        stages = _stages(run)
        for k, (name, action) in enumerate(stages, 1):
            if run.done(name):
                print(
                    f"[{k}/{len(stages)}] {name}: done before ({run.state['stages'][name]['seconds']} s)"
                )
                continue
            print(f"[{k}/{len(stages)}] {name} ...", flush=True)
            start = time.perf_counter()
            info = action()
            run.finish(name, time.perf_counter() - start, **info)
        from afm_mlx.training.report import write_pipeline_report

        summary = write_pipeline_report(run)
    print(_summary_table(summary))
    print(f"report: {out / 'report.html'}")
    return summary


def _summary_table(summary: dict[str, Any]) -> str:
    from afm_mlx.training.report import TABLE_HEADER

    rows = [tuple(TABLE_HEADER)]
    for row in summary["table"]:
        rows.append(tuple("" if v is None else v for v in row))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [f"{k}: {v}" for k, v in summary["facts"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    # Each stage process sets up the fast BLAS itself; this one only coordinates.
    stage_main(
        PipelineConfig, pipeline, "python -m afm_mlx.pipeline", __doc__, argv, fast_blas=False
    )


if __name__ == "__main__":
    main()
