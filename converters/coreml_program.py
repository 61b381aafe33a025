"""Build the MIL program of one Core ML function (prefill or decode, optionally with a LoRA adapter).

Layout follows Apple's "Deploying Transformers on the Apple Neural Engine": activations are
channels-first ``(1, C, 1, S)`` and every projection is a 1x1 ``conv``, the layout the ANE executes
natively (no transposes around each matmul, and the last axis, which the ANE pads to 64 bytes, is the
sequence instead of the channels). Everything is static-shaped, fp16 and at most rank 4.

Inputs: ``input_ids`` (1, S) int32 and ``position`` (1,) int32, the cache row of the first token.
State: per layer ``k_cache_i`` and ``v_cache_i`` of shape (kv_heads, context, head_dim), fp16, shared
by every function of the package so a prefill can be followed by decodes on the same ``MLState``.
Outputs: ``logits_0``... (1, S, chunk) fp16: the tied LM head is split into chunks of at most
``head_chunk`` rows, because the ANE limits a tensor dimension (~16k); concatenate them on the host.
"""

from __future__ import annotations

import math

import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Function, Program, Var, types

from converters.coreml_weights import LoraWeights, LutMatrix, ModelWeights, Projection

# Added to masked attention scores: finite so that a fully masked row (never produced here) could
# not become NaN, and large enough that exp() underflows to 0 in fp16.
MASK_VALUE = -30000.0
# Largest LM-head chunk: ANE tensors are limited to 16384 along a dimension.
DEFAULT_HEAD_CHUNK = 16384


def _opset():
    import coremltools as ct

    return ct.target.iOS18


def _sub_byte_dtype(bits: int) -> np.dtype:
    """The NumPy dtype coremltools uses to mark indices as uint<bits> (packed when serialized);
    applied as a view, so a 3B model's indices are not copied once per function."""
    return types.nptype_from_builtin(types.string_to_builtin(f"uint{bits}"))


class _Weights:
    """Creates weight Vars once per function, so the same tensor (e.g. the tied embedding) is one op."""

    def __init__(self):
        self.cache: dict[tuple[int, bool], Var] = {}

    def matrix(self, m: np.ndarray | LutMatrix, name: str, as_conv: bool) -> Var:
        """A (rows, cols) weight, or (rows, cols, 1, 1) for a 1x1 conv."""
        key = (id(m), as_conv)
        if key in self.cache:
            return self.cache[key]
        if isinstance(m, LutMatrix):
            rows, cols = m.shape
            groups, entries = m.lut.shape
            extra = (1, 1) if as_conv else ()
            # LUT rank = indices rank + 2: (groups, 1, [1, 1,] entries, 1) for groups of rows,
            # (1, groups, ...) for groups of columns; the LUT values are the MLX ones, unchanged.
            blocks = (groups, 1) if m.axis == 0 else (1, groups)
            var = mb.constexpr_lut_to_dense(
                indices=m.indices.reshape((rows, cols, *extra)).view(_sub_byte_dtype(m.bits)),
                lut=m.lut.reshape((*blocks, *extra, entries, 1)),
                name=name,
            )
        else:
            var = mb.const(val=m.reshape(m.shape + ((1, 1) if as_conv else ())), name=name)
        self.cache[key] = var
        return var


def _rms_norm(x: Var, weight: np.ndarray, eps: float, axis: int, name: str) -> Var:
    """RMSNorm over ``axis``; ``weight`` is broadcast along it.

    Squares are taken of x / sqrt(n), so their sum (the mean square) stays in fp16 range for
    activations up to ~256*sqrt(n), instead of overflowing at |x| > 256.
    """
    n = x.shape[axis]
    scaled = mb.mul(x=x, y=np.float16(1.0 / math.sqrt(n)), name=name + "_scaled")
    mean_sq = mb.reduce_sum(
        x=mb.mul(x=scaled, y=scaled, name=name + "_sq"),
        axes=[axis],
        keep_dims=True,
        name=name + "_meansq",
    )
    inv = mb.rsqrt(x=mean_sq, epsilon=np.float16(eps), name=name + "_inv")
    shape = [1] * x.rank
    shape[axis] = n
    normed = mb.mul(x=x, y=inv, name=name + "_normed")
    return mb.mul(x=normed, y=weight.reshape(shape), name=name)


