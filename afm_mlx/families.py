"""The architectures afm_mlx handles, and what each stage needs to know about them.

Every model class is mlx-lm's (``mlx_lm.models.<model_type>``); a family only records what the
stages cannot read off the modules themselves. Stages ask ``family_for(config)`` instead of
branching on ``model_type``:

* ``projections``: the block-relative paths of the projections that adapters target by default
  and the converters lower (palettization takes every ``nn.Linear`` but the LM head);
* ``fused``: projections that compute several outputs in one matrix (Phi-3's ``qkv_proj`` and
  ``gate_up_proj``), with the row count of each slice: a LUT group of rows must not straddle two
  slices, so that each slice keeps a group layout of its own (as if it were its own layer); the
  converters lower each slice as the Llama-layout projection it stands for (``fused_parts``);
* ``converter_missing``: what the Core ML / Core AI converters' layer plan lacks for the family,
  or None when they convert it. A converter refuses such a model in one line naming it.

A ``model_type`` that is not here is refused in one line naming what it lacks (mixture-of-experts
models, for one, have expert layers that neither palettization nor the converters handle).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from afm_mlx.errors import UserError

# Apple's recipe: every attention and FFN projection of every layer.
LLAMA_PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


PHI3_PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def _head_dim(c: dict[str, Any]) -> int:
    return c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]


def _phi3_slices(c: dict[str, Any]) -> dict[str, list[int]]:
    kv = c.get("num_key_value_heads") or c["num_attention_heads"]
    hd = _head_dim(c)
    return {
        "self_attn.qkv_proj": [c["num_attention_heads"] * hd, kv * hd, kv * hd],
        "mlp.gate_up_proj": [c["intermediate_size"]] * 2,
    }


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    projections: tuple[str, ...] = LLAMA_PROJECTIONS
    converter_missing: str | None = None
    fused: Callable[[dict[str, Any]], dict[str, list[int]]] = field(default=lambda c: {})
    # Each fused projection's slices, in order, named as the Llama layout's projections.
    fused_parts: dict[str, tuple[str, ...]] = field(default_factory=dict)


FAMILIES = (
    Family("Llama / Qwen / Mistral", ("qwen3", "llama", "qwen2", "mistral")),
    Family(
        "Gemma 3",
        ("gemma3_text",),
        converter_missing=(
            "sliding-window layers, the embedding scale and Gemma's (1 + weight) RMSNorm "
            "with its extra sandwich norms"
        ),
    ),
    Family("SmolLM3", ("smollm3",)),  # its layers without RoPE: converters skip the rotation
    Family(
        "Phi-3",
        ("phi3",),
        projections=PHI3_PROJECTIONS,
        fused=_phi3_slices,
        fused_parts={
            "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
        },
    ),
)

# Types users bring that no stage handles yet, with what is missing.
NOT_SUPPORTED = {
    "qwen3_moe": "mixture-of-experts layers",
    "qwen2_moe": "mixture-of-experts layers",
    "mixtral": "mixture-of-experts layers",
    "deepseek_v2": "mixture-of-experts layers and latent attention",
    "deepseek_v3": "mixture-of-experts layers and latent attention",
    "gpt_oss": "mixture-of-experts layers",
    "afm7": "KV-reuse layers and fused projections",
    "gemma3": "the vision tower (a text-only gemma3_text checkpoint works)",
}


def supported_types() -> list[str]:
    return [t for f in FAMILIES for t in f.model_types]


def family_for(config: dict[str, Any], source: str) -> Family:
    """The family of ``config`` (an HF-style ``config.json``), or a one-line refusal."""
    model_type = config.get("model_type")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    lacks = NOT_SUPPORTED.get(str(model_type))
    why = f"afm_mlx does not handle its {lacks} yet" if lacks else "not a family afm_mlx knows"
    raise UserError(
        f"{source}: model_type '{model_type}' is not supported ({why}); "
        f"supported: {', '.join(supported_types())}"
    )


def model_family(model) -> Family:
    """The family of a loaded mlx-lm model (from its ``model_type``)."""
    model_type = getattr(model, "model_type", None) or getattr(
        getattr(model, "args", None), "model_type", None
    )
    return family_for({"model_type": model_type}, type(model).__module__)
