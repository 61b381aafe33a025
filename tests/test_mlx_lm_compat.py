"""mlx-lm users at home: its LoRA YAML, its data folders, its ``generate`` defaults and flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, one_line_error, run_cli

from afm_mlx.core.config import parse_config
from afm_mlx.core.errors import UserError
from afm_mlx.finetune import FinetuneConfig

# The keys of mlx-lm's example LoRA config (mlx_lm/examples/lora_config.yaml), our values.
MLX_LM_YAML = {
    "model": "base",
    "train": True,
    "fine_tune_type": "lora",
    "optimizer": "adamw",
    "data": "data/",
    "seed": 3,
    "num_layers": 2,
    "batch_size": 2,
    "iters": 7,
    "val_batches": 5,
    "learning_rate": 1e-4,
    "steps_per_report": 2,
    "steps_per_eval": 50,
    "adapter_path": "adapters",
    "save_every": 4,
    "test": False,
    "max_seq_length": 48,
    "grad_checkpoint": False,
    "mask_prompt": True,
    "lora_parameters": {
        "keys": ["self_attn.q_proj", "self_attn.v_proj"],
        "rank": 4,
        "scale": 10.0,
        "dropout": 0.0,
    },
}


def test_mlx_lm_lora_yaml_is_understood(tmp_path):
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump({**MLX_LM_YAML, "init_adapter": "none"}))
    cfg = parse_config(FinetuneConfig, ["--config", str(path)], "finetune", "")
    assert (cfg.model, cfg.data, cfg.out) == ("base", "data/", "adapters")
    assert (cfg.max_steps, cfg.batch_size, cfg.seq_len, cfg.seed) == (7, 2, 48, 3)
    assert (cfg.eval_batches, cfg.log_every, cfg.eval_every, cfg.save_every) == (5, 2, 50, 4)
    assert (cfg.rank, cfg.scale, cfg.dropout, cfg.num_layers) == (4, 10.0, 0.0, 2)
    assert cfg.keys == ["self_attn.q_proj", "self_attn.v_proj"]
    assert cfg.learning_rate == 1e-4
    # Flags still win over the file.
    cfg = parse_config(FinetuneConfig, ["--config", str(path), "--rank", "8"], "finetune", "")
    assert cfg.rank == 8


def test_unsupported_mlx_lm_options_are_named_in_one_line(tmp_path):
    path = tmp_path / "lora.yaml"
    bad = {**MLX_LM_YAML, "lr_schedule": {"name": "cosine_decay"}, "mask_prompt": False}
    bad["lora_parameters"] = {**MLX_LM_YAML["lora_parameters"], "alpha": 16}
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(UserError) as e:
        parse_config(FinetuneConfig, ["--config", str(path)], "finetune", "")
    assert "mlx-lm option(s) afm_mlx does not support" in str(e.value)
    for name in ("lr_schedule", "mask_prompt: False", "lora_parameters.alpha"):
        assert name in str(e.value)


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory):
    """An mlx-lm data folder: train.jsonl (30 records) and valid.jsonl (6)."""
    folder = tmp_path_factory.mktemp("mlxlm_data")
    rows = [{"prompt": f"Count {i}:", "completion": f" {i + 1} {i + 2}"} for i in range(36)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:30]))
    (folder / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[30:]))
    return folder


def test_mlx_lm_data_folder_splits_as_mlx_lm_does(data_folder, tiny_model_dir):
    from afm_mlx.data.tasks import task_datasets
    from afm_mlx.models.io import load_base

    _, tokenizer, _ = load_base(tiny_model_dir)
    train, valid = task_datasets(data_folder, tokenizer, 32, 0.1, 0)
    assert (len(train), len(valid)) == (30, 6)  # valid.jsonl is the held-out set, whole


@pytest.mark.slow  # a subprocess-heavy CLI check: in the slow suite
def test_finetune_with_mlx_lm_yaml_and_folder(data_folder, tiny_model_dir, tmp_path):
    from afm_mlx.adapters.lora import read_adapter

    config = {**MLX_LM_YAML, "model": str(tiny_model_dir), "data": str(data_folder)}
    config.update(adapter_path=str(tmp_path / "adapters"), init_adapter="none", progress=False)
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = run_cli("afm_mlx.finetune", "--config", path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "30 train / 6 valid sequences" in proc.stdout
    adapter = read_adapter(tmp_path / "adapters")
    assert (
        adapter.settings.rank == 4
        and adapter.settings.keys == MLX_LM_YAML["lora_parameters"]["keys"]
    )


def test_generate_defaults_and_flags_follow_mlx_lm(tiny_model_dir):
    from afm_mlx.generate import GenerateConfig
    from afm_mlx.inference.generator import Generator

    cfg = GenerateConfig()
    assert (cfg.temp, cfg.top_p, cfg.max_tokens) == (0.0, 1.0, 100)  # mlx-lm's defaults
    gen = Generator(tiny_model_dir)
    # A rotating cache larger than the text changes nothing; a small one still generates.
    full = gen.generate("ROMEO.\n", max_tokens=12)
    assert gen.generate("ROMEO.\n", max_tokens=12, max_kv_size=64) == full
    assert isinstance(gen.generate("ROMEO.\n", max_tokens=12, max_kv_size=6), str)
    with_system = gen.prompt_tokens("Hi", chat=False, system_prompt="Be brief.")
    text = gen.tokenizer.decode(with_system)
    assert text.index("Be brief.") < text.index("Hi")
    assert text.startswith("### System:")  # the built-in template (no chat template here)


@pytest.mark.slow  # a subprocess-heavy CLI check: in the slow suite
def test_generate_reads_the_prompt_from_stdin(tiny_model_dir):
    args = ["-m", "afm_mlx.generate", "--model", str(tiny_model_dir), "--max-tokens", "8"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    prompt = "ROMEO.\nWhat light through yonder window breaks?\n"
    piped = subprocess.run(
        [sys.executable, *args, "--prompt", "-"],
        input=prompt, capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )  # fmt: skip
    assert piped.returncode == 0, piped.stderr[-2000:]
    direct = run_cli("afm_mlx.generate", *args[2:], "--prompt", prompt)
    assert piped.stdout == direct.stdout
    # The same prompt reached the model: mlx-lm's stats line counts its tokens.
    counted = [p.stderr.split(" tokens,")[0] for p in (piped, direct)]
    assert counted[0] == counted[1] and counted[0].startswith("prompt: ")
    assert int(counted[0].split()[-1]) > 5
    empty = subprocess.run(
        [sys.executable, *args, "--prompt", "-"],
        input="", capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )  # fmt: skip
    assert "stdin" in one_line_error(empty)
    system = run_cli("afm_mlx.generate", *args[2:], "--prompt", "Hi", "--system-prompt", "Be.")
    assert system.returncode == 0, system.stderr[-2000:]
