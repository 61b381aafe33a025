"""The whole recipe as a user runs it (slow): ``python -m afm_mlx.pipeline --preset tiny``, killed
in the middle of the recovery stage and re-run to completion, then checked stage by stage:

every artifact exists and loads; the report's perplexities and accuracies equal what
``evaluate --json`` prints for the same folders; the recovery adapter wins back perplexity and
agrees with recover's own report; adapters generate deterministically; fuse refuses a lossy
merge; the Core AI asset, run by Apple's runtime, generates the same text as MLX; and the report
renders in a real headless browser with its plots loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, one_line_error, run_cli

pytestmark = pytest.mark.slow


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _pipeline(out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "afm_mlx.pipeline", "--preset", "tiny", "--out", str(out)]
    return subprocess.Popen(
        [*cmd, "--no-progress"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the kill takes every stage process
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """The tiny pipeline, SIGKILLed once its recovery stage has written a checkpoint, then re-run."""
    out = tmp_path_factory.mktemp("pipeline") / "run"
    first = _pipeline(out)
    deadline = time.monotonic() + 600
    while not list((out / "recovery" / "checkpoints").glob("step-*")):
        assert first.poll() is None, first.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "the recovery stage never wrote a checkpoint"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    killed_state = json.loads((out / "pipeline.json").read_text())
    second = _pipeline(out)
    log, _ = second.communicate(timeout=900)
    assert second.returncode == 0, log[-4000:]
    return {"out": out, "killed_state": killed_state, "log": log}


def test_a_killed_pipeline_resumes_and_finishes(run):
    out, log = run["out"], run["log"]
    finished_before = set(run["killed_state"]["stages"])
    assert {"task data", "train", "palettize"} <= finished_before
    assert "recover" not in finished_before
    for stage in finished_before:
        assert f"{stage}: done before" in log
    assert "resuming from" in log  # the recovery stage continued from its checkpoint
    state = json.loads((out / "pipeline.json").read_text())
    assert set(state["stages"]) == {
        "task data", "train", "palettize", "recover", "task adapter from recovery",
        "task adapter from zero", "evaluate", "samples", "Core ML", "Core AI",
    }  # fmt: skip
    for name in ("fp", "palettized"):
        assert (out / name / "config.json").is_file() and (
            out / name / "model.safetensors"
        ).is_file()
    for name in ("recovery", "task-from-recovery", "task-from-zero"):
        assert (out / name / "adapter_config.json").is_file()
        assert (out / name / "metrics.jsonl").is_file()
    assert (out / "model.mlpackage" / "Manifest.json").is_file()
    assert (out / "model.aimodel").exists()
    for png in ("losses.png", "perplexity.png", "bits.png", "task.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The terminal's closing summary.
    assert "palettized + recovery" in log and f"report: {out / 'report.html'}" in log
    # Re-running a finished pipeline does nothing but the report.
    again = _ok(run_cli("afm_mlx.pipeline", "--preset", "tiny", "--out", out, "--no-progress"))
    assert again.count("done before") == len(state["stages"])


def test_the_task_holds_out_whole_scenes_from_every_stage(run):
    out = run["out"]
    task = json.loads((out / "data" / "task" / "task.json").read_text())
    assert task["chance"] == pytest.approx(1 / len(task["speakers"]))
    splits = {
        s: [json.loads(x) for x in (out / "data" / "task" / f"{s}.jsonl").read_text().splitlines()]
        for s in ("train", "valid", "test")
    }
    train_prompts = {r["prompt"] for r in splits["train"]}
    assert not train_prompts & {r["prompt"] for r in splits["test"]}
    corpus = "\n".join(f.read_text() for f in (out / "data" / "corpus").iterdir())
    # No test speech is in the language model's corpus either (its first line, as printed).
    for record in splits["test"]:
        first_line = record["prompt"].split("\n")[0]
        if len(first_line) > 30:
            assert first_line not in corpus, first_line


def test_report_equals_evaluate_json(run):
    out = run["out"]
    report = json.loads((out / "report.json").read_text())
    evaluate = ["afm_mlx.evaluate", "--json", "--seq-len", "64", "--batch-size", "8"]
    evaluate += ["--max-batches", "8"]
    fp = json.loads(_ok(run_cli(*evaluate, "--model", out / "fp", "--data", out / "data/corpus")))
    assert report["perplexity"]["full precision"] == pytest.approx(
        fp["results"][0]["perplexity"], rel=1e-6
    )
    pal = json.loads(
        _ok(
            run_cli(
                *evaluate, "--model", out / "palettized", "--data", out / "data/corpus",
                "--adapter", out / "recovery",
            )
        )
    )["results"]  # fmt: skip
    assert report["perplexity"]["palettized"] == pytest.approx(pal[0]["perplexity"], rel=1e-6)
    assert report["perplexity"]["palettized + recovery"] == pytest.approx(
        pal[1]["perplexity"], rel=1e-6
    )
    task = json.loads(
        _ok(
            run_cli(
                *evaluate, "--model", out / "palettized", "--data",
                out / "data/task/test.jsonl", "--adapter", out / "task-from-zero",
                out / "task-from-recovery", "--skip-base",
            )
        )
    )["results"]  # fmt: skip
    assert report["task"]["task adapter from zero"] == task[0]["balanced_accuracy"]
    assert report["task"]["task adapter from recovery"] == task[1]["balanced_accuracy"]
    assert report["task_accuracy"]["task adapter from recovery"] == task[1]["accuracy"]
    assert report["task_nll"]["task adapter from zero"] == task[0]["nll"]
    # ... and the numbers a reader sees in report.html are those.
    html = (out / "report.html").read_text()
    for value in (pal[0]["perplexity"], pal[1]["perplexity"], task[1]["balanced_accuracy"]):
        assert f"{value:.3f}" in html


def test_recovery_adapters_generation_fuse_and_core_ai_on_the_run(run):
    out = run["out"]
    fp, pal, rec = out / "fp", out / "palettized", out / "recovery"
    task = out / "task-from-recovery"
    report = json.loads((rec / "recovery.json").read_text())
    # The tiny preset's 2.1 bits cost real perplexity; the adapter wins a share of it back.
    assert report["base"] > report["teacher"] * 1.01, report
    assert report["gap_closed"] > 0.3, report
    # recover's own held-out windows (its --seq-len / --batch-size / --eval-batches) agree with
    # evaluate's: the stages share the split and the loss.
    evaluate = [
        "afm_mlx.evaluate", "--model", pal, "--adapter", rec, "--data", out / "data/corpus",
        "--seq-len", "64", "--batch-size", "8", "--max-batches", "4", "--json",
    ]  # fmt: skip
    rows = json.loads(_ok(run_cli(*evaluate)))["results"]
    assert rows[0]["perplexity"] == pytest.approx(report["base"], rel=1e-4)
    assert rows[1]["perplexity"] == pytest.approx(report["adapter"], rel=1e-4)

    gen = ["afm_mlx.generate", "--model", pal, "--prompt", "ROMEO.\n", "--max-tokens", "24"]
    text = _ok(run_cli(*gen, "--adapter", rec, task, "--temp", "0.8", "--seed", "3"))
    sections = text.split("=== ")[1:]
    assert len(sections) == 2 and sections[0] != sections[1]
    assert _ok(run_cli(*gen, "--adapter", rec, task, "--temp", "0.8", "--seed", "3")) == text

    err = one_line_error(
        run_cli("afm_mlx.fuse", "--model", pal, "--adapter", rec, "--out", out / "f")
    )
    assert "--allow-lossy" in err and not (out / "f").exists()

    asset = out.parent / "f32.aimodel"  # float32 compute: token-exact with MLX's fp32
    convert = [
        "converters.coreai", "--model", pal, "--adapter", f"rec={rec}", "--adapter",
        f"task={task}", "--out", asset, "--context", "64", "--prefill-chunk", "16",
        "--compute-dtype", "float32",
    ]  # fmt: skip
    assert "decode_task" in _ok(run_cli(*convert))
    from mlx_lm.utils import load_tokenizer

    from converters.coreai_run import CoreAISession

    greedy = [*gen, "--no-verbose", "--adapter"]
    with CoreAISession(asset) as session:
        for name, folder in (("rec", rec), ("task", task)):
            text = session.generate(load_tokenizer(pal), "ROMEO.\n", 24, adapter=name)
            assert text + "\n" == _ok(run_cli(*greedy, folder))
    assert fp.is_dir()


def test_pipeline_bad_input_is_one_line_and_keeps_the_run(run):
    out = run["out"]
    before = (out / "pipeline.json").read_bytes()
    err = one_line_error(
        run_cli("afm_mlx.pipeline", "--preset", "tiny", "--out", out, "--task-steps", "7")
    )
    assert "other settings" in err and "task_steps" in err
    assert (out / "pipeline.json").read_bytes() == before
    err = one_line_error(run_cli("afm_mlx.pipeline", "--model", out / "fp", "--train-steps", "5"))
    assert "--train-steps" in err
    err = one_line_error(run_cli("afm_mlx.pipeline", "--preset", "huge"))
    assert "--preset" in err and "tiny" in err


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="no Chromium (.ci/run installs Debian's)")
def test_report_renders_its_plots_in_headless_chromium(run, tmp_path):
    """Chromium loads report.html from disk, and a page script counts the images that decoded;
    the screenshot must show them (non-blank pixels where the plots are)."""
    out = run["out"]
    page = tmp_path / "probe.html"
    # The probe opens the report in an iframe (same origin: file://) and writes its verdict into
    # the title, which --dump-dom prints after the scripts ran.
    page.write_text(
        f"""<!doctype html><html><head><title>pending</title></head><body>
