"""Grouped 1-D k-means for lookup-table (LUT) palettization, vectorized over all groups of a layer.

A weight matrix is cut into groups (``group_size`` output rows with ``axis=0``, Apple's and coremltools'
"per_grouped_channel"; ``group_size`` input columns with ``axis=1``); each group gets its own LUT of
``2**bits`` fp16 values and every weight stores the index of its nearest LUT entry.

The LUT is stored in fp16, so clustering runs on the fp16-rounded weights. Each group's data becomes a
sorted "layout" with prefix sums of mass and mass*value, which give any cluster's mean and cost in
O(1); a cluster is a range of positions [a, b). Two layouts, chosen by density:

* histogram: one bin per fp16 code in the layer's value range (dense groups, e.g. 16 rows x 3072).
  A value's position is bit arithmetic on its fp16 code, and the whole build is one scatter-add.
* sorted: the group's values sorted (sparse groups, e.g. one 3072-wide embedding row, and small
  groups); a value's position is a vectorized binary search.

Every solver step is an MLX op over all groups at once:

1. ``bits <= 4``: an exact dynamic program over a grid of boundary candidates (mass quantiles and
   value-uniform points; *every* position when a group has < 256 values, which makes it the exact
   optimum), then Viterbi refinement: all boundaries jointly pick the best of several candidates,
   first spread between their neighbours (so a group can still change structure, e.g. give an
   outlier its own level), then in windows that narrow until nothing moves. On gaussian,
   heavy-tailed and outlier-laden data this is within ~1e-4 of the exact optimum that coremltools
   computes with kmeans1d (tests hold it to 1e-3).
2. ``bits >= 6``: too many levels for the grid DP. Start from the high-resolution optimal spacing,
   run Lloyd until it settles, then the same refinement when the layer is small enough.

The objective is ``sum(importance * (w - lut[idx])**2)``; indices pick the nearest fp16 LUT entry.
"""

from __future__ import annotations

import math

import mlx.core as mx

from afm_mlx.palettization.lut import check_palettization_settings, grouped, ungrouped

# Groups x positions handled at once: bounds the working arrays to ~0.3 GB (1 << 25 took ~1.8 GB
# on a 151936-row embedding for no gain in speed).
_MAX_POSITIONS_PER_CHUNK = 1 << 22
# Groups with fewer values get every position as a DP candidate (exact), and the sorted layout.
_EXACT_MAX_VALUES = 255
_COARSE_CANDIDATES = 64
_COARSE_BY_VALUE = 32
_SPAN_CANDIDATES = 16
_SPAN_PASSES = 3
_VITERBI_WINDOW = 8
_VITERBI_START_SCALE = 2.0 / _VITERBI_WINDOW  # the first window spans the neighbouring levels
_VITERBI_SHRINK = 0.5
_VITERBI_STOP_SCALE = 2e-3  # a step of 1/500 of a level gap: finer moves change < 1e-4 of the error
_VITERBI_MAX_PASSES = 60
# Refinement for 6/8-bit costs groups x levels x W^2 per pass; above this (a 49k-row per-channel
# embedding) it would take minutes. Lloyd alone is then ~17% above the optimum error on gaussian
# rows (~50% on t3-tailed ones), of an 8-bit error that is ~3e-5 of the weights' energy.
_MAX_REFINED_BOUNDARIES = 1 << 17
_LLOYD_MAX_ITERS = 200
_LLOYD_SETTLED = 1e-3


# --- fp16 codes: an order-preserving integer key for every fp16 value -------------------------------

_KEY_FINITE_MIN, _KEY_FINITE_MAX = 0x0400, 0xFBFF  # keys of -65504 and +65504


def _fp16_keys(x16: mx.array) -> mx.array:
    """uint16 key that sorts like the fp16 value (-0 and +0 are adjacent)."""
    s = x16.view(mx.int16)
    # Negative values get all bits flipped, positive ones only the sign bit. Shifts and xor are
    # fast elementwise ops on the CPU backend; ``where`` is ~7x slower there.
    return (s ^ ((s >> 15) | mx.array(-32768, mx.int16))).view(mx.uint16)


