"""Mixed bits: the bit width of every layer that meets a bits-per-weight budget with the least
summed damage (an exact multiple-choice knapsack).
"""

from __future__ import annotations

import math

import numpy as np

from afm_mlx.core.errors import UserError
from afm_mlx.palettization.packing import packed_length


def layer_storage_bits(shape: tuple[int, int], bits: int, group_size: int, axis: int) -> int:
    """Stored bits of a palettized (out, in) weight: packed indices + fp16 LUTs."""
    rows, cols = shape
    n_groups = (rows if axis == 0 else cols) // group_size
    return 8 * rows * packed_length(cols, bits) + 16 * n_groups * (1 << bits)


def allocate_bits(
    shapes: dict[str, tuple[int, int]],
    damage: dict[str, dict[int, float]],
    target_bpw: float,
    group_size: int,
    axis: int,
    resolution: int = 20_000,
) -> dict[str, int]:
    """Bits per layer minimizing summed damage with total storage <= target_bpw x weights.

    A multiple-choice knapsack solved exactly by dynamic programming over the budget, cut into
    ``resolution`` units; costs are rounded up to whole units, so the budget is never exceeded.
    """
    paths = list(damage)
    n_weights = sum(r * c for r, c in shapes.values())
    budget = target_bpw * n_weights
    unit = budget / resolution
    options = []
    for p in paths:
        bits = sorted(damage[p])
        units = [math.ceil(layer_storage_bits(shapes[p], b, group_size, axis) / unit) for b in bits]
        options.append((bits, units, [damage[p][b] for b in bits]))
    if sum(min(units) for _, units, _ in options) > resolution:
        floor = (
            sum(
                min(layer_storage_bits(shapes[p], b, group_size, axis) for b in damage[p])
                for p in paths
            )
            / n_weights
        )
        raise UserError(
            f"--target-bpw {target_bpw}: below the smallest achievable {floor:.3f} bits per weight "
            f"with --bit-choices {sorted(damage[paths[0]])} and --group-size {group_size}"
        )
    best = np.zeros(resolution + 1)  # best[c]: least damage of the layers so far within c units
    picks = []
    for _, units, dmg in options:
        new = np.full(resolution + 1, np.inf)
        pick = np.zeros(resolution + 1, dtype=np.int8)
        for k, (u, d) in enumerate(zip(units, dmg)):
            if u > resolution:
                continue
            cand = np.full(resolution + 1, np.inf)
            cand[u:] = best[: resolution + 1 - u] + d
            better = cand < new
            new[better], pick[better] = cand[better], k
        best = new
        picks.append(pick)
    choice, c = {}, resolution
    for p, (bits, units, _), pick in zip(reversed(paths), reversed(options), reversed(picks)):
        k = int(pick[c])
        choice[p] = bits[k]
        c -= units[k]
    return {p: choice[p] for p in paths}
