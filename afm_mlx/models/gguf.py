"""GGUF checkpoints (llama.cpp's file format) imported into the Hugging Face layout.

``import_gguf(file, out)`` writes ``config.json``, ``model.safetensors`` and the tokenizer
(``tokenizer.json`` + ``tokenizer_config.json`` with the chat template and the BOS / EOS / pad
tokens) so that mlx-lm, transformers and every afm_mlx stage read the model identically.
``imported(file)`` does it once per file content, into the cache, for ``--model FILE.gguf``.

The decoding is the well-kept code of others: the ``gguf`` package reads the file, dequantizes
every tensor type it knows (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_*, the k-quants Q2_K..Q6_K,
...) and maps llama.cpp's tensor names to the Hugging Face ones; transformers' GGUF tokenizer
converter rebuilds the tokenizer. What is ours is the metadata -> ``config.json`` mapping of each
architecture and the two changes llama.cpp's converter makes to the weights: the Q/K rows of
llama-style models permuted for its RoPE, and Gemma's norm weights stored with their +1.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from afm_mlx.core.errors import UserError
from afm_mlx.core.fileio import atomic_write_json, output_lock, read_json, staged_dir
from afm_mlx.models.files import save_model
from afm_mlx.models.presets import build_model, validate_config

GGUF_SUFFIX = ".gguf"
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def _gemma3(meta: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    # What llama.cpp does not store but fixes in its code for Gemma 3: local RoPE base 10000,
    # a global layer every 6th, queries scaled by the head size (by hidden/heads at 27B).
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    big = config["num_hidden_layers"] == 62
    return {
        "rope_local_base_freq": 10000.0,
        "sliding_window_pattern": 6,
        "query_pre_attn_scalar": hidden // heads if big else config["head_dim"],
        "sliding_window": meta.get("gemma3.attention.sliding_window", 512),
        "hidden_activation": "gelu_pytorch_tanh",
    }


@dataclass(frozen=True)
class Architecture:
    """How llama.cpp wrote one architecture, and what the Hugging Face config calls it."""

    model_type: str
    architectures: str
    permuted_qk: bool = False  # llama.cpp's LlamaModel converter (and its subclasses) permute Q/K
    norm_offset: float = 0.0  # stored in every norm weight on top of the model's own
    extra: Callable[[dict, dict], dict] | None = field(default=None, compare=False)


# general.architecture -> how to read it; llama.cpp's "llama" also carries Mistral's models.
ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", "LlamaForCausalLM", permuted_qk=True),
    "qwen2": Architecture("qwen2", "Qwen2ForCausalLM"),
    "qwen3": Architecture("qwen3", "Qwen3ForCausalLM"),
    "phi3": Architecture("phi3", "Phi3ForCausalLM"),
    "gemma3": Architecture("gemma3_text", "Gemma3ForCausalLM", norm_offset=1.0, extra=_gemma3),
    "smollm3": Architecture("smollm3", "SmolLM3ForCausalLM", permuted_qk=True),
}
# GGUF's standard hyperparameter keys (``{arch}.`` prefixed) -> config.json keys.
CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "attention.key_length": "head_dim",
}


def _reader(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, IndexError, ... on a damaged file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a readable GGUF file ({msg}); re-download it") from None


def read_metadata(reader) -> dict[str, Any]:
    """Every metadata field of a ``gguf.GGUFReader`` as Python values."""
    return {name: f.contents() for name, f in reader.fields.items()}


def hf_config(meta: dict[str, Any], tensor_names: set[str], source: str) -> dict[str, Any]:
    """The ``config.json`` of a GGUF file's model, checked against our families; one-line
    ``UserError`` for what cannot be mapped (architecture, RoPE scaling)."""
    arch_name = meta.get("general.architecture")
    arch = ARCHITECTURES.get(arch_name)
    if arch is None:
        raise UserError(
            f"{source}: GGUF architecture {arch_name!r} cannot be imported; supported: "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )
    scaling = meta.get(f"{arch_name}.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in tensor_names:
        raise UserError(f"{source}: RoPE scaling ({scaling}) is not imported from GGUF yet")
    config: dict[str, Any] = {"model_type": arch.model_type, "architectures": [arch.architectures]}
    for key, name in CONFIG_KEYS.items():
        if f"{arch_name}.{key}" in meta:
            config[name] = meta[f"{arch_name}.{key}"]
    config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    config["rope_theta"] = float(config.get("rope_theta", 10000.0))
    config["vocab_size"] = meta.get(f"{arch_name}.vocab_size", len(meta["tokenizer.ggml.tokens"]))
    # llama.cpp writes the output projection only when it is not the embedding.
    config["tie_word_embeddings"] = "output.weight" not in tensor_names
    config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    config["hidden_act"] = "silu"
    for key in ("bos", "eos", "padding"):
        if f"tokenizer.ggml.{key}_token_id" in meta:
            config[f"{'pad' if key == 'padding' else key}_token_id"] = meta[
                f"tokenizer.ggml.{key}_token_id"
            ]
    if arch.extra is not None:
        config.update(arch.extra(meta, config))
    validate_config(config, source)
    return config


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's ``LlamaModel.permute`` of Q/K rows (its RoPE pairs neighbours; the
    Hugging Face layout pairs halves): rows (heads, 2, d/2) -> (heads, d/2, 2) back."""
    d = w.shape[0] // heads // 2
    return w.reshape(heads, d, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_weights(reader, config: dict[str, Any], arch_name: str, source: str, dtype: mx.Dtype):
    """Name -> array of the model's weights in the Hugging Face layout, each dequantized by
    the ``gguf`` package and cast to ``dtype``. Every model parameter must come from the file
    and every tensor of the file must land in the model."""
    import gguf

    arch = ARCHITECTURES[arch_name]
    by_name = {t.name: t for t in reader.tensors}
    arch_id = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch_name]
    name_map = gguf.get_tensor_name_map(arch_id, config["num_hidden_layers"])
    model = build_model(config)  # for its parameter names only (MLX allocates nothing yet)
    from mlx.utils import tree_flatten

    weights, missing = {}, []
    for hf_name, param in tree_flatten(model.parameters()):
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = name_map.get_name(base)
        tensor = by_name.pop(f"{gguf_name}.{suffix}", None) if gguf_name else None
        if tensor is None:
            missing.append(hf_name)
            continue
        try:
            w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as e:
            raise UserError(
                f"{source}: tensor {tensor.name} has type {tensor.tensor_type.name}, which the gguf "
                f"package cannot dequantize ({e})"
            ) from None
        w = np.asarray(w, dtype=np.float32).reshape(param.shape)
        if arch.permuted_qk and base.endswith("self_attn.q_proj"):
            w = _unpermute(w, config["num_attention_heads"])
        elif arch.permuted_qk and base.endswith("self_attn.k_proj"):
            w = _unpermute(w, config["num_key_value_heads"])
        if arch.norm_offset and base.endswith("norm"):
            w = w - arch.norm_offset
        weights[hf_name] = mx.array(w).astype(dtype)
    if missing or by_name:
        parts = [f"missing {', '.join(missing[:4])}" if missing else ""]
        parts.append(f"unused {', '.join(sorted(by_name)[:4])}" if by_name else "")
        raise UserError(
            f"{source}: the tensors do not fit a {config['model_type']} model "
            f"({'; '.join(p for p in parts if p)}); nothing was written"
        )
    return model, weights


