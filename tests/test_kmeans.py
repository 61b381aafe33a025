"""Grouped k-means for LUT palettization: optimality, parity with coremltools, settings errors."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from afm_mlx.palettization.kmeans import kmeans_lut
from afm_mlx.palettization.lut import SUPPORTED_BITS, lut_to_dense


def exact_kmeans(x: np.ndarray, k: int, w: np.ndarray | None = None) -> np.ndarray:
    """Reference: optimal weighted 1-D k-means centroids by the O(k n^2) dynamic program."""
    values, inverse = np.unique(x.astype(np.float64), return_inverse=True)
    mass = np.bincount(inverse, weights=None if w is None else w.astype(np.float64))
    n = len(values)
    zero = np.zeros(1)
    m = np.concatenate([zero, np.cumsum(mass)])
    s = np.concatenate([zero, np.cumsum(mass * values)])
    q = np.concatenate([zero, np.cumsum(mass * values**2)])
    dm, ds, dq = m[None] - m[:, None], s[None] - s[:, None], q[None] - q[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = np.where(dm > 0, dq - ds * ds / np.where(dm > 0, dm, 1.0), 0.0)
    cost = np.where(np.arange(n + 1)[:, None] <= np.arange(n + 1)[None], cost, np.inf)
    best, back = cost[0].copy(), []  # best[i]: one cluster over values[:i]
    for _ in range(1, k):
        total = best[:, None] + cost
        back.append(np.argmin(total, axis=0))
        best = total.min(axis=0)
    ends, end = [n], n
    for arg in reversed(back):
        end = arg[end]
        ends.append(end)
    ends = ends[::-1]
    centroids = [
        (s[b] - s[a]) / (m[b] - m[a]) if m[b] > m[a] else values[min(a, n - 1)]
        for a, b in zip(ends[:-1], ends[1:], strict=True)
    ]
    return np.array(centroids)


def sse_with_lut(x: np.ndarray, lut: np.ndarray, w: np.ndarray | None = None) -> float:
    """Error of assigning every value to its nearest entry of the fp16-rounded ``lut``."""
    lut16 = lut.astype(np.float16).astype(np.float64)
    err = np.min((x.astype(np.float64)[:, None] - lut16[None]) ** 2, axis=1)
    return float(np.sum(err if w is None else w * err))


def group_rows(a: np.ndarray, group_size: int) -> list[np.ndarray]:
    return [a[i : i + group_size].reshape(-1) for i in range(0, a.shape[0], group_size)]


def ours_sse(weight: np.ndarray, bits: int, group_size: int = 16, importance=None) -> list[float]:
    lut, idx = kmeans_lut(
        mx.array(weight),
        bits,
        group_size,
        weights=None if importance is None else mx.array(importance),
    )
    assert lut.dtype == mx.float16 and idx.dtype == mx.uint8
    assert lut.shape == (weight.shape[0] // group_size, 2**bits) and idx.shape == weight.shape
    assert int(mx.max(idx).item()) < 2**bits
    dense = np.array(lut_to_dense(lut, idx, group_size)).astype(np.float64)
    err = (dense - weight.astype(np.float64)) ** 2
    if importance is not None:
        err = err * importance
    return [float(e.sum()) for e in group_rows(err, group_size)]


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("weighted", [False, True])
def test_small_groups_are_exactly_optimal(bits, weighted):
    """Groups of < 256 values go through the exact DP: same error as the reference optimum."""
    rng = np.random.default_rng(bits + 10 * weighted)
    weight = (rng.standard_t(4, size=(48, 10)) * 0.05).astype(np.float16)  # groups of 160 values
    imp = rng.uniform(0.0, 3.0, size=weight.shape).astype(np.float32) if weighted else None
    ours = ours_sse(weight, bits, importance=imp)
    for g, (x, err) in enumerate(zip(group_rows(weight, 16), ours, strict=True)):
        w = None if imp is None else group_rows(imp, 16)[g]
        ref = sse_with_lut(x, exact_kmeans(x, 2**bits, w), w)
        assert err <= ref * (1 + 1e-5) + 1e-12, (g, err, ref)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("layout", ["sorted", "histogram"])
@pytest.mark.parametrize("weighted", [False, True])
def test_large_groups_within_0_05_percent_of_optimum(bits, layout, weighted):
    """The DP-grid + Viterbi path (groups of 1024+ values) on both data layouts."""
    rng = np.random.default_rng(bits)
    if layout == "sorted":  # values spread over ~20k fp16 codes: sparse, sorted layout
        weight = rng.standard_t(5, size=(32, 64)) * 0.02
    else:  # a narrow range (~150 codes, many repeats): dense, histogram layout
        weight = 1.0 + rng.normal(size=(32, 512)) * 0.02
    weight = weight.astype(np.float16)
    imp = rng.uniform(0.1, 4.0, size=weight.shape).astype(np.float32) if weighted else None
    ours = ours_sse(weight, bits, importance=imp)
    for g, (x, err) in enumerate(zip(group_rows(weight, 16), ours, strict=True)):
        w = None if imp is None else group_rows(imp, 16)[g]
        ref = sse_with_lut(x, exact_kmeans(x, 2**bits, w), w)
        assert err <= ref * 1.0005, (err, ref)


def _coremltools_lut(weight: np.ndarray, bits: int) -> np.ndarray:
    """coremltools 9's own per_grouped_channel k-means (the function its palettize pass calls)."""
    ctools = pytest.importorskip("coremltools.optimize.coreml._quantization_passes")
    utils = pytest.importorskip("coremltools.optimize._utils")
    params = ctools.palettize_weights.grouped_channelwise_compress(weight, "KMEANS", bits, 0, 16)
    return utils.lut_to_dense(params.indices, params.lut, params.vector_axis)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dist", ["gaussian", "heavy_tailed"])
