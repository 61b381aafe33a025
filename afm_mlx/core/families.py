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
* what the converters' layer plan cannot read off the modules: ``aliases`` (the family's names
  for the Llama layout's modules, afm7's ``out_proj``, ``embedding`` and ``output_norm``),
  ``block_lists`` (the lists of blocks under ``model``, in order: afm7's KV-reuse blocks follow
  its regular ones), ``qk_norm_after_rope`` (afm7 rotates queries and keys before their norms),
  ``norm_offset``, ``embed_scale`` and ``mlp_activation`` (Gemma);
* ``standardize``: the config under the Llama layout's key names (``hidden_size``,
  ``num_hidden_layers``, ...) for a family that names them otherwise (afm7's ``hidden_dim``,
  ``num_layers``, ...); every stage reads sizes through ``standard_config``;
* ``replay_blocks``: whether mixed-bit sensitivity may replay blocks from their recorded inputs;
  afm7's last layers read a cache the earlier ones fill during the pass, so it runs whole passes;
* ``setup``: run once when a model of the family is built (afm7: a straight-through gradient
  for the 8-bit fake quantization of keys and values, whose ``round`` has none).

A ``model_type`` that is not here is refused in one line naming what it lacks (mixture-of-experts
models, for one, have expert layers that neither palettization nor the converters handle).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from afm_mlx.core.errors import UserError

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


def _afm7_standard(c: dict[str, Any]) -> dict[str, Any]:
    """afm7's config under the Llama layout's names (mlx-lm's ``afm7.ModelArgs``)."""
    out = dict(c)
    names = {
        "hidden_size": "hidden_dim",
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "num_heads",
        "num_key_value_heads": "num_kv_heads",
    }
    for std, own in names.items():
        if own in c:
            out.setdefault(std, c[own])
    if isinstance(c.get("hidden_dim"), int):
        out.setdefault(
            "intermediate_size", int(c["hidden_dim"] * c.get("hidden_dim_scale_factor", 3.25))
        )
        if isinstance(c.get("num_heads"), int) and c["num_heads"] > 0:
            out.setdefault("head_dim", c["hidden_dim"] // c["num_heads"])
    out.setdefault("tie_word_embeddings", True)  # the LM head is the embedding (as_linear)
    return out


def _afm7_slices(c: dict[str, Any]) -> dict[str, list[int]]:
    c = _afm7_standard(c)
    hd = c["head_dim"]
    return {
        "self_attn.qkv_proj": [
            c["num_attention_heads"] * hd,
            c["num_key_value_heads"] * hd,
            c["num_key_value_heads"] * hd,
        ]
    }


_afm7_patched = None


def _afm7_straight_through() -> None:
    """Give mlx-lm's afm7 ``fake_8bit_quant`` (keys and values rounded to 8 bits with a
    learned scale) a straight-through gradient: ``round`` has a zero gradient in MLX, so without
    it nothing upstream of the keys and values (the k and v slices of ``qkv_proj``, adapters on
    them) would ever train. The forward pass is the original function, unchanged."""
    import mlx.core as mx
    from mlx_lm.models import afm7

    global _afm7_patched
    if afm7.fake_8bit_quant is _afm7_patched:
        return
    original = afm7.fake_8bit_quant

    @mx.custom_function
    def fake_8bit_quant(x, scale):
        return original(x, scale)

    @fake_8bit_quant.vjp
    def fake_8bit_quant_vjp(primals, cotangent, output):
        x, scale = primals
        inside = mx.abs(x.astype(mx.float32) / scale) <= 127.5  # clipped values get none
        return mx.where(inside, cotangent, 0).astype(x.dtype), mx.zeros_like(scale)

    afm7.fake_8bit_quant = _afm7_patched = fake_8bit_quant


def _gemma_embed_scale(c: dict[str, Any]) -> float:
    """sqrt(hidden_size), rounded to bfloat16 as mlx-lm's Gemma 3 rounds it."""
    import mlx.core as mx

    return float(mx.array(c["hidden_size"] ** 0.5, mx.bfloat16).astype(mx.float32).item())


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    projections: tuple[str, ...] = LLAMA_PROJECTIONS
    fused: Callable[[dict[str, Any]], dict[str, list[int]]] = field(default=lambda c: {})
    # Each fused projection's slices, in order, named as the Llama layout's projections.
    fused_parts: dict[str, tuple[str, ...]] = field(default_factory=dict)
    standardize: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    replay_blocks: bool = True
    setup: Callable[[], None] | None = None
    # What the converters' layer plan needs beyond the Llama layout: module names, the lists of
    # blocks, where the q/k norms sit (afm7); RMSNorm scales of ``norm_offset + weight``, the
    # embedded tokens times ``embed_scale(config)``, the MLP's gate (Gemma).
    aliases: dict[str, str] = field(default_factory=dict)
    block_lists: tuple[str, ...] = ("layers",)
    qk_norm_after_rope: bool = False
    norm_offset: float = 0.0
    embed_scale: Callable[[dict[str, Any]], float] | None = None
    mlp_activation: str = "silu"


FAMILIES = (
    Family("Llama / Qwen / Mistral", ("qwen3", "llama", "qwen2", "mistral")),
    Family(
        "Gemma 3",
        ("gemma3_text",),
        # Sliding-window layers, a local and a global RoPE, q/k norms and the sandwich norms
        # are read off the modules; these three are not.
        norm_offset=1.0,
        embed_scale=_gemma_embed_scale,
        mlp_activation="gelu_tanh",
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
    Family(
        "AFM (afm7)",
        ("afm7",),
        # Regular blocks fuse q|k|v; the KV-reuse blocks only project queries.
        projections=(
            "self_attn.qkv_proj",
            "self_attn.q_proj",
            "self_attn.out_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ),
        fused=_afm7_slices,
        fused_parts={
            "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        },
        # The converters read the rest off the modules: a block without key and value
        # projections attends to the last cache before it (the KV-reuse blocks), the keys and
        # values of the others are rounded to 8 bits with their ``quant_*_scale``, and RoPE
        # pairs are interleaved (traditional).
        aliases={
            "self_attn.o_proj": "self_attn.out_proj",
            "embed_tokens": "embedding",
            "norm": "output_norm",
        },
        block_lists=("layers", "kv_reuse_layers"),
        qk_norm_after_rope=True,
        standardize=_afm7_standard,
        replay_blocks=False,
        setup=_afm7_straight_through,
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


def split_points(module: Any) -> tuple[int, ...]:
    """Where a fused projection's output is split into the tuple it returns (mlx-lm's afm7
    ``FusedLinear`` keeps them as ``indices``; ours as ``split_at``); () for a plain layer."""
    for key in ("split_at", "indices"):  # module entries (an MLX module is a dict), not methods
        value = module.get(key) if isinstance(module, dict) else None
        if isinstance(value, (list, tuple)):
            return tuple(value)
    return ()


def standard_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the Llama layout's size keys filled in for families that name them
    otherwise (the original keys stay; a config of an unknown family comes back unchanged)."""
    for family in FAMILIES:
        if config.get("model_type") in family.model_types and family.standardize:
            return family.standardize(config)
    return config


def model_family(model) -> Family:
    """The family of a loaded mlx-lm model (from its ``model_type``)."""
    model_type = getattr(model, "model_type", None) or getattr(
        getattr(model, "args", None), "model_type", None
    )
    return family_for({"model_type": model_type}, type(model).__module__)
