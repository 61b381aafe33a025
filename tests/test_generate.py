"""Generation with adapters (mlx-lm sampling and KV cache), and task-data loss masks."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import adapter_with_updates, one_line_error, run_cli

from afm_mlx.core.errors import UserError
from afm_mlx.data.tasks import MaskedDataset, decode_masked, encode_record, read_task_records
from afm_mlx.inference.generator import Generator
from afm_mlx.models.files import save_model
from afm_mlx.models.presets import build_model, init_weights, preset_config
from afm_mlx.palettization import kernels


def _strong_adapter(model_dir, out, seed):
    """An adapter that moves the greedy text far from the base's."""
    return adapter_with_updates(model_dir, out, seed, std=2.0, rank=4, scale=1.0)


@pytest.fixture(scope="module")
def wide_head_model(tiny_tokenizer, tmp_path_factory):
    """The tiny preset with head_dim 64, so an 8-bit KV cache (groups of 64) applies."""
    config = preset_config("tiny", head_dim=64)
    model = build_model(config)
    init_weights(model, config, seed=3)
    return save_model(tmp_path_factory.mktemp("wide"), model, config, tiny_tokenizer)


def test_generation_differs_with_adapter_and_repeats_per_seed(tiny_model_dir, tmp_path):
    adapter = _strong_adapter(tiny_model_dir, tmp_path / "a", seed=1)
    gen = Generator(tiny_model_dir)
    opts = dict(max_tokens=24, temp=1.0, top_p=0.95)
    base = gen.use(None).generate("ROMEO.\n", seed=7, **opts)
    tuned = gen.use(adapter).generate("ROMEO.\n", seed=7, **opts)
    assert tuned != base
    assert gen.generate("ROMEO.\n", seed=7, **opts) == tuned
    assert gen.generate("ROMEO.\n", seed=8, **opts) != tuned
    assert gen.use(None).generate("ROMEO.\n", seed=7, **opts) == base
    # Greedy decoding equals argmax of the full-sequence logits (mlx-lm's cache path is consistent).
    gen.use(adapter)
    prompt = list(gen.tokenizer.encode("ROMEO.\n", add_special_tokens=False))
    text = gen.generate("ROMEO.\n", max_tokens=1, temp=0.0)
    expected = int(mx.argmax(gen.model(mx.array([prompt]))[0, -1]).item())
    assert text == gen.tokenizer.decode([expected])


def test_kv_cache_8bit(wide_head_model):
    gen = Generator(wide_head_model)
    full = gen.generate("KING.\n", max_tokens=12, temp=0.0)
    quantized = gen.generate("KING.\n", max_tokens=12, temp=0.0, kv_bits=8)
    assert len(quantized) > 0 and quantized[:4] == full[:4]
    with pytest.raises(UserError, match="head_dim 64"):
        gen.generate("KING.\n", max_tokens=2, kv_bits=8, kv_group_size=128)


def test_cli_answers_with_each_adapter(tiny_model_dir, tmp_path):
    a = _strong_adapter(tiny_model_dir, tmp_path / "a", seed=1)
    b = _strong_adapter(tiny_model_dir, tmp_path / "b", seed=2)
    args = ["--model", tiny_model_dir, "--prompt", "ROMEO.\n", "--max-tokens", "8", "--seed", "3"]
    proc = run_cli("afm_mlx.generate", *args, "--adapter", "none", a, b)
    assert proc.returncode == 0, proc.stderr
    assert [line for line in proc.stdout.splitlines() if line.startswith("===")] == [
        "=== base ===",
        f"=== {a} ===",
        f"=== {b} ===",
    ]
    err = one_line_error(run_cli("afm_mlx.generate", *args, "--top-p", "0"))
    assert "--top-p" in err


