"""A palettized weight's settings and its decode: the supported bit widths, the check that a
(bits, group size, axis) choice fits a weight, and the LUT gather back to a dense weight.

A group is ``group_size`` output channels (rows, ``axis=0``: Apple's and coremltools'
"per_grouped_channel") or input columns (``axis=1``) sharing one LUT of ``2**bits`` values.
"""

from __future__ import annotations

import mlx.core as mx

SUPPORTED_BITS = (1, 2, 3, 4, 6, 8)


def check_palettization_settings(
    shape: tuple[int, ...], bits: int, group_size: int, axis: int
) -> int:
    """Validate settings for a 2-D weight of ``shape``; return the number of groups (LUTs)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(
            f"bits={bits} is not supported; use one of {', '.join(map(str, SUPPORTED_BITS))}"
        )
    if axis not in (0, 1):
        raise ValueError(f"axis={axis} is not supported; use 0 (output channels) or 1 (inputs)")
    if len(shape) != 2:
        raise ValueError(f"palettization needs a 2-D weight, got shape {tuple(shape)}")
    channels = shape[axis]
    if not isinstance(group_size, int) or group_size < 1 or channels % group_size != 0:
        what = "output channels (axis=0)" if axis == 0 else "input columns (axis=1)"
        raise ValueError(
            f"group_size={group_size} does not divide the {channels} {what} of a "
            f"{shape[0]}x{shape[1]} weight; pick a divisor of {channels}"
        )
    return channels // group_size


def grouped(w: mx.array, group_size: int, axis: int) -> mx.array:
    """(n_groups, values_per_group) view of ``w``; rows of the result are the LUT groups."""
    if axis == 1:
        w = w.T
    return w.reshape(w.shape[0] // group_size, -1)


def ungrouped(x: mx.array, shape: tuple[int, int], axis: int) -> mx.array:
    if axis == 1:
        return x.reshape(shape[1], shape[0]).T
    return x.reshape(shape)


def lut_to_dense(lut: mx.array, indices: mx.array, group_size: int, axis: int = 0) -> mx.array:
    """Dense (out, in) weight from ``lut`` (n_groups, 2**bits) and unpacked ``indices`` (out, in).

    Each group's indices are laid out as one row so a single gather reads them from the group's
    LUT (no repeated tables, no widened indices: the fallback decode path runs this per layer).
    """
    rows, cols = indices.shape
    groups = lut.shape[0]
    if axis == 0:
        return mx.take_along_axis(lut, indices.reshape(groups, -1), axis=-1).reshape(rows, cols)
    by_group = indices.reshape(rows, groups, group_size).transpose(1, 0, 2).reshape(groups, -1)
    dense = mx.take_along_axis(lut, by_group, axis=-1).reshape(groups, rows, group_size)
    return dense.transpose(1, 0, 2).reshape(rows, cols)
