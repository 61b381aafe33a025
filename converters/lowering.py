"""The model as a graph, written once for every Apple target: the emitters only supply the ops.

``lower`` turns a ``ModelWeights`` plan into one function's graph (prefill of ``seq`` tokens or
decode of one) through the small op vocabulary of ``Emitter``; ``converters.coreml_program`` maps it
to Core ML MIL, ``converters.coreai_program`` to the Core AI dialect. Nothing about the model
(norms, RoPE, GQA attention over the cache state, SwiGLU, chunked embedding and LM head, LoRA
paths) is written anywhere else.

Activations are channels-first, logically ``(C, S)`` (the emitter picks the physical layout, e.g.
Core ML's ``(1, C, 1, S)`` for 1x1 convolutions on the Neural Engine), so a projection is ``W @ x``
with the weight as stored, ``(out, in)``, and never transposed.

Inputs: ``input_ids`` (1, S) int32 and ``position`` (1,) int32, the cache row of the first token.
State: per layer ``k_cache_i`` and ``v_cache_i`` of shape (kv_heads, context, head_dim), written at
rows [position, position + S) and read whole (a KV-reuse layer, afm7's, has none: it reads the
cache an earlier layer has just written); scores of rows after the current token are replaced
with a select (not an added mask), so no stale key reaches the softmax whatever it holds. Stale
value rows meet probability 0, which keeps any finite value out: the caller starts the state
zero-filled (a NaN there would survive 0 * NaN).
Outputs: ``logits_0``, ``logits_1``... (1, S, chunk): the LM head per vocabulary chunk.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from converters.weights import Layer, LoraWeights, Matrix, ModelWeights, Projection

# Attention scores of future (masked) positions: finite so that softmax stays finite in fp16, and
# large enough that exp() underflows to 0.
MASK_VALUE = -30000.0

Value = Any  # an emitter's own value type (MIL Var, coreai Value)


def state_names(mw: ModelWeights) -> list[str]:
    """The cache state of every layer that writes one, named by the layer's index."""
    return [f"{t}_cache_{i}" for i in mw.cache_layers() for t in ("k", "v")]


class Emitter(ABC):
    """The ops the lowering needs. Operands may be NumPy constants (floats become the emitter's
    compute dtype, integers int32); every ``name`` is a readable op name for the emitted graph."""

    channel_axis: int  # where C sits in an activation

    @abstractmethod
    def act_shape(self, channels: int, seq: int) -> list[int]:
        """The physical shape of a (channels, seq) activation."""

    @abstractmethod
    def shape(self, x: Value) -> list[int]:
        """The static shape of a value."""

    # --- weights and state --------------------------------------------------------------------
    @abstractmethod
    def project(self, x: Value, weight: Matrix, bias: np.ndarray | None, name: str) -> Value:
        """``weight @ x (+ bias)`` on an activation; ``weight`` is (out, in) as stored."""

    @abstractmethod
    def gather_rows(self, weight: Matrix, ids: Value, name: str) -> Value:
        """Rows ``ids`` (S,) of a weight matrix, (S, cols), without decompressing the others;
        ``name`` names the weight itself."""

    @abstractmethod
    def update_cache(self, state: str, rows: Value, begin: Value, end: Value, name: str) -> Value:
        """Write ``rows`` into state ``state`` at [begin, end) and return the whole new cache."""

    # --- tensor ops ---------------------------------------------------------------------------
    @abstractmethod
    def add(self, x: Value, y: Value | np.ndarray, name: str) -> Value: ...

    @abstractmethod
    def mul(self, x: Value, y: Value | np.ndarray, name: str) -> Value: ...

    @abstractmethod
    def rsqrt(self, x: Value, eps: float, name: str) -> Value:
        """1 / sqrt(x + eps)."""

    @abstractmethod
    def reduce_sum(self, x: Value, axis: int, name: str) -> Value:
        """Sum over ``axis``, keeping it (size 1)."""

    @abstractmethod
    def softmax(self, x: Value, axis: int, name: str) -> Value: ...

    @abstractmethod
    def silu(self, x: Value, name: str) -> Value: ...

    @abstractmethod
    def tanh(self, x: Value, name: str) -> Value: ...

    @abstractmethod
    def matmul(self, x: Value, y: Value, name: str, transpose_y: bool = False) -> Value:
        """Batched ``x @ y`` (or ``x @ y^T``) over equal leading dimensions."""

    @abstractmethod
    def reshape(self, x: Value, shape: list[int], name: str) -> Value: ...

    @abstractmethod
    def transpose(self, x: Value, perm: list[int], name: str) -> Value: ...

    @abstractmethod
    def slice(self, x: Value, begin: list[int], end: list[int], name: str) -> Value:
        """Static slice [begin, end) with stride 1."""

    @abstractmethod
    def concat(self, values: list[Value | np.ndarray], axis: int, name: str) -> Value: ...

    @abstractmethod
    def gather(self, table: np.ndarray, ids: Value, name: str) -> Value:
        """Rows ``ids`` of a constant float table."""

    @abstractmethod
    def greater(self, x: Value | np.ndarray, y: Value, name: str) -> Value:
        """Elementwise x > y (broadcasting), bool."""

    @abstractmethod
    def equal(self, x: Value, y: Value, name: str) -> Value: ...

    @abstractmethod
    def clip(self, x: Value, low: int, high: int, name: str) -> Value:
        """Integers clamped to [low, high]."""

    @abstractmethod
    def clamp(self, x: Value, low: float, high: float, name: str) -> Value:
        """Floats clamped to [low, high]."""

    @abstractmethod
    def round(self, x: Value, name: str) -> Value:
        """Floats rounded to the nearest integer (ties to even, as MLX and NumPy)."""

    @abstractmethod
    def where(self, cond: Value, value: float, x: Value, name: str) -> Value:
        """``value`` where ``cond`` else ``x`` (broadcasting)."""

    @abstractmethod
    def to_float(self, x: Value, name: str) -> Value:
        """bool -> the compute dtype (0/1)."""


