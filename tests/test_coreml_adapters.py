"""Core ML adapters: each LoRA adapter adds decode_NAME / prefill_NAME over one stored base, its
logits match MLX with the adapter attached, and an adapter of another base is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import adapter_with_updates, one_line_error, run_cli
from test_coreml import (
    CHUNK,
    CONTEXT,
    DECODE,
    PROMPT,
    assert_logits_close,
    coreml_logits,
    mlx_logits,
)
from test_coreml_executor import open_package

from afm_mlx.adapters.lora import load_adapter
from afm_mlx.core.errors import UserError
from afm_mlx.models.io import load_model, model_fingerprint
from converters.coreml import ConvertConfig, convert

RANK = 16


def make_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    """A rank-16 adapter for ``base_dir`` that changes its outputs."""
    return adapter_with_updates(base_dir, out, seed, std=0.05, rank=RANK, scale=4.0)


@pytest.fixture(scope="module")
def adapters(tiny_mixed_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: make_adapter(tiny_mixed_dir, root / name, seed)
        for seed, name in enumerate(("chat", "code"))
    }


@pytest.fixture(scope="module")
def packages(tiny_mixed_dir, adapters, tmp_path_factory) -> dict[str, Path]:
    """The base alone (in-process) and base + two adapters (through the CLI, repeated --adapter)."""
    root = tmp_path_factory.mktemp("adapter_pkgs")
    base = root / "base.mlpackage"
    convert(
        ConvertConfig(
            model=str(tiny_mixed_dir), out=str(base), context=CONTEXT, prefill_chunk=CHUNK
        )
    )
    both = root / "both.mlpackage"
    args = [
        "--model",
        tiny_mixed_dir,
        "--out",
        both,
        "--context",
        CONTEXT,
        "--prefill-chunk",
        CHUNK,
    ]
    proc = run_cli(
        "converters.coreml",
        *args,
        "--adapter",
        f"chat={adapters['chat']}",
        "--adapter",
        f"code={adapters['code']}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "decode_chat" in proc.stdout and "prefill_code" in proc.stdout
    return {"base": base, "both": both}


def test_adapter_functions_listed(packages):
    _, spec, _ = open_package(packages["both"])
    names = [f.name for f in spec.description.functions]
    assert names == [
        "decode",
        "prefill",
        "decode_chat",
        "prefill_chat",
        "decode_code",
        "prefill_code",
    ]


@pytest.mark.parametrize("name", ["chat", "code"])
def test_adapter_logits_match_mlx(tiny_mixed_dir, adapters, packages, name):
    model, _, _ = load_model(tiny_mixed_dir)
    load_adapter(model, adapters[name])
    _, _, prog = open_package(packages["both"])
    got = coreml_logits(prog, PROMPT, DECODE, suffix=f"_{name}")
    assert_logits_close(got, mlx_logits(model, PROMPT, DECODE))


def test_base_functions_unchanged_by_adapters(tiny_mixed_dir, packages):
    model, _, _ = load_model(tiny_mixed_dir)
    want = mlx_logits(model, PROMPT, DECODE[:2])
    _, _, prog = open_package(packages["both"])
    got = coreml_logits(prog, PROMPT, DECODE[:2])
    assert_logits_close(got, want)
    adapted = coreml_logits(prog, PROMPT, DECODE[:2], suffix="_chat")
    assert np.abs(adapted - got).max() > 0.1 * np.abs(want).max()  # the adapter does something


def test_adapter_kept_low_rank_and_unfused(packages):
    _, _, prog = open_package(packages["both"])
    convs = {op.name: op for op in prog.functions["decode_chat"].operations if op.op_type == "conv"}
    a, b = convs["l0_q_proj_lora_a"], convs["l0_q_proj_lora_b"]
    assert a.outputs[0].shape[1] == RANK and b.inputs["x"] is a.outputs[0]
    base_weight = convs["l0_q_proj"].inputs["weight"].op
    assert base_weight.op_type == "constexpr_lut_to_dense"  # the palettized base, not fused


def test_adapters_grow_package_by_their_size_only(adapters, packages):
    """Base weights are stored once: two adapters add their own bytes, not another base."""
    weights = {
        k: (p / "Data/com.apple.CoreML/weights/weight.bin").stat().st_size
        for k, p in packages.items()
    }
    adapter_bytes = sum((p / "adapters.safetensors").stat().st_size for p in adapters.values())
    growth = weights["both"] - weights["base"]
    # 64-byte blob headers and alignment for 2 x 28 small matrices: a few % at this tiny size.
    assert 0.95 * adapter_bytes < growth < 1.10 * adapter_bytes, (growth, adapter_bytes)


def test_adapter_of_another_base_is_refused(tiny_model_dir, tiny_mixed_dir, adapters, tmp_path):
    # Trained on the palettized base, converted with the fp one: different fingerprints.
    fp_model, _, _ = load_model(tiny_model_dir)
    out = tmp_path / "x.mlpackage"
    proc = run_cli(
        "converters.coreml",
        "--model",
        tiny_model_dir,
        "--out",
        out,
        "--context",
        CONTEXT,
        "--prefill-chunk",
        CHUNK,
        "--adapter",
        f"chat={adapters['chat']}",
    )
    line = one_line_error(proc)
    pal_model, _, _ = load_model(tiny_mixed_dir)
    assert model_fingerprint(pal_model) in line and model_fingerprint(fp_model) in line
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_adapter_without_fingerprint_is_refused(tiny_mixed_dir, tmp_path):
    folder = make_adapter(tiny_mixed_dir, tmp_path / "anon", seed=3)
    data = json.loads((folder / "adapter_config.json").read_text())
    del data["base_fingerprint"]
    (folder / "adapter_config.json").write_text(json.dumps(data))
    cfg = ConvertConfig(
        model=str(tiny_mixed_dir),
        out=str(tmp_path / "x.mlpackage"),
        context=CONTEXT,
        prefill_chunk=CHUNK,
        adapter=[f"anon={folder}"],
    )
    with pytest.raises(UserError, match="no base_fingerprint"):
        convert(cfg)
    assert not (tmp_path / "x.mlpackage").exists()
