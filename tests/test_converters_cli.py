"""Bad input to either converter (Core ML, Core AI): one line on stderr, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import one_line_error, run_cli

CONVERTERS = [
    pytest.param("converters.coreml", ".mlpackage", id="coreml"),
    pytest.param(
        "converters.coreai",
        ".aimodel",
        id="coreai",
        marks=pytest.mark.skipif(sys.version_info < (3, 11), reason="coreai-core: Python 3.11+"),
    ),
]


def _nothing_left(folder: Path) -> None:
    assert list(folder.iterdir()) == [], list(folder.iterdir())


@pytest.mark.parametrize("module,suffix", CONVERTERS)
def test_context_not_multiple_of_chunk(module, suffix, tiny_model_dir, tmp_path):
    out = tmp_path / "out" / f"m{suffix}"
    args = ["--model", tiny_model_dir, "--out", out, "--context", "30", "--prefill-chunk", "8"]
    line = one_line_error(run_cli(module, *args))
    assert "--context 30" in line and "--prefill-chunk 8" in line and "multiple" in line
    assert not out.parent.exists()


@pytest.mark.parametrize("module,suffix", CONVERTERS)
def test_unsupported_architecture(module, suffix, tiny_model_dir, tmp_path):
    model_dir = tmp_path / "gpt2"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    line = one_line_error(run_cli(module, "--model", model_dir, "--out", out_dir / f"m{suffix}"))
    assert "'gpt2'" in line and "qwen3" in line
    _nothing_left(out_dir)


@pytest.mark.parametrize("module,suffix", CONVERTERS)
def test_existing_output_is_kept_without_overwrite(module, suffix, tiny_model_dir, tmp_path):
    out = tmp_path / f"m{suffix}"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    line = one_line_error(run_cli(module, "--model", tiny_model_dir, "--out", out))
    assert "already exists; pass --overwrite" in line
    assert [p.name for p in tmp_path.iterdir()] == [out.name]
    assert (out / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize("module,suffix", CONVERTERS)
def test_wrong_suffix_and_missing_model(module, suffix, tmp_path):
    line = one_line_error(run_cli(module, "--model", tmp_path, "--out", tmp_path / "m.onnx"))
    assert f"must end in {suffix}" in line
    line = one_line_error(run_cli(module, "--model", tmp_path, "--out", tmp_path / f"m{suffix}"))
    assert "no config.json" in line
    _nothing_left(tmp_path)
