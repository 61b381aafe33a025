"""MLX model -> the lowering plan shared by both Apple emitters (Core ML and Core AI).

The plan is plain NumPy: every weight exactly as the model stores it (float arrays in the model's
precision, or for palettized layers the packed indices and fp16 LUTs, untouched), RoPE tables read
off the model's own RoPE module, the layer list, the LM head split into vocabulary chunks, adapter
pairs, and the checks of what is convertible. It keeps the emitters free of MLX and makes the
bit-exactness claim easy to state: whatever is in a ``LutMatrix`` is what lands in the package or
asset, with no arithmetic in between.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from afm_mlx.adapters.lora import DEFAULT_KEYS
from afm_mlx.core.errors import UserError
from afm_mlx.core.families import family_for
from afm_mlx.models.presets import validate_config
from afm_mlx.palettization.packing import pack_indices, unpack_indices

PROJECTIONS = DEFAULT_KEYS  # every attention and FFN projection, as the adapters target
FP16_MAX = float(np.finfo(np.float16).max)
# Largest LM-head chunk: ANE tensors are limited to 16384 along a dimension.
DEFAULT_HEAD_CHUNK = 16384


@dataclass
class LutMatrix:
    """A palettized (rows, cols) matrix: each group of rows (or columns) shares one LUT.

    The indices come as the model stores them, bit-packed per row (``afm_mlx.palettization.packing``: half a
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
