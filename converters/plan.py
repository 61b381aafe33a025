"""MLX model -> the lowering plan shared by both Apple emitters (Core ML and Core AI).

The plan is plain NumPy: every weight exactly as the model stores it (float arrays in the model's
precision, or for palettized layers the packed indices and fp16 LUTs, untouched), RoPE tables read
off the model's own RoPE module, the layer list, the LM head split into vocabulary chunks, adapter
pairs, and the checks of what is convertible. It keeps the emitters free of MLX and makes the
bit-exactness claim easy to state: whatever is in a ``LutMatrix`` is what lands in the package or
asset, with no arithmetic in between.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from afm_mlx.errors import UserError
from afm_mlx.families import family_for
from afm_mlx.lora import DEFAULT_KEYS
from afm_mlx.model import validate_config
from afm_mlx.packing import pack_indices, packed_length, unpack_indices

PROJECTIONS = DEFAULT_KEYS  # every attention and FFN projection, as the adapters target
FP16_MAX = float(np.finfo(np.float16).max)
# Largest LM-head chunk: ANE tensors are limited to 16384 along a dimension.
DEFAULT_HEAD_CHUNK = 16384


@dataclass
class LutMatrix:
    """A palettized (rows, cols) matrix: each group of rows (or columns) shares one LUT.

    The indices come as the model stores them, bit-packed per row (``afm_mlx.packing``: half a
    byte per weight at 4 bits). ``bit_stream`` is those rows themselves whenever a row fills whole
    bytes (every real layer), so Core AI never unpacks them; ``unpack`` unpacks them for an
    emitter that takes one byte per weight (coremltools), and the matrix then keeps only that
    copy, so the plan never holds both."""

    packed: np.ndarray | None  # (rows, packed_length(cols, bits)) uint8; None once unpacked
    cols: int
    lut: np.ndarray  # (n_groups, 2**bits) float16
    bits: int
    axis: int = 0  # 0: groups of rows (output channels); 1: groups of columns (inputs)
    _indices: np.ndarray | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        rows = self.packed if self.packed is not None else self._indices
        return (rows.shape[0], self.cols)

    @property
    def group_size(self) -> int:
        return self.shape[self.axis] // self.lut.shape[0]

    def unpack(self) -> np.ndarray:
        """The indices, (rows, cols) uint8, each < 2**bits; from now on the matrix holds these,
        not ``packed`` (8-bit rows are the indices already: the same array)."""
        if self._indices is None:
            if self.bits == 8:
                self._indices = self.packed
            else:
                unpacked = unpack_indices(mx.array(self.packed), self.bits, self.cols)
                self._indices = np.array(unpacked)
            self.packed = None
        return self._indices

    def _rows(self, start: int, stop: int) -> dict[str, Any]:
        if self.packed is not None:
            return {"packed": self.packed[start:stop]}
        return {"packed": None, "_indices": self._indices[start:stop]}

    def row_slice(self, start: int, stop: int) -> LutMatrix:
        """Rows [start, stop) with their own LUTs (views, no copy); for LM-head chunks."""
        if self.axis == 1:
            return LutMatrix(
                cols=self.cols, lut=self.lut, bits=self.bits, axis=1, **self._rows(start, stop)
            )
        g = self.group_size
        if start % g or (stop % g and stop != self.shape[0]):
            raise ValueError(f"rows {start}:{stop} split a LUT group of {g} rows")
        lut = self.lut[start // g : -(-stop // g)]
        return LutMatrix(cols=self.cols, lut=lut, bits=self.bits, **self._rows(start, stop))

    def bit_stream(self) -> np.ndarray:
        """The indices as one little-endian bit stream over the flattened tensor (element i is
        bits [i*bits, (i+1)*bits)): the sub-byte layout of Core ML blobs and Core AI constants.
        Packed rows that fill whole bytes are that stream already (a view, no copy)."""
        if self.packed is not None and self.cols * self.bits % 8 == 0:
            return self.packed.reshape(-1)
        flat = mx.array(self.unpack().reshape(1, -1))
        return np.array(pack_indices(flat, self.bits)).reshape(-1)


Matrix = np.ndarray | LutMatrix


@dataclass
class Projection:
    """One linear layer, (out, in) weight plus optional bias; ``path`` is its mlx module path."""

    path: str
    weight: Matrix
    bias: np.ndarray | None = None
    # A slice of a fused projection (Phi-3's qkv_proj): the fused layer's path, which adapters
    # name, and the rows [start, stop) of it that this projection is.
    fused_path: str | None = None
    rows: tuple[int, int] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)  # type: ignore[return-value]


@dataclass
class Layer:
    input_norm: np.ndarray
    post_norm: np.ndarray  # the norm before the MLP
    q_norm: np.ndarray | None
    k_norm: np.ndarray | None
    proj: dict[str, Projection]  # keyed by PROJECTIONS
    rope: bool = True  # False: a layer without positional rotation (SmolLM3's NoPE layers)
    rope_table: int = 0  # which of ``ModelWeights.rope_cos/sin`` (Gemma: local or global)
    rope_interleaved: bool = False  # RoPE pairs (2i, 2i+1) (traditional, afm7) not halves
    qk_eps: float | None = None  # the q/k norms' own epsilon (afm7's are nn.RMSNorm defaults)
    qk_norm_after_rope: bool = False  # afm7: q_norm(rope(q)), not rope(q_norm(q))
    # afm7: keys and values rounded to 8 bits before the cache, x -> clip(round(x / s)) * s,
    # with (key scale, value scale).
    kv_quant: tuple[float, float] | None = None
    # A KV-reuse layer (afm7): no key/value projections, it attends to layer ``kv_from``'s cache.
    kv_from: int | None = None
    window: int | None = None  # attends to the last ``window`` positions only (Gemma's local)
    attn_out_norm: np.ndarray | None = None  # Gemma's sandwich norms: on the attention output
    mlp_out_norm: np.ndarray | None = None  # ... and on the MLP output, before each residual


@dataclass
class HeadChunk:
    """Vocabulary rows [start, stop) of the LM head (and of the tied embedding)."""

    start: int
    stop: int
    weight: Matrix

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass
class ModelWeights:
    """Everything an emitter needs, as NumPy arrays."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    attn_scale: float
    embedding: Matrix  # (vocab, hidden)
    lm_head: Matrix | None  # None: tied to the embedding
    final_norm: np.ndarray
    layers: list[Layer]
    # Per distinct RoPE: (max_context, head_dim) float32, half-rotation layout; sin has the sign
    # folded in: x*cos + swap_halves(x)*sin == RoPE(x).
    rope_cos: list[np.ndarray]
    rope_sin: list[np.ndarray]
    head_chunk: int = DEFAULT_HEAD_CHUNK
    embed_scale: float | None = None  # Gemma multiplies the embedded tokens by this
    mlp_activation: str = "silu"  # or "gelu_tanh" (Gemma)
    _chunks: dict[str, list[HeadChunk]] = field(default_factory=dict, repr=False)

    def projections(self) -> dict[str, Projection]:
        return {p.path: p for layer in self.layers for p in layer.proj.values()}

    def cache_layers(self) -> list[int]:
        """The layers that write a KV cache of their own (not afm7's KV-reuse layers)."""
        return [i for i, layer in enumerate(self.layers) if layer.kv_from is None]

    def _chunked(self, key: str, matrix: Matrix) -> list[HeadChunk]:
        """Row chunks of ``matrix``, made once, so every function reuses the same slices (the
        emitters then store each chunk once, and no op ever holds the whole table)."""
        if key not in self._chunks:
            out = []
            for start in range(0, self.vocab, self.head_chunk):
                stop = min(start + self.head_chunk, self.vocab)
                part = (
                    matrix.row_slice(start, stop)
                    if isinstance(matrix, LutMatrix)
                    else matrix[start:stop]
                )
                out.append(HeadChunk(start, stop, part))
            self._chunks[key] = out
        return self._chunks[key]

    def head_chunks(self) -> list[HeadChunk]:
        """The LM head per vocabulary chunk (``logits_0``, ``logits_1``, ...)."""
        if self.lm_head is None:
            return self._chunked("embedding", self.embedding)
        return self._chunked("lm_head", self.lm_head)

    def embedding_chunks(self) -> list[HeadChunk]:
        """The embedding table in the same chunks (shared with the head when tied)."""
        return self._chunked("embedding", self.embedding)

    def logit_chunks(self) -> list[int]:
        return [c.rows for c in self.head_chunks()]