def test_matches_coremltools_within_0_1_percent(bits, dist):
    # 16 x 640 = 10240 values per group: coremltools takes its exact kmeans1d path (>= 10k fp16).
    rng = np.random.default_rng(7)
    if dist == "gaussian":
        weight = rng.normal(size=(256, 640)) * 0.02
    else:
        weight = rng.standard_t(3, size=(256, 640)) * 0.02 * rng.uniform(0.5, 2, size=(256, 1))
    weight = weight.astype(np.float16)
    w64 = weight.astype(np.float64)
    ref = np.sum((_coremltools_lut(weight, bits).astype(np.float64) - w64) ** 2) / np.sum(w64**2)
    lut, idx = kmeans_lut(mx.array(weight), bits, 16)
    dense = np.array(lut_to_dense(lut, idx, 16)).astype(np.float64)
    ours = np.sum((dense - w64) ** 2) / np.sum(w64**2)
    assert ours <= ref * 1.001, (ours, ref)


def test_importance_lowers_the_weighted_error():
    rng = np.random.default_rng(3)
    weight = (rng.normal(size=(32, 256)) * 0.02).astype(np.float16)
    # The largest 5% of weights matter 50x more (as outliers do in LLMs).
    big = np.abs(weight) > np.quantile(np.abs(weight), 0.95)
    imp = np.where(big, 50.0, 1.0).astype(np.float32)

    def weighted_error(lut, idx):
        dense = np.array(lut_to_dense(lut, idx, 16)).astype(np.float64)
        return float(np.sum(imp * (dense - weight.astype(np.float64)) ** 2))

    plain = weighted_error(*kmeans_lut(mx.array(weight), 2))
    weighted = weighted_error(*kmeans_lut(mx.array(weight), 2, weights=mx.array(imp)))
    assert weighted < 0.7 * plain


def test_axis1_groups_input_columns():
    rng = np.random.default_rng(4)
    weight = mx.array((rng.normal(size=(24, 64)) * 0.02).astype(np.float16))
    lut, idx = kmeans_lut(weight, 3, group_size=8, axis=1)
    lut_t, idx_t = kmeans_lut(weight.T, 3, group_size=8, axis=0)
    assert lut.shape == (8, 8)
    assert mx.array_equal(lut, lut_t) and mx.array_equal(idx, idx_t.T)
    dense = lut_to_dense(lut, idx, 8, axis=1)
    assert mx.array_equal(dense, lut_to_dense(lut_t, idx_t, 8, axis=0).T)