def _project(x: Var, proj: Projection, w: _Weights, lora: LoraWeights | None, name: str) -> Var:
    """1x1 conv with the base weight, plus the unfused low-rank adapter path B(A x) if any."""
    weight = w.matrix(proj.weight, name + "_weight", as_conv=True)
    kwargs = {} if proj.bias is None else {"bias": proj.bias}
    y = mb.conv(x=x, weight=weight, name=name, **kwargs)
    if lora is not None and proj.path in lora.pairs:
        a, b = lora.pairs[proj.path]
        down = mb.conv(x=x, weight=a[:, :, None, None], name=name + "_lora_a")
        up = mb.conv(x=down, weight=b[:, :, None, None], name=name + "_lora_b")
        y = mb.add(x=y, y=up, name=name + "_lora")
    return y


def _rope(x: Var, cos: Var, sin: Var, half: int, name: str) -> Var:
    """x * cos + swap_halves(x) * sin on (heads, head_dim, S); ``sin`` carries the sign."""
    heads, dim, seq = x.shape
    first = mb.slice_by_index(x=x, begin=[0, 0, 0], end=[heads, half, seq], name=name + "_lo")
    second = mb.slice_by_index(x=x, begin=[0, half, 0], end=[heads, dim, seq], name=name + "_hi")
    swapped = mb.concat(values=[second, first], axis=1, name=name + "_swap")
    return mb.add(
        x=mb.mul(x=x, y=cos, name=name + "_cos"),
        y=mb.mul(x=swapped, y=sin, name=name + "_sin"),
        name=name,
    )