@dataclass
class LoraWeights:
    """One adapter, unfused: per projection path, A (rank, in) and B (out, rank) with scale folded,
    float32 (each emitter stores them in its weight dtype)."""

    name: str
    folder: Path
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def check_convertible(config: dict[str, Any], source: str) -> None:
    """Refuse architectures the converters do not handle, before any weights are read: decoders
    with q/k/v/o projections (or fused slices of them) and a gated MLP, the layout lowered here,
    with what a family adds to it read off its modules or its ``families`` entry (Gemma's norms,
    windows and GELU, afm7's KV-reuse blocks); a family afm_mlx does not know is refused by
    ``family_for`` in one line."""
    validate_config(config, source)
    family_for(config, source)
    if config.get("hidden_act", "silu") != "silu":
        raise UserError(f"{source}: hidden_act {config['hidden_act']!r} is not supported (silu)")


def as_fp16(x: np.ndarray, what: str) -> np.ndarray:
    """fp16 copy for an emitter that stores fp16; values beyond its range are a user error, not
    silent infs."""
    if x.dtype == np.float16:
        return x
    if not np.all(np.isfinite(x)) or np.abs(x).max(initial=0.0) > FP16_MAX:
        raise UserError(f"{what}: values are not finite in float16 (|w| > {FP16_MAX:g})")
    return x.astype(np.float16)


def _dense(a: mx.array, what: str) -> np.ndarray:
    """NumPy copy of an MLX weight in its own precision (bfloat16, which NumPy lacks, exactly as
    float32)."""
    x = np.array(a if a.dtype in (mx.float16, mx.float32) else a.astype(mx.float32))
    if not np.all(np.isfinite(x)):
        raise UserError(f"{what}: weights are not finite")
    return x


def _palettized_matrix(layer: nn.Module, what: str) -> LutMatrix:
    """The stored (packed) indices and LUTs of an ``afm_mlx.palettized`` layer, values untouched."""
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
    model's ``afm_mlx.model.block_releaser``): the model then holds one block's weights beside
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
    """Read an adapter (mlx-lm layout, via ``afm_mlx.lora.read_adapter``), refusing it unless its
    ``base_fingerprint`` is this model's: a missing one is refused too, since the package ships."""
    from afm_mlx.lora import read_adapter

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
