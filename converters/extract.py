"""Reading a model into the weights plan (``converters.weights``): every matrix as the model
stores it (palettized layers' packed indices and LUTs untouched), norms, RoPE tables, the head in
vocabulary chunks, and adapters checked against the base they were trained on.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from afm_mlx.core.errors import UserError
from afm_mlx.core.families import family_for
from afm_mlx.palettization.packing import packed_length
from converters.weights import (
    DEFAULT_HEAD_CHUNK,
    PROJECTIONS,
    Layer,
    LoraWeights,
    LutMatrix,
    Matrix,
    ModelWeights,
    Projection,
)


def _dense(a: mx.array, what: str) -> np.ndarray:
    """NumPy copy of an MLX weight in its own precision (bfloat16, which NumPy lacks, exactly as
    float32)."""
    x = np.array(a if a.dtype in (mx.float16, mx.float32) else a.astype(mx.float32))
    if not np.all(np.isfinite(x)):
        raise UserError(f"{what}: weights are not finite")
    return x


def _palettized_matrix(layer: nn.Module, what: str) -> LutMatrix:
    """The stored (packed) indices and LUTs of an ``afm_mlx.palettization.layers`` layer, values untouched."""
    # A view of MLX's buffer, not a copy: once the block is released, the plan holds the only one.
    packed = np.asarray(layer.packed)
    lut = np.array(layer.lut)
    bits, cols = int(layer.bits), int(layer.shape[1])
    if (
        lut.dtype != np.float16
        or packed.dtype != np.uint8
        or lut.shape[1] != 1 << bits
        or packed.shape[1] != packed_length(cols, bits)
    ):
        raise UserError(f"{what}: unexpected palettized layout {lut.dtype} {lut.shape}")
    return LutMatrix(packed=packed, cols=cols, lut=lut, bits=bits, axis=int(layer.axis))


def _matrix(module: nn.Module, what: str) -> Matrix:
    if isinstance(module, nn.QuantizedLinear | nn.QuantizedEmbedding):
        raise UserError(
            f"{what}: mlx affine-quantized layers are not supported; convert the float model "
            "or a palettized one (python -m afm_mlx.palettize)"
        )
    if callable(getattr(module, "indices", None)) and "lut" in module:
        return _palettized_matrix(module, what)
    if isinstance(module, nn.Linear | nn.Embedding):
        return _dense(module.weight, what)
    raise UserError(f"{what}: layer type {type(module).__name__} is not supported")


def _projection(module: nn.Module, path: str) -> Projection:
    bias = module["bias"] if "bias" in module else None
    return Projection(
        path=path,
        weight=_matrix(module, path),
        bias=None if bias is None else _dense(bias, path + ".bias").astype(np.float32),
    )


def _f32(a: mx.array, what: str) -> np.ndarray:
    return _dense(a, what).astype(np.float32)


def _norm(module: nn.Module, what: str, offset: float = 0.0) -> np.ndarray:
    """An RMSNorm's scale as its forward pass applies it: ``weight``, or ``offset + weight``
    (Gemma's ``1 + weight``) computed by MLX in the weight's own dtype, as the model does."""
    weight = module.weight if not offset else offset + module.weight
    return _f32(weight, what)


def _rope_tables(
    rope: nn.Module, head_dim: int, max_context: int
) -> tuple[np.ndarray, np.ndarray, bool]:
    """cos/sin tables read off the model's own RoPE module, so any scaling variant is matched, and
    whether it rotates interleaved pairs (``traditional``: dims 2i and 2i+1) rather than halves.

    Feeding ones in the first dim of every pair and zeros in the second returns ``[cos, sin]`` per
    pair and position. A probe with random data then checks the module really is that rotation.
    The tables are laid out so that ``x*cos + swap(x)*sin == RoPE(x)``, ``swap`` exchanging the
    two dims of each pair (the halves, or neighbours when interleaved); ``sin`` carries the sign.
    """
    half = head_dim // 2
    interleaved = bool(getattr(rope, "traditional", False))
    unit = np.zeros(head_dim, np.float32)
    first = np.arange(0, head_dim, 2) if interleaved else np.arange(half)
    second = first + 1 if interleaved else first + half
    unit[first] = 1.0
    out = rope(mx.broadcast_to(mx.array(unit), (1, 1, max_context, head_dim)), offset=0)
    out = np.array(out.astype(mx.float32))[0, 0]
    cos, sin = np.empty_like(out), np.empty_like(out)
    cos[:, first] = cos[:, second] = out[:, first]
    sin[:, first], sin[:, second] = -out[:, second], out[:, second]
    probe = mx.random.normal((1, 1, max_context, head_dim), key=mx.random.key(0))
    want = np.array(rope(probe, offset=0))[0, 0]
    x = np.array(probe)[0, 0]
    swapped = np.empty_like(x)
    swapped[:, first], swapped[:, second] = x[:, second], x[:, first]
    if not np.allclose(x * cos + swapped * sin, want, atol=1e-3, rtol=1e-3):
        raise UserError(f"RoPE variant {type(rope).__name__} is not a rotation of dimension pairs")
    return cos.astype(np.float32), sin.astype(np.float32), interleaved


def _block_projection(
    block: nn.Module,
    prefix: str,
    rel: str,
    family,
    fused_rows: dict[str, list[int]],
    read: dict[str, Projection],
) -> Projection | None:
    """The projection ``rel`` (Llama name: ``self_attn.q_proj`` ...) of the block at module path
    ``prefix``: its own layer (under the family's name for it), or its rows of the family's fused
    layer (a LUT group never spans two slices: palettize refuses that); None if the block has
    neither. A fused layer is read once per block into ``read``, then sliced."""
    own = family.aliases.get(rel, rel)
    owner, name = own.split(".")
    module = getattr(getattr(block, owner), name, None)
    if module is not None:
        return _projection(module, f"{prefix}.{own}")
    for fused, parts in family.fused_parts.items():
        if rel not in parts:
            continue
        f_owner, f_name = fused.split(".")
        module = getattr(getattr(block, f_owner), f_name, None)
        if module is None:
            break
        k = parts.index(rel)
        start = sum(fused_rows[fused][:k])
        stop = start + fused_rows[fused][k]
        path = f"{prefix}.{fused}"
        if path not in read:
            read[path] = _projection(module, path)
        whole = read[path]
        weight = whole.weight
        try:
            part = (
                weight.row_slice(start, stop)
                if isinstance(weight, LutMatrix)
                else weight[start:stop]
            )
        except ValueError as e:
            raise UserError(f"{path}: {e}") from e
        bias = None if whole.bias is None else whole.bias[start:stop]
        return Projection(f"{prefix}.{rel}", part, bias, whole.path, (start, stop))
    return None


def _rotates(rope: nn.Module, head_dim: int) -> bool:
    """Whether a layer's RoPE module changes its input at all (SmolLM3's NoPE layers do not)."""
    probe = mx.random.normal((1, 1, 4, head_dim), key=mx.random.key(1))
    return not np.array_equal(np.array(rope(probe, offset=3)), np.array(probe))


def _same_rope(a: tuple, b: tuple) -> bool:
    """Whether two ``_rope_tables`` results are one rotation (tables and pair layout)."""
    return a[2] == b[2] and np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def _kv_quant(attn: nn.Module) -> tuple[float, float] | None:
    """afm7's 8-bit fake quantization of keys and values: their scales, if the layer has them."""
    if "quant_key_scale" not in attn:
        return None
    key, value = (
        float(x.astype(mx.float32).item()) for x in (attn.quant_key_scale, attn.quant_value_scale)
    )
    if not (key > 0 and value > 0 and np.isfinite(key) and np.isfinite(value)):
        raise UserError(
            f"quant_key_scale {key} / quant_value_scale {value}: the 8-bit key/value scales must "
            "be positive and finite"
        )
    return key, value


def extract_weights(
    model: nn.Module,
    config: dict[str, Any],
    max_context: int,
    head_chunk: int = DEFAULT_HEAD_CHUNK,
    release: Callable[[int], None] | None = None,
) -> ModelWeights:
    """Read an mlx-lm model of a family the converters handle into ``ModelWeights`` (RoPE up to
    ``max_context``, the LM head in chunks of at most ``head_chunk`` vocabulary rows).
    ``release(j)``, when given, is called once block ``model.layers.j`` is read (a lazily loaded
    model's ``afm_mlx.models.streaming.block_releaser``): the model then holds one block's weights beside
    the plan, not all of them.

    A block without key and value projections (afm7's KV-reuse blocks) attends to the cache of
    the last block before it that has them, as mlx-lm's afm7 does."""
    inner = model.model
    family = family_for(config, "config.json")
    fused_rows = family.fused(config)
    blocks = [
        (f"model.{name}.{j}", block)
        for name in family.block_lists
        for j, block in enumerate(getattr(inner, name))
    ]
    attn0 = blocks[0][1].self_attn
    heads, kv_heads = int(attn0.n_heads), int(attn0.n_kv_heads)
    norm = functools.partial(_norm, offset=family.norm_offset)
    layers = []
    last_cache = None
    for i, (prefix, block) in enumerate(blocks):
        attn = block.self_attn
        fused_read: dict[str, Projection] = {}
        proj = {}
        for rel in PROJECTIONS:
            found = _block_projection(block, prefix, rel, family, fused_rows, fused_read)
            if found is not None:
                proj[rel] = found
        # No key and value projections: a KV-reuse block, reading the last cache before it.
        kv = ("self_attn.k_proj", "self_attn.v_proj")
        reuse = last_cache is not None and not any(rel in proj for rel in kv)
        kv_from = last_cache if reuse else None
        missing = [rel for rel in PROJECTIONS if rel not in proj and not (reuse and rel in kv)]
        if missing:
            raise UserError(
                f"{prefix}: no {family.aliases.get(missing[0], missing[0])}; "
                "architecture not supported"
            )
        if not reuse:
            last_cache = i
        head_dim = proj["self_attn.q_proj"].shape[0] // heads
        sandwich = "pre_feedforward_layernorm" in block  # Gemma: four norms per block
        k_norm = getattr(attn, "k_norm", None) if kv_from is None else None
        q_norm = getattr(attn, "q_norm", None)
        layers.append(
            Layer(
                input_norm=norm(block.input_layernorm, f"{prefix}.input_layernorm"),
                post_norm=norm(
                    block.pre_feedforward_layernorm if sandwich else block.post_attention_layernorm,
                    f"{prefix} pre-MLP norm",
                ),
                q_norm=None if q_norm is None else norm(q_norm, f"{prefix}.self_attn.q_norm"),
                k_norm=None if k_norm is None else norm(k_norm, f"{prefix}.self_attn.k_norm"),
                qk_eps=None if q_norm is None else float(q_norm.eps),
                qk_norm_after_rope=family.qk_norm_after_rope,
                proj=proj,
                rope=_rotates(attn.rope, head_dim),
                window=int(config["sliding_window"])
                if getattr(attn, "is_sliding", False)
                else None,
                attn_out_norm=(
                    norm(block.post_attention_layernorm, f"{prefix}.post_attention_layernorm")
                    if sandwich
                    else None
                ),
                mlp_out_norm=(
                    norm(block.post_feedforward_layernorm, f"{prefix}.post_feedforward_layernorm")
                    if sandwich
                    else None
                ),
                kv_quant=_kv_quant(attn) if kv_from is None else None,
                kv_from=kv_from,
            )
        )
        if release is not None and prefix == f"model.layers.{i}":
            release(i)
    # One cos/sin table per distinct rotation (Gemma: its local and its global RoPE).
    tables: list[tuple[np.ndarray, np.ndarray, bool]] = []  # (cos, sin, interleaved)
    for (_, block), layer in zip(blocks, layers):
        if not layer.rope:
            continue
        table = _rope_tables(block.self_attn.rope, head_dim, max_context)
        layer.rope_interleaved = table[2]
        same = [t for t, have in enumerate(tables) if _same_rope(have, table)]
        layer.rope_table = same[0] if same else len(tables)
        if not same:
            tables.append(table)
    cos_tables = [cos for cos, _, _ in tables]
    sin_tables = [sin for _, sin, _ in tables]
    if not cos_tables:  # no layer rotates: one identity table keeps the emitters uniform
        cos_tables = [np.ones((max_context, head_dim), np.float32)]
        sin_tables = [np.zeros((max_context, head_dim), np.float32)]
    # Tied: no head of its own (or one its family marks tied: Gemma drops a missing head).
    tied = "lm_head" not in model or getattr(model, "tie_word_embeddings", False) is True
    embed_name = family.aliases.get("embed_tokens", "embed_tokens")
    embedding = _matrix(getattr(inner, embed_name), f"model.{embed_name}")
    norm_name = family.aliases.get("norm", "norm")
    final_norm = getattr(inner, norm_name)
    weights = ModelWeights(
        hidden=embedding.shape[1],
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=embedding.shape[0],
        eps=float(final_norm.eps),
        attn_scale=float(attn0.scale),
        embedding=embedding,
        lm_head=None if tied else _matrix(model.lm_head, "lm_head"),
        final_norm=norm(final_norm, f"model.{norm_name}"),
        layers=layers,
        rope_cos=cos_tables,
        rope_sin=sin_tables,
        head_chunk=head_chunk,
        embed_scale=family.embed_scale(config) if family.embed_scale else None,
        mlp_activation=family.mlp_activation,
    )
    try:
        weights.head_chunks()
        weights.embedding_chunks()
    except ValueError as e:
        raise UserError(f"--head-chunk {head_chunk}: {e}; pick a multiple of the group size") from e
    return weights


ADAPTER_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def parse_adapter_spec(spec: str) -> tuple[str, Path]:
    """``NAME=DIR`` -> (name, folder); the name becomes part of the function names."""
    name, sep, folder = spec.partition("=")
    if not sep or not folder:
        raise UserError(f"--adapter {spec!r}: expected NAME=DIR")
    if not ADAPTER_NAME.fullmatch(name):
        raise UserError(
            f"--adapter {spec!r}: name {name!r} must start with a letter and use only "
            "letters, digits and _ (it names the functions decode_NAME and prefill_NAME)"
        )
    return name, Path(folder)


def read_lora(name: str, folder: Path, weights: ModelWeights, fingerprint: str) -> LoraWeights:
    """Read an adapter (mlx-lm layout, via ``afm_mlx.adapters.lora.read_adapter``), refusing it unless its
    ``base_fingerprint`` is this model's: a missing one is refused too, since the package ships."""
    from afm_mlx.adapters.lora import read_adapter

    flag = f"--adapter {name}={folder}"
    adapter = read_adapter(folder)
    theirs = adapter.base_fingerprint
    if theirs is None:
        raise UserError(
            f"{flag}: adapter_config.json has no base_fingerprint, so its base is unknown "
            f"(this model's is {fingerprint}); record the base's fingerprint when saving it"
        )
    if theirs != fingerprint:
        raise UserError(
            f"{flag}: trained on base {theirs}, but the model's fingerprint is {fingerprint}; "
            "convert it with the base it was trained on"
        )
    # The projections each adapter path acts on: itself, or the slices of a fused layer (the
    # slice takes A as is and its own columns of B).
    targets: dict[str, list[Projection]] = {}
    for proj in weights.projections().values():
        targets.setdefault(proj.fused_path or proj.path, []).append(proj)
    lora = LoraWeights(name=name, folder=folder)
    problems = []
    for path in sorted({k.rsplit(".", 1)[0] for k in adapter.weights}):
        a, b = adapter.weights.get(path + ".lora_a"), adapter.weights.get(path + ".lora_b")
        projs = targets.get(path)
        if projs is None or a is None or b is None:
            problems.append(f"{path}: not a LoRA pair on a projection of this model")
            continue
        out_dim = max(p.rows[1] if p.rows else p.shape[0] for p in projs)
        in_dim = projs[0].shape[1]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != in_dim or b.shape[1] != out_dim:
            problems.append(
                f"{path}: lora_a {a.shape} / lora_b {b.shape} vs weight {(out_dim, in_dim)}"
            )
            continue
        # Matrices that act on channels-first activations: A (rank, in), B (out, rank); mlx-lm's
        # scale is folded into B. The slices of a fused layer share one A array, which the
        # emitters then store once.
        scaled_b = b.astype(mx.float32) * adapter.settings.scale
        a_in = _f32(a.astype(mx.float32).T, f"{flag} {path}.lora_a")
        for proj in projs:
            start, stop = proj.rows or (0, out_dim)
            lora.pairs[proj.path] = (a_in, _f32(scaled_b[:, start:stop].T, f"{flag} {path}.lora_b"))
    if problems or not lora.pairs:
        shown = "; ".join(problems[:4]) or "no lora_a/lora_b weights"
        raise UserError(f"{flag}: does not fit the model: {shown}")
    return lora