def _rms_norm(em: Emitter, x: Value, weight: np.ndarray, eps: float, axis: int, name: str):
    """RMSNorm over ``axis``; ``weight`` broadcasts along it.

    Squares are taken of x / sqrt(n), so their sum (the mean square) stays in fp16 range for
    activations up to ~256*sqrt(n), instead of overflowing at |x| > 256.
    """
    shape = em.shape(x)
    n = shape[axis]
    scaled = em.mul(x, np.float32(1.0 / math.sqrt(n)), name + "_scaled")
    mean_sq = em.reduce_sum(em.mul(scaled, scaled, name + "_sq"), axis, name + "_meansq")
    inv = em.rsqrt(mean_sq, eps, name + "_inv")
    bshape = [1] * len(shape)
    bshape[axis] = n
    normed = em.mul(x, inv, name + "_normed")
    return em.mul(normed, weight.reshape(bshape).astype(np.float32), name)


def _project(
    em: Emitter, x: Value, proj: Projection, lora: LoraWeights | None, name: str, ctx: dict
) -> Value:
    """The base projection plus the unfused low-rank adapter path B(A x), if any. The slices of a
    fused layer (Phi-3, afm7) share their A, so A x is computed once for all of them."""
    y = em.project(x, proj.weight, proj.bias, name)
    if lora is not None and proj.path in lora.pairs:
        a, b = lora.pairs[proj.path]
        key = (id(a), id(x))
        if key not in ctx["lora_down"]:
            ctx["lora_down"][key] = em.project(x, a, None, name + "_lora_a")
        up = em.project(ctx["lora_down"][key], b, None, name + "_lora_b")
        y = em.add(y, up, name + "_lora")
    return y