def test_high_bit_widths_and_float32_input():
    rng = np.random.default_rng(5)
    w32 = rng.normal(size=(32, 512)).astype(np.float32) * 0.02
    w16 = w32.astype(np.float16).astype(np.float64)
    errors = {}
    for bits in SUPPORTED_BITS:
        lut, idx = kmeans_lut(mx.array(w32), bits)
        dense = np.array(lut_to_dense(lut, idx, 16)).astype(np.float64)
        errors[bits] = np.sum((dense - w16) ** 2) / np.sum(w16**2)
        # Every level is used well: sorted LUT, each index its value's nearest entry.
        lut_np = np.array(lut).astype(np.float64)
        assert np.all(np.diff(lut_np, axis=1) >= 0)
    # Each extra bit should cut a gaussian's error by ~4x (Lloyd-Max: 0.36, 0.12, 0.035, 0.0095).
    assert errors[1] == pytest.approx(0.363, rel=0.03)
    assert errors[2] == pytest.approx(0.118, rel=0.03)
    assert errors[4] == pytest.approx(0.0095, rel=0.05)
    assert errors[8] < errors[6] < errors[4] / 8
    # fp32 input is clustered as its fp16 rounding (the LUT's own precision).
    a = kmeans_lut(mx.array(w32), 4)
    b = kmeans_lut(mx.array(w32.astype(np.float16)), 4)
    assert mx.array_equal(a[0], b[0]) and mx.array_equal(a[1], b[1])


def test_few_distinct_values_are_reproduced_exactly():
    weight = np.tile(np.array([-0.5, 0.0, 0.25], np.float16), (16, 6))[:, :16]
    lut, idx = kmeans_lut(mx.array(weight), 2)
    assert mx.array_equal(lut_to_dense(lut, idx, 16), mx.array(weight))
    const = mx.full((16, 32), 0.125, mx.float16)
    lut, idx = kmeans_lut(const, 4)
    assert mx.array_equal(lut_to_dense(lut, idx, 16), const)


def test_sorted_layout_searches_agree():
    """The CPU's searchsorted and the gathers-only search used on other backends."""
    from afm_mlx.palettization.kmeans import (
        _fp16_keys,
        _sorted_layout,
        _sorted_position_gathers,
        _sorted_position_searchsorted,
    )

    rng = np.random.default_rng(6)
    keys = _fp16_keys(mx.array((rng.normal(size=(5, 300)) * 0.02).astype(np.float16)))
    _, _, v, index, _ = _sorted_layout(keys, None, mx.float32)
    x = mx.array(rng.normal(size=(5, 40)).astype(np.float32) * 0.03)
    x = mx.concatenate([x, v[:, :7], mx.full((5, 1), 9.0)], axis=-1)  # ties and beyond the end
    fast = _sorted_position_searchsorted(index, x, 300)
    assert mx.array_equal(fast, _sorted_position_gathers(v, x, 300))
    expected = np.sum(np.array(v)[:, None, :] < np.array(x)[:, :, None], axis=-1)
    assert np.array_equal(np.array(fast), expected)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bits": 5}, "bits=5"),
        ({"bits": 4, "group_size": 12}, "group_size=12"),
        ({"bits": 4, "group_size": 0}, "group_size=0"),
        ({"bits": 4, "axis": 2}, "axis=2"),
    ],
)
def test_bad_settings_raise_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        kmeans_lut(mx.zeros((32, 64)), **kwargs)
    assert "\n" not in str(err.value)


def test_bad_values_raise():
    with pytest.raises(ValueError, match="NaN, infinite or beyond the fp16 range"):
        kmeans_lut(mx.array([[1e6] * 8] * 16), 4)
    with pytest.raises(ValueError, match="non-negative"):
        kmeans_lut(mx.zeros((16, 8)), 4, weights=-mx.ones((16, 8)))
    with pytest.raises(ValueError, match="2-D"):
        kmeans_lut(mx.zeros((16,)), 4)


@pytest.mark.parametrize("n_groups, refined", [(40, True), (600, False)])
def test_refining_many_levels_is_the_matrixs_choice_not_the_chunks(monkeypatch, n_groups, refined):
    """8-bit refinement is chosen by the whole matrix's size (its cost grows with every group):
    a matrix too large to refine is not refined piecemeal because a small memory budget cut it
    into chunks that would each qualify, and a small one is refined in every chunk."""
    from afm_mlx.palettization import kmeans

    calls = []
    refine = kmeans._refine
    monkeypatch.setattr(kmeans, "_MAX_POSITIONS_PER_CHUNK", 1 << 14)  # ~31 groups per chunk
    monkeypatch.setattr(kmeans, "_refine", lambda *a: calls.append(a[0].shape[0]) or refine(*a))
    w = mx.random.normal((16 * n_groups, 32), key=mx.random.key(n_groups)).astype(mx.float16)
    lut, idx = kmeans_lut(w, 8, group_size=16)
    assert lut.shape == (n_groups, 256)
    assert calls if refined else not calls
    if refined:
        assert len(calls) > 1 and sum(calls) == n_groups  # several chunks, each refined
