"""Dense bit-packing of LUT indices into uint8 storage.

Layout: along the last axis, every block of 8 indices becomes ``bits`` bytes, filled from the least
significant bit up (index j of a block occupies bits ``[j*bits, (j+1)*bits)`` of the block's
little-endian integer). That is coremltools' ``pack_elements_into_bits`` order (an LSB-first bit
stream) applied to each row, and a row takes ``ceil(n * bits / 8)`` bytes, its last byte zero-padded.
When ``n * bits`` is a multiple of 8 (any real layer), rows concatenate to Core ML's exact bytes.
"""

from __future__ import annotations

import mlx.core as mx

PACKABLE_BITS = (1, 2, 3, 4, 6, 8)


def _check_bits(bits: int) -> None:
    if bits not in PACKABLE_BITS:
        raise ValueError(
            f"bits={bits} cannot be packed; use one of {', '.join(map(str, PACKABLE_BITS))}"
        )


def packed_length(n: int, bits: int) -> int:
    """Bytes that a row of ``n`` indices of ``bits`` bits takes."""
    _check_bits(bits)
    return -(-n * bits // 8)


def _pieces(bits: int):
    """Static map of which index bits land in which byte of an 8-index block.

    Yields (byte, index, shift) with shift = index's bit offset minus the byte's bit offset, for every
    (byte, index) pair that overlaps.
    """
    for byte in range(bits):
        for j in range(8):
            lo, hi = j * bits, (j + 1) * bits
            if lo < 8 * (byte + 1) and hi > 8 * byte:
                yield byte, j, lo - 8 * byte


def pack_indices(indices: mx.array, bits: int) -> mx.array:
    """Pack uint8 ``indices`` (..., n) with values < 2**bits into (..., packed_length(n, bits))."""
    _check_bits(bits)
    if bits == 8:
        return indices.astype(mx.uint8)
    *lead, n = indices.shape
    pad = -n % 8
    v = indices.astype(mx.uint32)
    if pad:
        v = mx.pad(v, [(0, 0)] * len(lead) + [(0, pad)])
    v = v.reshape(*lead, -1, 8)
    out = [mx.zeros(v.shape[:-1], mx.uint32) for _ in range(bits)]
    for byte, j, shift in _pieces(bits):
        part = v[..., j] << shift if shift >= 0 else v[..., j] >> -shift
        out[byte] = out[byte] | (part & 0xFF)
    packed = mx.stack(out, axis=-1).astype(mx.uint8).reshape(*lead, -1)
    length = packed_length(n, bits)
    return packed[..., :length] if pad else packed


def unpack_indices(packed: mx.array, bits: int, n: int) -> mx.array:
    """Inverse of ``pack_indices``: (..., packed_length(n, bits)) uint8 -> (..., n) uint8."""
    _check_bits(bits)
    if packed.shape[-1] != packed_length(n, bits):
        raise ValueError(
            f"packed rows have {packed.shape[-1]} bytes, expected {packed_length(n, bits)} "
            f"for {n} indices of {bits} bits"
        )
    if bits == 8:
        return packed
    if 8 % bits == 0:  # 1, 2, 4 bits: no index crosses a byte, so stay in uint8 (~8x faster)
        shifts = mx.arange(0, 8, bits, dtype=mx.uint8)
        out = (packed[..., None] >> shifts) & ((1 << bits) - 1)
        out = out.reshape(*packed.shape[:-1], -1)
        return out[..., :n] if out.shape[-1] != n else out
    *lead, length = packed.shape
    b = packed.astype(mx.uint32)
    if length % bits:  # restore the zero bytes of the last, partial block
        b = mx.pad(b, [(0, 0)] * len(lead) + [(0, -length % bits)])
    b = b.reshape(*lead, -1, bits)
    mask = (1 << bits) - 1
    vals = [mx.zeros(b.shape[:-1], mx.uint32) for _ in range(8)]
    for byte, j, shift in _pieces(bits):
        part = b[..., byte] >> shift if shift >= 0 else b[..., byte] << -shift
        vals[j] = vals[j] | (part & mask)
    out = mx.stack(vals, axis=-1).astype(mx.uint8).reshape(*lead, -1)
    return out[..., :n] if out.shape[-1] != n else out