def hf_tokenizer(meta: dict[str, Any], source: str):
    """A ``transformers`` fast tokenizer from the file's vocabulary, merges, special tokens and
    chat template (transformers' own GGUF converter builds it)."""
    from transformers import PreTrainedTokenizerFast

    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    except ImportError:  # transformers < 5.2 kept them in integrations.ggml
        from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    if "tokenizer.ggml.tokens" not in meta:
        raise UserError(f"{source}: the GGUF file carries no tokenizer (tokenizer.ggml.tokens)")
    groups = {
        group: {
            name: meta[f"tokenizer.{key}"]
            for key, name in keys.items()
            if f"tokenizer.{key}" in meta
        }
        for group, keys in GGUF_TOKENIZER_MAPPING.items()
    }
    backend, _ = convert_gguf_tokenizer(meta["general.architecture"], groups["tokenizer"])
    tokens = groups["tokenizer"]["tokens"]
    specials = {}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            specials[f"{name}_token"] = tokens[token_id]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
    if "chat_template" in groups["tokenizer_config"]:
        tokenizer.chat_template = groups["tokenizer_config"]["chat_template"]
    return tokenizer


def import_gguf(path: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Write the model in GGUF file ``path`` to the folder ``out`` in the Hugging Face layout
    (built beside it and renamed into place: a failure leaves nothing)."""

    path, out = Path(path), Path(out)
    if not path.is_file():
        raise UserError(f"--gguf {path}: no such file")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    reader = _reader(path)
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    config = hf_config(meta, names, str(path))
    model, weights = hf_weights(
        reader, config, meta["general.architecture"], str(path), DTYPES[dtype]
    )
    tokenizer = hf_tokenizer(meta, str(path))
    model.load_weights(list(weights.items()), strict=True)
    with staged_dir(out) as staged:
        tokenizer.save_pretrained(staged)
        save_model(staged, model, config)  # config.json last: the folder is a model from then on
    return out


def cache_root() -> Path:
    return Path(os.environ.get("AFM_MLX_CACHE", Path.home() / ".cache" / "afm_mlx")) / "gguf"


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _content_key(path: Path) -> str:
    """The file's SHA-256, remembered by (path, size, modification time) so that a multi-GB
    file is hashed once, not at every resolution of ``--model``."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    memo_path = cache_root() / "digests.json"
    memo = read_json(memo_path, "GGUF digest cache") if memo_path.is_file() else {}
    if key not in memo:
        memo[key] = file_digest(path)
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(memo_path, memo)
    return memo[key]


def imported(path: str | Path, dtype: str = "float32") -> Path:
    """The folder ``import_gguf`` writes for this file's content, imported once into the cache
    (keyed by the file's SHA-256 and ``dtype``); later calls return it at once."""
    path = Path(path)
    folder = cache_root() / f"{_content_key(path)[:16]}-{dtype}"
    if not (folder / "config.json").is_file():
        with output_lock(folder, flag=str(path)):
            if not (folder / "config.json").is_file():  # another process may have finished it
                import_gguf(path, folder, dtype)
    return folder
