"""The GPU LUT-matmul kernel: one body for Apple GPUs (``mx.fast.metal_kernel``) and NVIDIA
GPUs (``mx.fast.cuda_kernel``, MLX's CUDA backend), its layouts, and its launch.

Which kernel runs, and the check at first use, are ``afm_mlx.palettization.kernels``'.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import mlx.core as mx

# --- the GPU kernel: one body for Apple GPUs (Metal) and NVIDIA GPUs (CUDA) ----------------------
# Laid out like MLX's quantized GEMV: a simdgroup (warp) of 32 lanes computes ROWS output rows at
# once, so each lane loads its inputs once for all of them; lane l takes the chunks l, l + 32, ...
# of every row, a chunk being VEC blocks of 8 indices (VEC * BITS bytes, read as one 1- to
# 16-byte word where BITS is 1, 2, 4 or 8); the chunks of all ROWS rows are loaded before any is
# decoded (more loads in flight). With groups along axis 0 (one LUT per row) the rows' LUTs sit,
# with LUT_SHARED, in the simdgroup's slice of threadgroup memory (on an H200 1.5-3x faster than
# registers, which an index known only at run time sends to local memory), else in
# registers (up to 16 entries); per-column LUTs are read from device memory. fp32 accumulation,
# one simd_sum per row.
# ROWS, SIMDGROUPS, LUT_SHARED and VEC are template constants (``GPU_LAYOUTS``); each backend's
# prologue names the thread indices and the three primitives the body uses.

GPU_BODY = """
    constexpr int ROW_BYTES = K * BITS / 8;
    constexpr int CHUNK = VEC * BITS;  // bytes of a row a lane reads per step: VEC blocks of 8
    constexpr bool WORDS = BITS == 1 || BITS == 2 || BITS == 4 || BITS == 8;
    constexpr u64 MASK = (u64(1) << BITS) - 1;
    constexpr bool SHARED = LUT_SHARED && AXIS == 0;  // rows' LUTs in threadgroup memory
    constexpr bool REGS = !LUT_SHARED && AXIS == 0 && LUT_SIZE <= 16;  // or in registers
    constexpr int TABLE = REGS ? LUT_SIZE : 1;
    TG_SHARED float shared_table[SHARED ? SIMDGROUPS * ROWS * LUT_SIZE : 1];
    const int n0 = (row_block * SIMDGROUPS + simdgroup) * ROWS;
    if (n0 >= N) {
        return;
    }
    float acc[ROWS];
    float table[ROWS][TABLE];
    for (int r = 0; r < ROWS; ++r) {
        acc[r] = 0.0f;
        const int n = min(n0 + r, N - 1);
        if (REGS) {
            for (int i = 0; i < TABLE; ++i) {
                table[r][i] = float(lut[(n / GS) * LUT_SIZE + i]);
            }
        }
    }
    const int slice = simdgroup * ROWS * LUT_SIZE;
    if (SHARED) {
        for (int i = lane; i < ROWS * LUT_SIZE; i += 32) {
            const int n = min(n0 + i / LUT_SIZE, N - 1);
            shared_table[slice + i] = float(lut[(n / GS) * LUT_SIZE + i % LUT_SIZE]);
        }
        SIMD_SYNC();
    }
    for (int c = lane; c < K / (8 * VEC); c += 32) {
        const int k = c * 8 * VEC;
        u64 words[ROWS][VEC];
        for (int r = 0; r < ROWS; ++r) {
            const int off = min(n0 + r, N - 1) * ROW_BYTES + c * CHUNK;
            uint32_t raw[4] = {0, 0, 0, 0};
            if (WORDS && CHUNK == 16) {
                const uint4 q = PACKED_AS(uint4, off);
                raw[0] = q.x;
                raw[1] = q.y;
                raw[2] = q.z;
                raw[3] = q.w;
            } else if (WORDS && CHUNK == 8) {
                const uint2 q = PACKED_AS(uint2, off);
                raw[0] = q.x;
                raw[1] = q.y;
            } else if (WORDS && CHUNK == 4) {
                raw[0] = PACKED_AS(uint32_t, off);
            } else if (WORDS && CHUNK == 2) {
                raw[0] = PACKED_AS(uint16_t, off);
            } else if (WORDS && CHUNK == 1) {
                raw[0] = packed[off];
            }
            for (int v = 0; v < VEC; ++v) {
                u64 word = 0;
                if (WORDS && CHUNK <= 16) {
                    const int bit0 = v * BITS * 8;
                    word = u64(raw[bit0 / 32]) >> (bit0 % 32);
                    if (BITS == 8) {
                        word |= u64(raw[bit0 / 32 + 1]) << 32;
                    }
                } else {
                    for (int b = 0; b < BITS; ++b) {
                        word |= u64(packed[off + v * BITS + b]) << (8 * b);
                    }
                }
                words[r][v] = word;
            }
        }
        for (int v = 0; v < VEC; ++v) {
            float xv[8];
            for (int j = 0; j < 8; ++j) {
                xv[j] = float(x[m * K + k + v * 8 + j]);
            }
            for (int r = 0; r < ROWS; ++r) {
                const int n = min(n0 + r, N - 1);
                for (int j = 0; j < 8; ++j) {
                    const int idx = int((words[r][v] >> (j * BITS)) & MASK);
                    const int g = AXIS == 0 ? n / GS : (k + v * 8 + j) / GS;
                    float w;
                    if (SHARED) {
                        w = shared_table[slice + r * LUT_SIZE + idx];
                    } else if (REGS) {
                        w = table[r][idx];
                    } else {
                        w = float(lut[g * LUT_SIZE + idx]);
                    }
                    acc[r] += xv[j] * w;
                }
            }
        }
    }
    for (int r = 0; r < ROWS; ++r) {
        const float total = simd_sum(acc[r]);
        if (lane == 0 && n0 + r < N) {
            out[m * N + n0 + r] = T(total);
        }
    }