<iframe id="r" src="{(out / "report.html").as_uri()}" style="width:1200px;height:4000px"></iframe>
<script>
document.getElementById("r").onload = () => {{
  const imgs = [...document.getElementById("r").contentDocument.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 100 && i.naturalHeight > 100);
  document.title = "images " + ok.length + " of " + imgs.length;
}};
</script></body></html>"""
    )
    chrome = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--allow-file-access-from-files",
    ]
    # Chromium prints nothing when OpenBLAS is preloaded into it (a shell that exported
    # LD_PRELOAD for MLX's sake): it runs without.
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    dom = subprocess.run(
        [*chrome, "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert "<title>images 4 of 4</title>" in dom.stdout, (dom.stdout[:500], dom.stderr[-1500:])

    shot = tmp_path / "report.png"
    subprocess.run(
        [
            *chrome,
            f"--screenshot={shot}",
            "--window-size=1200,2400",
            (out / "report.html").as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
        env=env,
    )
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[0] >= 2000
    # The plots are colour: bars and curves; a page of text and tables is black, grey and white.
    colourful = (pixels.max(axis=-1) - pixels.min(axis=-1)) > 0.25
    assert colourful.mean() > 0.002, colourful.mean()
    assert np.unique(pixels.reshape(-1, 3), axis=0).shape[0] > 50