def _key_values(keys: mx.array) -> mx.array:
    """Inverse of ``_fp16_keys`` (uint16 or int32 keys in [0, 65535]), as float32."""
    t = keys.astype(mx.uint16).view(mx.int16)
    bits = t ^ (~(t >> 15) | mx.array(-32768, mx.int16))
    return bits.view(mx.float16).astype(mx.float32)


def _ceil_keys(x: mx.array) -> mx.array:
    """int32 key of the smallest fp16 value >= x."""
    h = x.astype(mx.float16)
    k = _fp16_keys(h).astype(mx.int32)
    return mx.where(h.astype(x.dtype) < x, k + 1, k)


# --- layouts: positions <-> values ---------------------------------------------------------------
# A layout is (v, index). Histogram: v (nb,) the value of each bin, index the first bin's fp16 key.
# Sorted: v (G, n) each group's sorted values, index the flattened sorted keys tagged with their group
# (g * 2**16 + key, ascending), so one ``mx.searchsorted`` finds positions for all groups.
# Positions run over [0, N] with N = M.shape[1] - 1.


def _search_prefix(prefix: mx.array, targets: mx.array) -> mx.array:
    """Smallest position p with prefix[g, p] >= targets[g, ...] (prefix non-decreasing on axis -1).

    Returns the last position when no entry qualifies.
    """
    n = prefix.shape[-1]
    flat = targets.reshape(targets.shape[0], -1)
    lo = mx.zeros(flat.shape, mx.int32)
    hi = mx.full(flat.shape, n - 1, mx.int32)
    for _ in range(max(1, math.ceil(math.log2(n)))):
        mid = (lo + hi) // 2
        ok = mx.take_along_axis(prefix, mid, axis=-1) >= flat
        hi = mx.where(ok, mid, hi)
        lo = mx.where(ok, lo, mid + 1)
    return hi.reshape(targets.shape)


def _value_at(v: mx.array, p: mx.array) -> mx.array:
    """Value of the element at position ``p`` (clamped to the last element)."""
    if v.ndim == 1:
        return v[mx.minimum(p, v.shape[0] - 1)]
    flat = mx.minimum(p.reshape(p.shape[0], -1), v.shape[1] - 1)
    return mx.take_along_axis(v, flat, axis=-1).reshape(p.shape)


def _position_of(v: mx.array, index: mx.array, x: mx.array, n: int) -> mx.array:
    """Position of the first element >= x (x: (G, ...))."""
    if v.ndim == 1:
        return mx.clip(_ceil_keys(x) - index, 0, n)
    if mx.default_device() == mx.cpu:  # ~2x faster there than the gathers
        return _sorted_position_searchsorted(index, x, n)
    return _sorted_position_gathers(v, x, n)


def _sorted_position_searchsorted(index: mx.array, x: mx.array, n: int) -> mx.array:
    tag = mx.arange(x.shape[0], dtype=mx.uint32).reshape((-1,) + (1,) * (x.ndim - 1))
    pos = mx.searchsorted(index, (tag << 16) + _ceil_keys(x).astype(mx.uint32))
    return (pos - tag * n).astype(mx.int32)


def _sorted_position_gathers(v: mx.array, x: mx.array, n: int) -> mx.array:
    """Binary search with gathers only, which every backend has."""
    pos = _search_prefix(v, x)
    return mx.where(_value_at(v, pos) < x, n, pos)


def _gain(m: mx.array, s: mx.array) -> mx.array:
    """Between-cluster term s^2/m; SSE = sum(mass*w^2) - sum over clusters of s^2/m."""
    return mx.where(m > 0, s * s / mx.maximum(m, 1e-30), 0.0)