"""


METAL_PROLOGUE = """
    typedef ulong u64;
#define PACKED_AS(TYPE, off) (*((const device TYPE*)(packed + (off))))
#define TG_SHARED threadgroup
#define SIMD_SYNC() simdgroup_barrier(mem_flags::mem_threadgroup)
    const int lane = int(thread_index_in_simdgroup);
    const int simdgroup = int(simdgroup_index_in_threadgroup);
    const int row_block = int(threadgroup_position_in_grid.y);
    const int m = int(threadgroup_position_in_grid.z);
"""


CUDA_PROLOGUE = """
    typedef unsigned long long u64;
#define PACKED_AS(TYPE, off) (*reinterpret_cast<const TYPE*>(packed + (off)))
#define TG_SHARED __shared__
#define SIMD_SYNC() __syncwarp()
    const int lane = int(threadIdx.x % 32);
    const int simdgroup = int(threadIdx.x / 32);
    const int row_block = int(blockIdx.y);
    const int m = int(blockIdx.z);
"""


CUDA_HEADER = """
__device__ inline float simd_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(0xffffffff, v, offset);
    }
    return v;
}
"""


class GpuLayout(NamedTuple):
    """How the GPU kernel spreads the work: output rows per simdgroup, simdgroups per
    threadgroup, whether per-row LUTs sit in threadgroup memory (else in registers), and how many
    blocks of 8 indices a lane reads at once."""

    rows: int = 4
    simdgroups: int = 2
    lut_shared: bool = False
    vec: int = 1  # blocks of 8 indices a lane reads at once (used where K is a multiple of 8 vec)


# The layout each backend runs. Metal's is the first design (never timed: no Apple GPU here);
# CUDA's was chosen by timing the candidates of scripts/gpu_kernel_check.py on an H200.
GPU_LAYOUTS: dict[str, GpuLayout] = {
    "metal": GpuLayout(),
    "cuda": GpuLayout(rows=4, simdgroups=2, lut_shared=True, vec=1),
}
# The layouts scripts/gpu_kernel_check.py times (and the tests check on an emulated simdgroup).
# A first timing on an H200 (commit 31a0f9e) put LUTs in registers 1.5-3x behind threadgroup
# memory, and 4 blocks per lane behind 1: the candidates vary the work per simdgroup and
# threadgroup around the rest; the first candidate, Metal's layout, keeps them in registers.
GPU_CANDIDATES = (GpuLayout(),) + tuple(
    GpuLayout(rows, simdgroups, True, vec)
    for rows in (2, 4, 8)
    for simdgroups in (2, 4, 8)
    for vec in (1, 2)
)
SHARED_TABLE_BYTES = 16384  # most threadgroup memory the kernel's LUTs take; more: device memory
_gpu_kernels: dict[str, Callable] = {}


def _gpu_kernel(backend_name: str) -> Callable:
    if backend_name not in _gpu_kernels:
        common = {"input_names": ["x", "packed", "lut"], "output_names": ["out"]}
        if backend_name == "metal":
            kernel = mx.fast.metal_kernel(
                name="afm_lut_gemv", source=METAL_PROLOGUE + GPU_BODY, **common
            )
        else:
            kernel = mx.fast.cuda_kernel(
                name="afm_lut_gemv", source=CUDA_PROLOGUE + GPU_BODY, header=CUDA_HEADER, **common
            )
        _gpu_kernels[backend_name] = kernel
    return _gpu_kernels[backend_name]


def lut_matmul_gpu(
    backend_name: str,
    x: mx.array,
    packed: mx.array,
    lut: mx.array,
    bits: int,
    group_size: int,
    axis: int,
    layout: GpuLayout | None = None,
) -> mx.array:
    """``x @ W.T`` straight from packed indices and LUTs on a Metal or CUDA GPU (rows of ``x`` a
    multiple of 8 wide), in ``layout`` (default: the backend's ``GPU_LAYOUTS`` entry). Checked at
    first use like every kernel."""
    layout = layout or GPU_LAYOUTS[backend_name]
    in_dims, out_dims = x.shape[-1], packed.shape[0]
    if in_dims % 8:
        raise ValueError("the GPU LUT kernel needs rows a multiple of 8 wide")
    x2 = x.reshape(-1, in_dims)
    rows = x2.shape[0]
    template, threads, blocks = _launch(
        x.dtype, bits, group_size, axis, in_dims, out_dims, lut.shape[1], layout
    )
    (out,) = _gpu_kernel(backend_name)(
        inputs=[x2, packed, lut],
        template=template,
        grid=(threads, blocks, rows),
        threadgroup=(threads, 1, 1),
        output_shapes=[(rows, out_dims)],
        output_dtypes=[x.dtype],
    )
    return out.reshape(*x.shape[:-1], out_dims)


@functools.lru_cache(maxsize=1024)
def _launch(dtype, bits, group_size, axis, in_dims, out_dims, lut_size, layout: GpuLayout):
    """The template constants, threads per threadgroup and row blocks of one call (cached: a
    decode step makes this call for every projection)."""
    shared = layout.lut_shared and layout.simdgroups * layout.rows * lut_size * 4 <= (
        SHARED_TABLE_BYTES
    )
    template = [
        ("T", dtype),
        ("BITS", bits),
        ("GS", group_size),
        ("AXIS", axis),
        ("K", in_dims),
        ("N", out_dims),
        ("LUT_SIZE", lut_size),
        ("ROWS", layout.rows),
        ("SIMDGROUPS", layout.simdgroups),
        ("LUT_SHARED", shared),
        ("VEC", layout.vec if in_dims % (8 * layout.vec) == 0 else 1),
    ]
    blocks = -(-out_dims // (layout.rows * layout.simdgroups))
    return template, 32 * layout.simdgroups, blocks


def lut_matmul_metal(x, packed, lut, bits, group_size, axis):
    return lut_matmul_gpu("metal", x, packed, lut, bits, group_size, axis)


def lut_matmul_cuda(x, packed, lut, bits, group_size, axis):
    return lut_matmul_gpu("cuda", x, packed, lut, bits, group_size, axis)
