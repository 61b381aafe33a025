"""AFM model presets, and building a model from a config.

The AFM architecture (pre-norm RMSNorm, per-head QK-norm, GQA, SwiGLU, RoPE 500k, tied embedding)
is exactly mlx-lm's ``qwen3`` model, so we build on its classes instead of re-implementing them;
every other family mlx-lm knows (``afm_mlx.core.families``) is built the same way from its
``config.json``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path
from mlx_lm.utils import _get_classes

from afm_mlx.core.errors import UserError
from afm_mlx.core.families import family_for, standard_config

_QWEN3_COMMON = {
    "model_type": "qwen3",
    "architectures": ["Qwen3ForCausalLM"],
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "rms_norm_eps": 1e-6,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "initializer_range": 0.02,
    "use_cache": True,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 3,
}


PRESETS: dict[str, dict[str, Any]] = {
    # For tests: < 1M parameters.
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 192,
        "vocab_size": 512,
        "max_position_embeddings": 512,
    },
    # The demo: trains usefully on a 2-core CPU in minutes.
    "small": {
        "hidden_size": 384,
        "num_hidden_layers": 6,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "intermediate_size": 1024,
        "vocab_size": 8192,
        "max_position_embeddings": 2048,
    },
    # AFM-on-device (Gunter et al., 2024, Table 1).
    "afm-3b": {
        "hidden_size": 3072,
        "num_hidden_layers": 26,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 8192,
        "vocab_size": 49152,
        "max_position_embeddings": 4096,
    },
}


def preset_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The full HF-style config of preset ``name`` with ``overrides`` applied and validated."""
    if name not in PRESETS:
        raise UserError(f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)}")
    config = {**_QWEN3_COMMON, **PRESETS[name], **overrides}
    validate_config(config, f"preset '{name}'")
    return config


def validate_config(config: dict[str, Any], source: str) -> None:
    """Refuse configs that cannot build a model, naming ``source`` and the bad keys (sizes are
    read under the Llama layout's names: ``families.standard_config``)."""
    family_for(config, source)
    config = standard_config(config)
    required = [
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "vocab_size",
    ]
    missing = [k for k in required if not isinstance(config.get(k), int) or config[k] <= 0]
    if missing:
        raise UserError(f"{source}: missing or non-positive integer(s): {', '.join(missing)}")
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    if kv_heads <= 0 or heads % kv_heads:
        raise UserError(
            f"{source}: num_attention_heads ({heads}) must be a multiple of "
            f"num_key_value_heads ({kv_heads})"
        )
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    if "head_dim" not in config and config["hidden_size"] % heads:
        raise UserError(
            f"{source}: hidden_size ({config['hidden_size']}) is not divisible by "
            f"num_attention_heads ({heads}); set head_dim explicitly"
        )
    if head_dim % 2:
        raise UserError(f"{source}: head_dim ({head_dim}) must be even for RoPE")


def build_model(config: dict[str, Any]) -> nn.Module:
    """Instantiate the mlx-lm model class for ``config`` (parameters stay lazy until evaluated)."""
    validate_config(config, "config")
    family = family_for(config, "config")
    if family.setup is not None:
        family.setup()
    model_class, args_class = _get_classes(config)
    return model_class(args_class.from_dict(config))


def init_weights(model: nn.Module, config: dict[str, Any], seed: int = 0) -> None:
    """GPT-style init: N(0, 0.02); residual output projections scaled by 1/sqrt(2 * layers)."""
    std = config.get("initializer_range", 0.02)
    residual_std = std / math.sqrt(2 * standard_config(config)["num_hidden_layers"])
    key = mx.random.key(seed)

    def init(path: str, p: mx.array) -> mx.array:
        nonlocal key
        if p.ndim < 2:
            return p  # norms keep ones (and biases zeros)
        key, sub = mx.random.split(key)
        scale = residual_std if re.search(r"(o_proj|out_proj|down_proj)\.weight$", path) else std
        return mx.random.normal(p.shape, key=sub, scale=scale).astype(p.dtype)

    model.update(tree_map_with_path(init, model.parameters()))


def count_parameters(config: dict[str, Any]) -> dict[str, int]:
    """Parameter counts from shapes only (MLX is lazy, so nothing is allocated)."""
    model = build_model(config)
    total = embedding = 0
    embeddings = {
        f"{path}.weight" for path, m in model.named_modules() if isinstance(m, nn.Embedding)
    }
    for name, p in tree_flatten(model.parameters()):
        total += p.size
        if name in embeddings or name.startswith("lm_head"):
            embedding += p.size
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}