def _centroids(p, M, S, v):
    """Cluster means for interior boundaries ``p`` (G, k-1); an empty cluster sits at its start."""
    G, n = M.shape[0], M.shape[1] - 1
    full = mx.concatenate([mx.zeros((G, 1), mx.int32), p, mx.full((G, 1), n, mx.int32)], axis=-1)
    mp = mx.take_along_axis(M, full, axis=-1)
    sp = mx.take_along_axis(S, full, axis=-1)
    mass, sums = mp[:, 1:] - mp[:, :-1], sp[:, 1:] - sp[:, :-1]
    return mx.where(mass > 0, sums / mx.maximum(mass, 1e-30), _value_at(v, full[:, :-1]))


# --- solvers -----------------------------------------------------------------------------------------
# No mx.compile: array shapes follow the data (histogram length, chunk size), so traces would be
# rebuilt for nearly every layer, and on warm shapes the measured gain was nil.


def _chain_dp(Mc, Sc, cand, M, S, trans_gain):
    """Best boundaries when boundary j picks one of ``cand[:, j]`` (G, k-1, C), jointly (Viterbi).

    ``trans_gain(j)`` is the (G, C, C) gain of the cluster between boundary j-1 (rows) and j, -inf
    where that cluster would have negative length. Returns the chosen positions (G, k-1).
    """
    V = _gain(Mc[:, 0], Sc[:, 0])  # first cluster: [0, boundary 0)
    back = []
    for j in range(1, cand.shape[1]):
        total = V[..., None] + trans_gain(j)
        best = mx.argmax(total, axis=1)
        back.append(best)
        V = mx.take_along_axis(total, best[:, None, :], axis=1)[:, 0]
    V = V + _gain(M[:, -1:] - Mc[:, -1], S[:, -1:] - Sc[:, -1])  # last cluster: [boundary, end)
    b = mx.argmax(V, axis=-1)[:, None]
    choice = [b]
    for bp in reversed(back):
        b = mx.take_along_axis(bp, b, axis=-1)
        choice.append(b)
    choice = mx.concatenate(choice[::-1], axis=-1)
    return mx.take_along_axis(cand, choice[..., None], axis=-1)[..., 0]


def _grid_dp(cand: mx.array, M: mx.array, S: mx.array, k: int) -> mx.array:
    """Exact optimum over partitions whose k-1 boundaries lie in the sorted grid ``cand`` (G, B)."""
    Mc = mx.take_along_axis(M, cand, axis=-1)
    Sc = mx.take_along_axis(S, cand, axis=-1)
    # One (G, B, B) table serves every level of the chain: [a, b] is the cluster cand_a..cand_b.
    table = _gain(Mc[:, None, :] - Mc[:, :, None], Sc[:, None, :] - Sc[:, :, None])
    order = mx.arange(cand.shape[1])
    table = mx.where(order[:, None] <= order[None, :], table, -mx.inf)
    shape = (cand.shape[0], k - 1, cand.shape[1])
    return _chain_dp(
        mx.broadcast_to(Mc[:, None, :], shape),
        mx.broadcast_to(Sc[:, None, :], shape),
        mx.broadcast_to(cand[:, None, :], shape),
        M,
        S,
        lambda j: table,
    )


def _chain_pass(p, cand, M, S):
    """Move all boundaries jointly to their best candidates ``cand`` (G, k-1, C); never worse as
    long as ``p`` is among them."""
    flat = cand.reshape(cand.shape[0], -1)
    Mc = mx.take_along_axis(M, flat, axis=-1).reshape(cand.shape)
    Sc = mx.take_along_axis(S, flat, axis=-1).reshape(cand.shape)

    def trans(j):
        gain = _gain(Mc[:, j, None] - Mc[:, j - 1, :, None], Sc[:, j, None] - Sc[:, j - 1, :, None])
        return mx.where(cand[:, j - 1, :, None] <= cand[:, j, None, :], gain, -mx.inf)

    return _chain_dp(Mc, Sc, cand, M, S, trans)