def _attention(
    h: Var,
    i: int,
    mw: ModelWeights,
    w: _Weights,
    lora: LoraWeights | None,
    states: tuple[Var, Var],
    ctx: dict[str, Var],
) -> Var:
    layer = mw.layers[i]
    seq = h.shape[3]
    hd, heads, kv = mw.head_dim, mw.heads, mw.kv_heads
    group = heads // kv
    p = f"l{i}_"
    q = _project(h, layer.proj["self_attn.q_proj"], w, lora, p + "q_proj")
    k = _project(h, layer.proj["self_attn.k_proj"], w, lora, p + "k_proj")
    v = _project(h, layer.proj["self_attn.v_proj"], w, lora, p + "v_proj")
    # (1, H*hd, 1, S) -> (H, hd, S): channel h*hd + d is head h, dim d, as in mlx-lm's reshape.
    q = mb.reshape(x=q, shape=[heads, hd, seq], name=p + "q_heads")
    k = mb.reshape(x=k, shape=[kv, hd, seq], name=p + "k_heads")
    v = mb.reshape(x=v, shape=[kv, hd, seq], name=p + "v_heads")
    if layer.q_norm is not None:
        q = _rms_norm(q, layer.q_norm, mw.eps, axis=1, name=p + "q_norm")
        k = _rms_norm(k, layer.k_norm, mw.eps, axis=1, name=p + "k_norm")
    q = _rope(q, ctx["cos"], ctx["sin"], hd // 2, p + "q_rope")
    k = _rope(k, ctx["cos"], ctx["sin"], hd // 2, p + "k_rope")
    q = mb.mul(x=q, y=np.float16(mw.attn_scale), name=p + "q_scaled")

    # Write this chunk's keys/values into the cache rows [position, position + S), then attend
    # over the whole cache; rows after the current token are masked, so stale rows are harmless.
    k_rows = mb.transpose(x=k, perm=[0, 2, 1], name=p + "k_rows")
    v_rows = mb.transpose(x=v, perm=[0, 2, 1], name=p + "v_rows")
    caches = []
    for state, rows, tag in ((states[0], k_rows, "k"), (states[1], v_rows, "v")):
        old = mb.read_state(input=state, name=f"{p}{tag}_cache_read")
        new = mb.slice_update(
            x=old, update=rows, begin=ctx["begin"], end=ctx["end"], name=f"{p}{tag}_cache_new"
        )
        mb.coreml_update_state(state=state, value=new, name=f"{p}{tag}_cache_write")
        caches.append(new)
    k_all, v_all = caches

    # GQA without repeating K/V: query heads of one KV head are stacked along the row axis.
    q_rows = mb.transpose(x=q, perm=[0, 2, 1], name=p + "q_rows")  # (H, S, hd)
    q_rows = mb.reshape(x=q_rows, shape=[kv, group * seq, hd], name=p + "q_groups")
    scores = mb.matmul(x=q_rows, y=k_all, transpose_y=True, name=p + "scores")
    context = k_all.shape[1]
    scores = mb.reshape(x=scores, shape=[kv, group, seq, context], name=p + "scores_4d")
    scores = mb.add(x=scores, y=ctx["mask"], name=p + "scores_masked")
    probs = mb.softmax(x=scores, axis=-1, name=p + "probs")
    probs = mb.reshape(x=probs, shape=[kv, group * seq, context], name=p + "probs_3d")
    out = mb.matmul(x=probs, y=v_all, name=p + "attn")  # (kv, group*S, hd)
    out = mb.reshape(x=out, shape=[heads, seq, hd], name=p + "attn_heads")
    out = mb.transpose(x=out, perm=[0, 2, 1], name=p + "attn_t")
    out = mb.reshape(x=out, shape=[1, heads * hd, 1, seq], name=p + "attn_cf")
    return _project(out, layer.proj["self_attn.o_proj"], w, lora, p + "o_proj")


def _mlp(h: Var, i: int, mw: ModelWeights, w: _Weights, lora: LoraWeights | None) -> Var:
    layer, p = mw.layers[i], f"l{i}_"
    gate = _project(h, layer.proj["mlp.gate_proj"], w, lora, p + "gate_proj")
    up = _project(h, layer.proj["mlp.up_proj"], w, lora, p + "up_proj")
    act = mb.mul(x=mb.silu(x=gate, name=p + "silu"), y=up, name=p + "swiglu")
    return _project(act, layer.proj["mlp.down_proj"], w, lora, p + "down_proj")


def _position_tensors(mw: ModelWeights, input_ids: Var, position: Var, seq: int, context: int):
    """Embedding lookup, RoPE rows, causal mask and cache-write bounds for this chunk.

    The int32 work here (a few ops on S or S x context elements) runs before the first projection,
    so it costs at most one CPU -> ANE hand-off.
    """
    w = _Weights()
    qpos = mb.add(x=position, y=np.arange(seq, dtype=np.int32), name="query_positions")
    cos = mb.gather(x=mw.rope_cos[:context].astype(np.float16), indices=qpos, axis=0, name="cos")
    sin = mb.gather(x=mw.rope_sin[:context].astype(np.float16), indices=qpos, axis=0, name="sin")
    # (S, hd) -> (1, hd, S): broadcasts against (heads, hd, S).
    cos = mb.expand_dims(x=mb.transpose(x=cos, perm=[1, 0], name="cos_t"), axes=[0], name="cos_b")
    sin = mb.expand_dims(x=mb.transpose(x=sin, perm=[1, 0], name="sin_t"), axes=[0], name="sin_b")
    future = mb.greater(
        x=np.arange(context, dtype=np.int32).reshape(1, context),
        y=mb.reshape(x=qpos, shape=[seq, 1], name="query_positions_col"),
        name="future",
    )
    future = mb.cast(x=future, dtype="fp16", name="future_fp16")
    mask = mb.mul(x=future, y=np.float16(MASK_VALUE), name="causal_mask")  # (S, context)
    zero = np.zeros((1,), np.int32)
    begin = mb.concat(values=[zero, position, zero], axis=0, name="cache_begin")
    end = mb.add(x=begin, y=np.array([mw.kv_heads, seq, mw.head_dim], np.int32), name="cache_end")
    ids = mb.reshape(x=input_ids, shape=[seq], name="ids")
    table = w.matrix(mw.embedding, "embed_tokens", as_conv=False)
    emb = mb.gather(x=table, indices=ids, axis=0, name="embed")  # (S, hidden)
    h = mb.transpose(x=emb, perm=[1, 0], name="embed_t")
    h = mb.reshape(x=h, shape=[1, mw.hidden, 1, seq], name="embed_cf")
    ctx = {"cos": cos, "sin": sin, "mask": mask, "begin": begin, "end": end}
    return w, h, ctx


def _lm_head(h: Var, mw: ModelWeights, w: _Weights, seq: int, head_chunk: int) -> list[Var]:
    x = mb.reshape(x=h, shape=[mw.hidden, seq], name="final_2d")
    x = mb.transpose(x=x, perm=[1, 0], name="final_rows")  # (S, hidden)
    source = mw.embedding if mw.lm_head is None else mw.lm_head
    table = w.matrix(source, "embed_tokens" if mw.lm_head is None else "lm_head", as_conv=False)
    outputs = []
    for j, start in enumerate(range(0, mw.vocab, head_chunk)):
        stop = min(start + head_chunk, mw.vocab)
        rows = table
        if stop - start != mw.vocab:
            rows = mb.slice_by_index(
                x=table, begin=[start, 0], end=[stop, mw.hidden], name=f"lm_head_{j}_rows"
            )
        logits = mb.matmul(x=x, y=rows, transpose_y=True, name=f"lm_head_{j}")
        outputs.append(mb.reshape(x=logits, shape=[1, seq, stop - start], name=f"logits_{j}"))
    return outputs


def state_names(num_layers: int) -> list[str]:
    return [f"{t}_cache_{i}" for i in range(num_layers) for t in ("k", "v")]


def build_function(
    mw: ModelWeights,
    seq: int,
    context: int,
    lora: LoraWeights | None = None,
    head_chunk: int = DEFAULT_HEAD_CHUNK,
) -> Program:
    """A single-function ("main") MIL program processing ``seq`` tokens against a ``context`` cache."""
    cache_shape = (mw.kv_heads, context, mw.head_dim)
    specs = {
        "input_ids": mb.TensorSpec((1, seq), dtype=types.int32),
        "position": mb.TensorSpec((1,), dtype=types.int32),
    }
    for name in state_names(len(mw.layers)):
        specs[name] = mb.StateTensorSpec(cache_shape, dtype=types.fp16)
    with Function(specs, opset_version=_opset()) as func:
        inputs = func.inputs
        w, h, ctx = _position_tensors(mw, inputs["input_ids"], inputs["position"], seq, context)
        for i, layer in enumerate(mw.layers):
            states = (inputs[f"k_cache_{i}"], inputs[f"v_cache_{i}"])
            x = _rms_norm(h, layer.input_norm, mw.eps, axis=1, name=f"l{i}_input_norm")
            h = mb.add(x=h, y=_attention(x, i, mw, w, lora, states, ctx), name=f"l{i}_attn_res")
            x = _rms_norm(h, layer.post_norm, mw.eps, axis=1, name=f"l{i}_post_norm")
            h = mb.add(x=h, y=_mlp(x, i, mw, w, lora), name=f"l{i}_mlp_res")
        h = _rms_norm(h, mw.final_norm, mw.eps, axis=1, name="final_norm")
        func.set_outputs(_lm_head(h, mw, w, seq, head_chunk))
    prog = Program()
    prog.add_function("main", func)
    return prog
