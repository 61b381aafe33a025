"""The whole chain as a user runs it, one CLI process per stage (slow: ~2-3 minutes):

train -> palettize -> recover -> finetune -> evaluate -> generate -> fuse (refused) -> Core ML
-> Core AI, whose asset Apple's runtime then runs: its greedy text equals generate's.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import one_line_error, run_cli

pytestmark = pytest.mark.slow

FAST = ["--batch-size", "8", "--seq-len", "64", "--eval-batches", "4", "--no-progress"]


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _task_file(path, corpus):
    lines = [
        ln.strip()
        for f in sorted(corpus.iterdir())
        for ln in f.read_text().splitlines()
        if len(ln.strip()) > 20
    ]
    with path.open("w") as f:
        for a, b in list(zip(lines, lines[1:]))[:300]:
            f.write(json.dumps({"prompt": a + "\n", "completion": b}) + "\n")
    return path


def test_the_whole_chain_through_the_clis(tiny_corpus, tmp_path):
    fp, pal = tmp_path / "fp", tmp_path / "pal"
    rec, task = tmp_path / "rec", tmp_path / "task"
    train = [
        "afm_mlx.train", "--preset", "tiny", "--data", tiny_corpus, "--out", fp,
        "--max-steps", "150", "--learning-rate", "1e-2", "--eval-every", "150",
        "--sample-tokens", "0", *FAST,
    ]  # fmt: skip
    _ok(run_cli(*train))
    _ok(run_cli("afm_mlx.palettize", "--model", fp, "--out", pal, "--bits", "2"))
    assert json.loads((pal / "config.json").read_text())["palettization"]

    recover = [
        "afm_mlx.recover", "--model", pal, "--teacher", fp, "--out", rec, "--data",
        tiny_corpus, "--max-steps", "60", "--learning-rate", "2e-3", *FAST,
    ]  # fmt: skip
    out = _ok(run_cli(*recover))
    report = json.loads((rec / "recovery.json").read_text())
    assert "gap closed" in out
    # 2 bits cost the tiny model real perplexity; the adapter wins a good share of it back.
    assert report["base"] > report["teacher"] * 1.02, report
    assert report["gap_closed"] > 0.3, report

    finetune = [
        "afm_mlx.finetune", "--model", pal, "--init-adapter", rec, "--data",
        _task_file(tmp_path / "task.jsonl", tiny_corpus), "--out", task,
        "--max-steps", "30", "--learning-rate", "2e-3", *FAST,
    ]  # fmt: skip
    _ok(run_cli(*finetune))
    assert json.loads((task / "adapter_config.json").read_text())["kind"] == "task"

    evaluate = [
        "afm_mlx.evaluate", "--model", pal, "--adapter", rec, "--data", tiny_corpus,
        "--seq-len", "64", "--batch-size", "8", "--max-batches", "4", "--json",
    ]  # fmt: skip
    rows = json.loads(_ok(run_cli(*evaluate)))["results"]
    by_name = {r["adapter"]: r["perplexity"] for r in rows}
    assert by_name[str(rec)] < by_name[None]
    # The same held-out windows as recover's report: the stages agree on the split and the loss.
    assert by_name[None] == pytest.approx(report["base"], rel=1e-4)
    assert by_name[str(rec)] == pytest.approx(report["adapter"], rel=1e-4)

    gen = ["afm_mlx.generate", "--model", pal, "--prompt", "ROMEO.\n", "--max-tokens", "24"]
    text = _ok(run_cli(*gen, "--adapter", rec, task, "--seed", "3"))
    sections = text.split("=== ")[1:]
    assert len(sections) == 2 and sections[0] != sections[1]
    assert _ok(run_cli(*gen, "--adapter", rec, task, "--seed", "3")) == text

    err = one_line_error(
        run_cli("afm_mlx.fuse", "--model", pal, "--adapter", rec, "--out", tmp_path / "fused")
    )
    assert "--allow-lossy" in err and not (tmp_path / "fused").exists()

    package = tmp_path / "m.mlpackage"
    convert = [
        "converters.coreml", "--model", pal, "--adapter", f"rec={rec}",
        "--adapter", f"task={task}", "--out", package, "--context", "64",
    ]  # fmt: skip
    out = _ok(run_cli(*convert))
    assert package.is_dir()
    for name in ("prefill", "decode", "prefill_rec", "decode_task"):
        assert name in out

    asset = tmp_path / "m.aimodel"
    convert = [
        "converters.coreai", "--model", pal, "--adapter", f"rec={rec}", "--adapter",
        f"task={task}", "--out", asset, "--context", "64", "--prefill-chunk", "16",
        "--compute-dtype", "float32",
    ]  # fmt: skip
    assert "decode_task" in _ok(run_cli(*convert))
    from mlx_lm.utils import load_tokenizer

    from converters.coreai_run import CoreAISession

    greedy = [*gen, "--temp", "0", "--no-verbose", "--adapter"]
    with CoreAISession(asset) as session:  # float32 compute: token-exact with MLX's fp32
        for name, folder in (("rec", rec), ("task", task)):
            text = session.generate(load_tokenizer(pal), "ROMEO.\n", 24, adapter=name)
            assert text + "\n" == _ok(run_cli(*greedy, folder))