def _span_pass(p, M, S, v, lo, first, last):
    """Candidates spread over each boundary's whole room, between its two neighbours: lets a group
    change structure (e.g. give an outlier its own level), which narrow windows cannot."""
    n, C = M.shape[1] - 1, _SPAN_CANDIDATES
    at = _value_at(v, p)
    left = mx.concatenate([_value_at(v, first), at[:, :-1]], axis=-1)
    right = mx.concatenate([at[:, 1:], _value_at(v, last)], axis=-1)
    frac = mx.arange(1, C + 1, dtype=mx.float32) / (C + 1)
    cand = _position_of(v, lo, left[..., None] + (right - left)[..., None] * frac, n)
    return _chain_pass(p, mx.concatenate([p[..., None], cand], axis=-1), M, S)


def _window_pass(p, scale, M, S, v, lo):
    """W candidates around each boundary, spaced by ``scale`` (G, 1) times its level gap; a group
    whose boundaries all stayed halves its ``scale``."""
    W, n = _VITERBI_WINDOW, M.shape[1] - 1
    c = _centroids(p, M, S, v)
    step = (c[:, 1:] - c[:, :-1]) * scale
    offsets = mx.arange(-(W // 2), W // 2, dtype=M.dtype)
    cand = _position_of(v, lo, _value_at(v, p)[..., None] + step[..., None] * offsets, n)
    cand = mx.where(offsets == 0, p[..., None], cand)  # keep the current solution reachable
    new_p = _chain_pass(p, cand, M, S)
    moved = mx.any(new_p != p, axis=-1, keepdims=True)
    scale = mx.where(moved, scale, scale * _VITERBI_SHRINK)
    return new_p, scale, mx.max(scale)


def _lloyd_step(p, M, S, v, lo):
    """Move each boundary to the midpoint between its two cluster means."""
    c = _centroids(p, M, S, v)
    return _position_of(v, lo, (c[:, 1:] + c[:, :-1]) * 0.5, M.shape[1] - 1)


def _refine(p, M, S, v, lo, first, last):
    """A few wide passes (structural moves happen in the first ones; later ones only creep), then
    windows narrowing to a 1/500 level gap."""
    for _ in range(_SPAN_PASSES):
        new_p = _span_pass(p, M, S, v, lo, first, last)
        moved = mx.any(new_p != p).item()
        p = new_p
        if not moved:
            break
    scale = mx.full((p.shape[0], 1), _VITERBI_START_SCALE, M.dtype)
    for _ in range(_VITERBI_MAX_PASSES):
        p, scale, coarsest = _window_pass(p, scale, M, S, v, lo)
        if coarsest.item() < _VITERBI_STOP_SCALE:
            break
    return p


def _lloyd(p, M, S, v, lo):
    """Lloyd steps until < 0.1% of the boundaries still move: by then the error is within ~1e-4
    of Lloyd's fixed point, and the rest are slow creeps worth nothing."""
    for it in range(_LLOYD_MAX_ITERS):
        new_p = _lloyd_step(p, M, S, v, lo)
        # A sync per step costs more than small steps themselves: look every 4 steps.
        if it % 4 == 3 and mx.mean(new_p != p).item() < _LLOYD_SETTLED:
            return new_p
        p = new_p
    return p


def _coarse_candidates(M, v, lo, first, last):
    """Sorted boundary grid (G, B): mass quantiles (resolving the dense body) plus value-uniform
    points (reaching into sparse tails, where a lone outlier may deserve its own level)."""
    n = M.shape[1] - 1
    by_mass, by_value = _COARSE_CANDIDATES - _COARSE_BY_VALUE, _COARSE_BY_VALUE
    frac = mx.arange(1, by_mass + 1, dtype=M.dtype) / (by_mass + 1)
    quantiles = _search_prefix(M, M[:, -1:] * frac)
    vmin, vmax = _value_at(v, first), _value_at(v, last)
    frac = mx.arange(1, by_value + 1, dtype=mx.float32) / (by_value + 1)
    uniform = _position_of(v, lo, vmin + (vmax - vmin) * frac, n)
    return mx.sort(mx.concatenate([quantiles, uniform], axis=-1), axis=-1)


def _companded_start(M, v, lo, first, last, k, stretches=64):
    """Boundaries spaced like the high-resolution optimal quantizer: a stretch of values gets levels
    in proportion to (its mass)^(1/3), over ``stretches`` value-uniform stretches."""
    G, n = M.shape[0], M.shape[1] - 1
    vmin, vmax = _value_at(v, first), _value_at(v, last)
    width = (vmax - vmin) / stretches
    pos = _position_of(v, lo, vmin + width * mx.arange(stretches, dtype=M.dtype), n)
    pos = mx.concatenate([pos, last + 1], axis=-1)
    mass = mx.diff(mx.take_along_axis(M, pos, axis=-1), axis=-1)
    levels = mx.cumsum(mx.power(mass, 1.0 / 3.0), axis=-1)
    levels = mx.concatenate([mx.zeros((G, 1), M.dtype), levels * (k / levels[:, -1:])], axis=-1)
    # Boundary j sits where the cumulative level count reaches j, linearly inside its stretch.
    j = mx.broadcast_to(mx.arange(1, k, dtype=M.dtype), (G, k - 1))
    i = mx.clip(_search_prefix(levels, j) - 1, 0, stretches - 1)
    at, nxt = mx.take_along_axis(levels, i, axis=-1), mx.take_along_axis(levels, i + 1, axis=-1)
    frac = mx.clip((j - at) / mx.maximum(nxt - at, 1e-12), 0.0, 1.0)
    return _position_of(v, lo, vmin + (i.astype(M.dtype) + frac) * width, n)


# --- driver ------------------------------------------------------------------------------------------


def _prefix_dtype(refined_levels: bool) -> mx.Dtype:
    """float64 prefix sums to refine 64-256 levels where the backend has it (CPU): a cluster sum is
    a difference of two prefix sums over ~n/2 values, and in fp32 that is too coarse to rank
    candidate boundaries between such close levels. fp32 is enough for 1- to 4-bit LUTs (within
    ~1e-5 of the optimum) and for Lloyd's means."""
    return mx.float64 if refined_levels and mx.default_device() == mx.cpu else mx.float32


def _scatter_add_along_axis(shape: tuple[int, int], indices: mx.array, values: mx.array):
    """``out[g, indices[g, i]] += values[g, i]`` into zeros of ``shape`` (float32).

    MLX has this op (a scatter-add along an axis) but exposes it only as the gradient of
    ``take_along_axis``; it is ~9x faster on the CPU than the general ``.at[].add`` scatter, which
    dominated the whole k-means.
    """

    def gather(table):
        return mx.take_along_axis(table, indices, axis=-1)

    _, (out,) = mx.vjp(gather, [mx.zeros(shape, mx.float32)], [values.astype(mx.float32)])
    return out


def _histogram_layout(keys: mx.array, mass: mx.array | None, dtype: mx.Dtype):
    """Bins over the chunk's fp16 codes. Returns M, S, v, index (the first key), rel (G, n)."""
    G = keys.shape[0]
    lo = mx.min(keys)
    rel = keys - lo
    nb = (mx.max(rel).item()) + 1
    # Column 0 stays empty, so the cumulative sums start at 0 with no extra copy.
    add = mx.broadcast_to(mx.array(1.0), keys.shape) if mass is None else mass
    hist = _scatter_add_along_axis((G, nb + 1), rel + 1, add)
    v = _key_values(mx.arange(nb, dtype=mx.int32) + lo.astype(mx.int32))
    hist = hist.astype(dtype)
    M = mx.cumsum(hist, axis=-1)
    S = mx.cumsum(hist * mx.concatenate([mx.zeros((1,), dtype), v.astype(dtype)]), axis=-1)
    return M, S, v, lo.astype(mx.int32), rel


def _sorted_layout(keys: mx.array, mass: mx.array | None, dtype: mx.Dtype):
    """Each group's values sorted. Returns M, S, v, index (group-tagged sorted keys), order."""
    G = keys.shape[0]
    order = mx.argsort(keys, axis=-1)
    sorted_keys = mx.take_along_axis(keys, order, axis=-1)
    v = _key_values(sorted_keys)
    xs = v.astype(dtype)
    zero = mx.zeros((G, 1), dtype)
    if mass is None:
        M = mx.broadcast_to(mx.arange(keys.shape[1] + 1, dtype=dtype), (G, keys.shape[1] + 1))
        S = mx.concatenate([zero, mx.cumsum(xs, axis=-1)], axis=-1)
    else:
        w = mx.take_along_axis(mass, order, axis=-1).astype(dtype)
        M = mx.concatenate([zero, mx.cumsum(w, axis=-1)], axis=-1)
        S = mx.concatenate([zero, mx.cumsum(w * xs, axis=-1)], axis=-1)
    tagged = (mx.arange(G, dtype=mx.uint32)[:, None] << 16) + sorted_keys.astype(mx.uint32)
    return M, S, v, tagged.reshape(-1), order


def _marks(q: mx.array, length: int) -> mx.array:
    """(G, length) labels: for each position, how many of the boundaries ``q`` (G, k-1) are <= it."""
    marks = _scatter_add_along_axis(
        (q.shape[0], length), q, mx.broadcast_to(mx.array(1.0), q.shape)
    )
    return mx.cumsum(marks, axis=-1).astype(mx.uint8)


def _solve_chunk(
    keys: mx.array, mass: mx.array | None, bits: int, span: int, refine_many: bool
) -> tuple[mx.array, mx.array]:
    """k-means for groups of fp16 keys (G, n) with optional mass; returns (lut fp16, indices).
    ``refine_many``: refine 64-256 levels after Lloyd (decided for the whole matrix)."""
    G, n = keys.shape
    k = 1 << bits
    sorted_layout = n <= _EXACT_MAX_VALUES or 4 * n < span
    layout = _sorted_layout if sorted_layout else _histogram_layout
    M, S, v, lo, perm = layout(keys, mass, _prefix_dtype(refine_many))
    mx.eval(M, S, v)
    N = M.shape[1] - 1
    if sorted_layout:
        first, last = mx.zeros((G, 1), mx.int32), mx.full((G, 1), n - 1, mx.int32)
    else:
        first = mx.min(perm, axis=-1, keepdims=True).astype(mx.int32)
        last = mx.max(perm, axis=-1, keepdims=True).astype(mx.int32)

    if sorted_layout and n <= k:  # every value its own level: exact, nothing to search
        p = mx.broadcast_to(mx.minimum(mx.arange(1, k, dtype=mx.int32), n), (G, k - 1))
    elif k <= 16 and n <= _EXACT_MAX_VALUES:
        # Every position is a candidate: the grid DP is the exact optimum.
        p = _grid_dp(mx.broadcast_to(mx.arange(N + 1, dtype=mx.int32), (G, N + 1)), M, S, k)
    elif k <= 16:
        p = _grid_dp(_coarse_candidates(M, v, lo, first, last), M, S, k)
        p = _refine(p, M, S, v, lo, first, last)
    else:
        start = _companded_start(M, v, lo, first, last, k)
        p = _lloyd(start, M, S, v, lo)
        if refine_many:
            p = _refine(p, M, S, v, lo, first, last)

    lut = _centroids(p, M, S, v).astype(mx.float16)
    # Final assignment: the nearest fp16 LUT entry (ties go up), via per-position labels.
    lut32 = lut.astype(mx.float32)  # midpoints of fp16 values are exact in fp32
    q = _position_of(v, lo, (lut32[:, 1:] + lut32[:, :-1]) * 0.5, N)
    labels = _marks(q, N + 1)
    if sorted_layout:  # labels are in sorted order; ``perm`` is the sorting permutation
        indices = mx.put_along_axis(mx.zeros((G, n), mx.uint8), perm, labels[:, :n], axis=-1)
    else:  # labels per bin; ``perm`` is each value's bin
        indices = mx.take_along_axis(labels, perm, axis=-1)
    mx.eval(lut, indices)
    return lut, indices


def kmeans_lut(
    weight: mx.array,
    bits: int,
    group_size: int = 16,
    axis: int = 0,
    weights: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """Grouped k-means palettization of a 2-D ``weight`` (out, in).

    Args:
        bits: index width; each LUT has ``2**bits`` entries.
        group_size: channels sharing one LUT (rows with ``axis=0``, columns with ``axis=1``).
        weights: optional non-negative per-weight importance (same shape) for weighted k-means.

    Returns:
        ``(lut, indices)``: lut fp16 (n_groups, 2**bits), ascending per group; indices uint8
        (out, in), the nearest LUT entry of every weight.
    """
    n_groups = check_palettization_settings(tuple(weight.shape), bits, group_size, axis)
    shape = (weight.shape[0], weight.shape[1])
    per_row = shape[1] * group_size  # values per group with groups of rows
    per_group_values = per_row if axis == 0 else shape[0] * group_size

    # With groups of rows (axis 0) a group is a slice of rows: keys and masses are made one
    # slice at a time, so the working memory is a slice's, not the matrix's (an embedding).
    # Groups of columns are transposed once, whole.
    def rows_of(part: slice) -> slice:
        return slice(part.start * group_size, part.stop * group_size)

    def keys_of(part: slice) -> mx.array:
        if axis == 1:
            return whole_keys[part]
        w = weight[rows_of(part)]
        return _fp16_keys(
            (w if w.dtype == mx.float16 else w.astype(mx.float16)).reshape(-1, per_row)
        )

    whole_keys = None
    if axis == 1:
        w16 = weight if weight.dtype == mx.float16 else weight.astype(mx.float16)
        whole_keys = _fp16_keys(grouped(w16, group_size, axis))
    scan = max(1, _MAX_POSITIONS_PER_CHUNK // per_group_values)  # groups per range-scan slice
    lo_key, hi_key = 65535, 0
    for start in range(0, n_groups, scan):
        keys = keys_of(slice(start, min(n_groups, start + scan)))
        lo_key, hi_key = min(lo_key, mx.min(keys).item()), max(hi_key, mx.max(keys).item())
    if lo_key < _KEY_FINITE_MIN or hi_key > _KEY_FINITE_MAX:
        raise ValueError("weight has values that are NaN, infinite or beyond the fp16 range")
    imp = floor = None
    if weights is not None:
        if tuple(weights.shape) != shape:
            raise ValueError(f"importance shape {tuple(weights.shape)} != weight shape {shape}")
        imp = weights.astype(mx.float32)
        if not mx.all(imp >= 0).item():
            raise ValueError("importance weights must be non-negative")
        # A small floor keeps every weight (and group) in play where importances are all zero.
        floor = mx.maximum(mx.mean(imp), 1e-30) * 1e-6

    whole_mass = None if imp is None or axis == 0 else grouped(imp + floor, group_size, axis)

    def mass_of(part: slice) -> mx.array | None:
        if imp is None:
            return None
        if axis == 1:
            return whole_mass[part]
        return (imp[rows_of(part)] + floor).reshape(-1, per_row)

    span = hi_key - lo_key + 1
    per_group = min(span, per_group_values) + 1
    # At most 2**16 groups per chunk: the sorted layout tags keys with their group in 32 bits.
    chunk = max(1, min(1 << 16, _MAX_POSITIONS_PER_CHUNK // per_group))
    # Whether to refine many levels is the matrix's choice (its cost grows with all its groups),
    # never the chunk's: the chunk size only bounds memory.
    refine_many = bits > 4 and n_groups * ((1 << bits) - 1) <= _MAX_REFINED_BOUNDARIES
    luts, idxs = [], []
    for start in range(0, n_groups, chunk):
        part = slice(start, min(n_groups, start + chunk))
        lut, idx = _solve_chunk(keys_of(part), mass_of(part), bits, span, refine_many)
        luts.append(lut)
        idxs.append(idx)
    lut = mx.concatenate(luts, axis=0) if len(luts) > 1 else luts[0]
    idx = mx.concatenate(idxs, axis=0) if len(idxs) > 1 else idxs[0]
    return lut, ungrouped(idx, shape, axis)