class _Tok:
    """Whitespace tokenizer: one id per character, so masks are easy to read."""

    eos_token_id = 2
    chat_template = None

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def test_loss_is_on_answer_tokens_only(tmp_path):
    tok = _Tok()
    ids, mask = encode_record({"prompt": "ab", "completion": "cd"}, tok)
    assert ids == [97, 98, 99, 100, 2] and mask == [False, False, True, True, True]
    ids, mask = encode_record(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        tok,
    )
    answer = [chr(i) for i, m in zip(ids, mask) if m and i != 2]
    assert "".join(answer) == "yo" and sum(mask) == 3  # "yo" + EOS
    ids, mask = encode_record({"text": "xyz"}, tok)
    assert all(mask)

    data = MaskedDataset([encode_record({"prompt": "ab", "completion": "c"}, tok)], 6, 2, "t")
    window = mx.array(data.batch(np.array([0])))
    got_ids, got_mask = decode_masked(window)
    assert got_ids[0].tolist() == [97, 98, 99, 2, 2, 2, 2]  # padded with EOS...
    assert got_mask[0].tolist() == [False, False, True, True, False, False, False]  # ...masked

    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(UserError, match=r"t.jsonl:1: .*assistant"):
        read_task_records(path)


def test_a_completion_is_tokenized_with_its_prompt(tiny_model_dir):
    """A SentencePiece tokenizer starts every encoding at a word boundary: encoded alone, the
    completion " HAMLET" would be ``"▁", "▁HAMLET"`` after "Speaker:", a token pair that text
    never produces. Records are tokenized as generation tokenizes their text (as mlx-lm does)."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from afm_mlx.training.losses import choice_accuracy

    tok = load_tokenizer(tiny_model_dir)
    eos = tok.eos_token_id
    alone = tok.encode(" king", add_special_tokens=False)
    joint = tok.encode("The king", add_special_tokens=False)
    assert len(alone) > len(joint) - len(tok.encode("The", add_special_tokens=False))  # the trap
    ids, mask = encode_record({"prompt": "The", "completion": " king"}, tok)
    assert ids == joint + [eos]
    assert tok.decode([i for i, m in zip(ids, mask) if m and i != eos]).strip() == "king"
    assert mask == [False] * (len(ids) - sum(mask)) + [True] * sum(mask)

    messages = [
        {"role": "user", "content": "Who is there?"},
        {"role": "assistant", "content": "Nay, answer me."},
    ]
    ids, mask = encode_record({"messages": messages}, tok)
    first = mask.index(True)
    generator = Generator(tiny_model_dir)
    assert ids[:first] == generator.chat_tokens(messages[:1])  # the prompt generation sees
    answer = [i for i, m in zip(ids, mask) if m and i != eos]
    assert tok.decode(answer).strip() == "Nay, answer me."

    # Multiple-choice scoring tokenizes each choice with its prompt too (scores checked against
    # full-sequence scoring in test_speakers); here: it runs on a real tokenizer.
    record = {"prompt": "The", "completion": " king", "choices": [" king", " queen"]}
    result = choice_accuracy(generator.model, generator.tokenizer, [record] * 2)
    assert result["chance"] == 0.5 and result["accuracy"] in (0.0, 1.0)


def test_dense_cache_is_an_exact_speed_option(tiny_lut4_dir, tmp_path):
    from afm_mlx.palettization.layers import palettized_layers

    adapter = _strong_adapter(tiny_lut4_dir, tmp_path / "a", seed=2)
    opts = dict(max_tokens=16, temp=0.0)  # greedy: the kernel and a dense GEMM round apart
    texts = {}
    for mode in ("off", "on", "auto"):
        gen = Generator(tiny_lut4_dir, dense_cache=mode)
        layers = [m for _, m in palettized_layers(gen.model)]
        assert layers and all((m._dense is not None) == gen.dense_cached for m in layers)
        texts[mode] = (gen.use(None).generate("ROMEO.\n", **opts), gen.use(adapter).generate(
            "ROMEO.\n", **opts
        ))  # fmt: skip
    assert texts["on"] == texts["off"] == texts["auto"]
    assert gen.last_stats["generation_tokens"] == 16 and gen.last_stats["generation_tps"] > 0
    assert texts["on"][0] != texts["on"][1]
    # auto caches only on a CPU without a LUT kernel (this tiny model fits any memory).
    on_cpu = mx.default_device().type == mx.cpu
    assert Generator(tiny_lut4_dir).dense_cached == (on_cpu and not kernels.kernel_usable())
    with kernels.using("off"):
        assert Generator(tiny_lut4_dir).dense_cached == on_cpu
    with pytest.raises(UserError, match="--dense-cache 'x'"):
        Generator(tiny_lut4_dir, dense_cache="x")
    err = one_line_error(
        run_cli(
            "afm_mlx.generate", "--model", tiny_lut4_dir, "--prompt", "Hi", "--dense-cache", "x"
        )
    )
    assert "--dense-cache" in err