def _rope(em: Emitter, x: Value, ctx: dict, layer: Layer, name: str) -> Value:
    """x * cos + swap(x) * sin on (heads, head_dim, S) with the layer's RoPE table; ``swap``
    exchanges the two dims of each rotated pair (the two halves, or neighbours 2i and 2i+1 for
    an interleaved RoPE); ``sin`` carries the sign."""
    heads, dim, seq = em.shape(x)
    if layer.rope_interleaved:
        pairs = em.reshape(x, [heads, dim // 2, 2, seq], name + "_pairs")
        even = em.slice(pairs, [0, 0, 0, 0], [heads, dim // 2, 1, seq], name + "_even")
        odd = em.slice(pairs, [0, 0, 1, 0], [heads, dim // 2, 2, seq], name + "_odd")
        swapped = em.concat([odd, even], 2, name + "_swap_pairs")
        swapped = em.reshape(swapped, [heads, dim, seq], name + "_swap")
    else:
        half = dim // 2
        first = em.slice(x, [0, 0, 0], [heads, half, seq], name + "_lo")
        second = em.slice(x, [0, half, 0], [heads, dim, seq], name + "_hi")
        swapped = em.concat([second, first], 1, name + "_swap")
    return em.add(
        em.mul(x, ctx["cos"][layer.rope_table], name + "_cos"),
        em.mul(swapped, ctx["sin"][layer.rope_table], name + "_sin"),
        name,
    )


def _norm_and_rope(em, x: Value, norm: np.ndarray | None, layer: Layer, mw, ctx, p: str) -> Value:
    """A query or key tensor's per-head norm and rotation, in the layer's order."""
    eps = mw.eps if layer.qk_eps is None else layer.qk_eps

    def normed(v):
        return v if norm is None else _rms_norm(em, v, norm, eps, 1, p + "_norm")

    def rotated(v):
        return _rope(em, v, ctx, layer, p + "_rope") if layer.rope else v

    return normed(rotated(x)) if layer.qk_norm_after_rope else rotated(normed(x))


def _fake_quant(em: Emitter, x: Value, scale: float, name: str) -> Value:
    """afm7's 8-bit fake quantization: clip(round(x / scale), -128, 127) * scale."""
    q = em.round(em.mul(x, np.float32(1.0 / scale), name + "_div"), name + "_round")
    return em.mul(em.clamp(q, -128.0, 127.0, name + "_clip"), np.float32(scale), name)


def _attention(em, h, i: int, mw: ModelWeights, lora, seq: int, ctx: dict) -> Value:
    layer = mw.layers[i]
    hd, heads, kv = mw.head_dim, mw.heads, mw.kv_heads
    group = heads // kv
    p = f"l{i}_"
    q = _project(em, h, layer.proj["self_attn.q_proj"], lora, p + "q_proj", ctx)
    # (H*hd, S) -> (H, hd, S): channel h*hd + d is head h, dim d, as in mlx-lm's reshape.
    q = em.reshape(q, [heads, hd, seq], p + "q_heads")
    q = _norm_and_rope(em, q, layer.q_norm, layer, mw, ctx, p + "q")
    q = em.mul(q, np.float32(mw.attn_scale), p + "q_scaled")
    if layer.kv_from is not None:  # a KV-reuse layer: the cache an earlier layer just wrote
        k_all, v_all = ctx["caches"][layer.kv_from]
    else:
        k = _project(em, h, layer.proj["self_attn.k_proj"], lora, p + "k_proj", ctx)
        v = _project(em, h, layer.proj["self_attn.v_proj"], lora, p + "v_proj", ctx)
        k = em.reshape(k, [kv, hd, seq], p + "k_heads")
        v = em.reshape(v, [kv, hd, seq], p + "v_heads")
        k = _norm_and_rope(em, k, layer.k_norm, layer, mw, ctx, p + "k")
        if layer.kv_quant is not None:
            k = _fake_quant(em, k, layer.kv_quant[0], p + "k_quant")
            v = _fake_quant(em, v, layer.kv_quant[1], p + "v_quant")
        # Write this chunk's keys/values into the cache rows [position, position + S), then
        # attend over the whole cache; rows after the current token are masked.
        k_rows = em.transpose(k, [0, 2, 1], p + "k_rows")
        v_rows = em.transpose(v, [0, 2, 1], p + "v_rows")
        k_all = em.update_cache(f"k_cache_{i}", k_rows, ctx["begin"], ctx["end"], p + "k_cache")
        v_all = em.update_cache(f"v_cache_{i}", v_rows, ctx["begin"], ctx["end"], p + "v_cache")
        ctx["caches"][i] = (k_all, v_all)

    # GQA without repeating K/V: query heads of one KV head are stacked along the row axis.
    q_rows = em.transpose(q, [0, 2, 1], p + "q_rows")  # (H, S, hd)
    q_rows = em.reshape(q_rows, [kv, group * seq, hd], p + "q_groups")
    scores = em.matmul(q_rows, k_all, p + "scores", transpose_y=True)
    context = em.shape(k_all)[1]
    scores = em.reshape(scores, [kv, group, seq, context], p + "scores_4d")
    scores = em.where(ctx["future"], MASK_VALUE, scores, p + "scores_masked")
    if layer.window is not None:  # a sliding-window layer: positions too far back are masked
        scores = em.where(ctx["far"][layer.window], MASK_VALUE, scores, p + "scores_windowed")
    probs = em.softmax(scores, -1, p + "probs")
    probs = em.reshape(probs, [kv, group * seq, context], p + "probs_3d")
    out = em.matmul(probs, v_all, p + "attn")  # (kv, group*S, hd)
    out = em.reshape(out, [heads, seq, hd], p + "attn_heads")
    out = em.transpose(out, [0, 2, 1], p + "attn_t")
    out = em.reshape(out, em.act_shape(heads * hd, seq), p + "attn_cf")
    return _project(em, out, layer.proj["self_attn.o_proj"], lora, p + "o_proj", ctx)


def _mlp(em: Emitter, h: Value, i: int, mw: ModelWeights, lora, ctx: dict) -> Value:
    layer, p = mw.layers[i], f"l{i}_"
    gate = _project(em, h, layer.proj["mlp.gate_proj"], lora, p + "gate_proj", ctx)
    up = _project(em, h, layer.proj["mlp.up_proj"], lora, p + "up_proj", ctx)
    if mw.mlp_activation == "gelu_tanh":
        gate = _gelu_tanh(em, gate, p + "gelu")
    else:
        gate = em.silu(gate, p + "silu")
    act = em.mul(gate, up, p + "gated")
    return _project(em, act, layer.proj["mlp.down_proj"], lora, p + "down_proj", ctx)


def _gelu_tanh(em: Emitter, x: Value, name: str) -> Value:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): MLX's ``nn.gelu_approx``."""
    cube = em.mul(em.mul(x, x, name + "_sq"), x, name + "_cube")
    inner = em.add(x, em.mul(cube, np.float32(0.044715), name + "_c3"), name + "_inner")
    t = em.tanh(em.mul(inner, np.float32(math.sqrt(2 / math.pi)), name + "_arg"), name + "_tanh")
    half = em.mul(x, np.float32(0.5), name + "_half")
    return em.mul(half, em.add(t, np.float32(1.0), name + "_1p"), name)


def _embed(em: Emitter, mw: ModelWeights, ids: Value, seq: int) -> Value:
    """Token rows of the embedding, gathered per vocabulary chunk so that no op holds (or, for a
    palettized table, decompresses) the whole vocab x hidden table; ids outside a chunk read its
    clamped row and are zeroed."""
    chunks = mw.embedding_chunks()
    if len(chunks) == 1:
        rows = em.gather_rows(chunks[0].weight, ids, "embed_tokens")
    else:
        rows = None
        for j, c in enumerate(chunks):
            local = em.add(ids, np.int32(-c.start), f"embed_{j}_local")
            clamped = em.clip(local, 0, c.rows - 1, f"embed_{j}_clamped")
            inside = em.to_float(em.equal(local, clamped, f"embed_{j}_in"), f"embed_{j}_inf")
            part = em.gather_rows(c.weight, clamped, f"embed_tokens_{j}")
            part = em.mul(part, em.reshape(inside, [seq, 1], f"embed_{j}_in_col"), f"embed_{j}")
            rows = part if rows is None else em.add(rows, part, f"embed_sum_{j}")
    h = em.transpose(rows, [1, 0], "embed_t")
    h = em.reshape(h, em.act_shape(mw.hidden, seq), "embed_cf")
    if mw.embed_scale is not None:
        h = em.mul(h, np.float32(mw.embed_scale), "embed_scaled")
    return h


def _positions(em: Emitter, mw: ModelWeights, position: Value, seq: int, context: int) -> dict:
    """RoPE rows, the causal mask and cache-write bounds for this chunk.

    The int32 work here (a few ops on S or S x context elements) runs before the first projection,
    so it costs at most one hand-off to the accelerator.
    """
    qpos = em.add(position, np.arange(seq, dtype=np.int32), "query_positions")
    cs: dict[str, list] = {"cos": [], "sin": []}
    for name, tables in (("cos", mw.rope_cos), ("sin", mw.rope_sin)):
        for t, table in enumerate(tables):
            tag = name if t == 0 else f"{name}{t}"
            rows = em.gather(table[:context], qpos, tag)  # (S, hd)
            rows = em.transpose(rows, [1, 0], tag + "_t")
            cs[name].append(em.reshape(rows, [1, mw.head_dim, seq], tag + "_b"))  # (heads, hd, S)
    qcol = em.reshape(qpos, [seq, 1], "query_positions_col")
    keys = np.arange(context, dtype=np.int32).reshape(1, context)
    future = em.greater(keys, qcol, "future")  # (S, context): key after the query
    # Sliding windows: key k is too far back for query q when q - k >= window, i.e. when
    # -(k + window - 1) > -q.
    far = {}
    windows = sorted({layer.window for layer in mw.layers if layer.window is not None})
    if windows:
        neg_q = em.mul(qcol, np.int32(-1), "query_positions_neg")
        for w in windows:
            far[w] = em.greater(-(keys + np.int32(w - 1)), neg_q, f"far_{w}")
    zero = np.zeros((1,), np.int32)
    begin = em.concat([zero, position, zero], 0, "cache_begin")
    end = em.add(begin, np.array([mw.kv_heads, seq, mw.head_dim], np.int32), "cache_end")
    # "caches": each layer's whole cache once written, for the KV-reuse layers after it;
    # "lora_down": adapter down-projections (A x) already computed, shared by fused slices.
    return {
        **cs,
        "future": future,
        "far": far,
        "begin": begin,
        "end": end,
        "caches": {},
        "lora_down": {},
    }


def lower(
    em: Emitter,
    mw: ModelWeights,
    input_ids: Value,
    position: Value,
    seq: int,
    context: int,
    lora: LoraWeights | None = None,
) -> list[Value]:
    """One function's graph: ``seq`` tokens at ``position`` against a ``context``-row cache;
    returns the logits chunks in order (named ``logits_0``...)."""
    ctx = _positions(em, mw, position, seq, context)
    ids = em.reshape(input_ids, [seq], "ids")
    h = _embed(em, mw, ids, seq)
    axis = em.channel_axis
    for i, layer in enumerate(mw.layers):
        x = _rms_norm(em, h, layer.input_norm, mw.eps, axis, f"l{i}_input_norm")
        r = _attention(em, x, i, mw, lora, seq, ctx)
        if layer.attn_out_norm is not None:
            r = _rms_norm(em, r, layer.attn_out_norm, mw.eps, axis, f"l{i}_attn_out_norm")
        h = em.add(h, r, f"l{i}_attn_res")
        x = _rms_norm(em, h, layer.post_norm, mw.eps, axis, f"l{i}_post_norm")
        r = _mlp(em, x, i, mw, lora, ctx)
        if layer.mlp_out_norm is not None:
            r = _rms_norm(em, r, layer.mlp_out_norm, mw.eps, axis, f"l{i}_mlp_out_norm")
        h = em.add(h, r, f"l{i}_mlp_res")
    h = _rms_norm(em, h, mw.final_norm, mw.eps, axis, "final_norm")
    outputs = []
    for j, chunk in enumerate(mw.head_chunks()):
        logits = em.project(h, chunk.weight, None, f"lm_head_{j}")  # (rows, S)
        logits = em.reshape(logits, [chunk.rows, seq], f"lm_head_{j}_2d")
        logits = em.transpose(logits, [1, 0], f"lm_head_{j}_rows")
        outputs.append(em.reshape(logits, [1, seq, chunk.rows], f"logits_{j}"))
    return outputs
