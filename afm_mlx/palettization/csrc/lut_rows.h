// The LUT-matmul row kernels, free of MLX so that a small harness can test every path (the NEON
// one too, cross-compiled and run under qemu: tests/test_lut_kernels.py).
//
// y[m, n] = sum_k x[m, k] * LUT[group(n, k)][index(n, k)] for rows n in [n0, n1) and M <= 8 rows
// of x. W's row n holds K indices of `bits` bits, LSB-first in blocks of 8 indices per `bits`
// bytes (afm_mlx.palettization.packing), ceil(K * bits / 8) bytes per row. Every `group_size` rows (axis 0) or
// columns (axis 1) share one LUT of 2^bits fp16 values (given as their raw bits).

#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define AFM_X86 1
#elif defined(__aarch64__)
#include <arm_neon.h>
#define AFM_NEON 1
#endif

namespace afm {

constexpr int kMaxRows = 8;  // rows of x one pass over W serves (an accumulator per row)

struct Params {
  int bits, group_size, axis;
  int M, N, K;
  int row_bytes;
};

using RowsFn = void (*)(const float*, const uint8_t*, const uint16_t*, float*, const Params&,
                        int, int);

// IEEE half (raw bits) -> float, subnormals, infinities and NaN included.
inline float half_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000 | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalize
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while (!(man & 0x400));
    bits = sign | uint32_t(112 - e) << 23 | ((man & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// LUT of row group / column group `group`, as fp32.
inline void load_lut(const uint16_t* lut, int group, int entries, float* out) {
  const uint16_t* src = lut + size_t(group) * entries;
  for (int i = 0; i < entries; ++i) out[i] = half_to_float(src[i]);
}

// Index k of a row: bits [k * bits, (k + 1) * bits) of the row's LSB-first bit stream.
inline int index_at(const uint8_t* row, int k, int bits) {
  int bit = k * bits, byte = bit >> 3, shift = bit & 7;
  unsigned v = row[byte] >> shift;
  if (shift + bits > 8) v |= unsigned(row[byte + 1]) << (8 - shift);
  return int(v & ((1u << bits) - 1));
}

// --- portable kernel: any bits, any shape ------------------------------------------------------

inline void rows_scalar(const float* x, const uint8_t* packed, const uint16_t* lut, float* y,
                        const Params& p, int n0, int n1) {
  const int entries = 1 << p.bits;
  float table[256];
  int loaded = -1;
  float acc[kMaxRows];
  for (int n = n0; n < n1; ++n) {
    const uint8_t* row = packed + size_t(n) * p.row_bytes;
    for (int m = 0; m < p.M; ++m) acc[m] = 0.0f;
    for (int k = 0; k < p.K; ++k) {
      int group = p.axis == 0 ? n / p.group_size : k / p.group_size;
      if (group != loaded) {
        load_lut(lut, group, entries, table);
        loaded = group;
      }
      float w = table[index_at(row, k, p.bits)];
      for (int m = 0; m < p.M; ++m) acc[m] += w * x[size_t(m) * p.K + k];
    }
    for (int m = 0; m < p.M; ++m) y[size_t(m) * p.N + n] = acc[m];
  }
}

// The 8 indices of a block live in `BITS` bytes; split them into two 4-index windows
// (4 * BITS <= 32 bits each): every vector path shifts lane j of a window right by j * BITS.
template <int BITS>
inline void windows8(const uint8_t* src, uint32_t& lo, uint32_t& hi) {
  uint64_t w = 0;
  std::memcpy(&w, src, BITS);
  const uint64_t mask = (uint64_t(1) << (4 * BITS)) - 1;
  lo = uint32_t(w & mask);
  hi = uint32_t((w >> (4 * BITS)) & mask);
}

#ifdef AFM_X86

// --- AVX2: 8 indices per step ------------------------------------------------------------------

template <int BITS>
__attribute__((target("avx2,fma"))) inline __m256i decode8(const uint8_t* src) {
  uint32_t lo, hi;
  windows8<BITS>(src, lo, hi);
  const __m256i v = _mm256_set_epi32(hi, hi, hi, hi, lo, lo, lo, lo);
  const __m256i shifts = _mm256_set_epi32(3 * BITS, 2 * BITS, BITS, 0, 3 * BITS, 2 * BITS, BITS, 0);
  return _mm256_and_si256(_mm256_srlv_epi32(v, shifts), _mm256_set1_epi32((1 << BITS) - 1));
}

template <int BITS>
__attribute__((target("avx2,fma"))) inline __m256 lookup8(__m256i idx, __m256 t0, __m256 t1,
                                                          const float* table) {
  if constexpr (BITS <= 3) {
    return _mm256_permutevar8x32_ps(t0, idx);
  } else if constexpr (BITS == 4) {
    __m256 a = _mm256_permutevar8x32_ps(t0, idx), b = _mm256_permutevar8x32_ps(t1, idx);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
  } else {
    return _mm256_i32gather_ps(table, idx, 4);
  }
}

__attribute__((target("avx2,fma"))) inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Rows [n0, n1) for M = MROWS; K % 8 == 0 and (axis 1) group_size % 8 == 0.
template <int BITS, int MROWS>
__attribute__((target("avx2,fma"))) void rows_avx2(const float* x, const uint8_t* packed,
                                                   const uint16_t* lut, float* y,
                                                   const Params& p, int n0, int n1) {
  constexpr int entries = 1 << BITS;
  alignas(32) float table[entries < 16 ? 16 : entries] = {};
  __m256 t0 = _mm256_setzero_ps(), t1 = _mm256_setzero_ps();
  int loaded = -1;
  // (A lambda would not inherit this function's target ISA, so the LUT load is spelled out.)
#define AFM_LOAD_LUT8(group)               \
  if ((group) != loaded) {                 \
    loaded = (group);                      \
    load_lut(lut, loaded, entries, table); \
    t0 = _mm256_load_ps(table);            \
    t1 = _mm256_load_ps(table + 8);        \
  }
  for (int n = n0; n < n1; ++n) {
    const uint8_t* row = packed + size_t(n) * p.row_bytes;
    if (p.axis == 0) {
      AFM_LOAD_LUT8(n / p.group_size)
    }
    __m256 acc[MROWS];
    for (int m = 0; m < MROWS; ++m) acc[m] = _mm256_setzero_ps();
    for (int k = 0; k < p.K; k += 8) {
      if (p.axis == 1) {
        AFM_LOAD_LUT8(k / p.group_size)
      }
      __m256 w = lookup8<BITS>(decode8<BITS>(row + (k / 8) * BITS), t0, t1, table);
      for (int m = 0; m < MROWS; ++m) {
        acc[m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + size_t(m) * p.K + k), acc[m]);
      }
    }
    for (int m = 0; m < MROWS; ++m) y[size_t(m) * p.N + n] = hsum8(acc[m]);
  }
#undef AFM_LOAD_LUT8
}

// --- AVX-512: 16 indices per step, LUTs of up to 16 entries in one register ---------------------

// 16 indices of BITS <= 4 fit in 64 bits: four 4-index windows (w >> 4*BITS*q) land in 64-bit
// lanes 0..3, their low dwords are spread over the 16 lanes, then lane j shifts by (j % 4) * BITS.
template <int BITS>
__attribute__((target("avx512f"))) inline __m512i decode16(const uint8_t* src) {
  uint64_t w = 0;
  std::memcpy(&w, src, 2 * BITS);
  const __m512i q = _mm512_srlv_epi64(
      _mm512_set1_epi64(int64_t(w)),
      _mm512_set_epi64(0, 0, 0, 0, 12 * BITS, 8 * BITS, 4 * BITS, 0));
  const __m512i spread = _mm512_permutexvar_epi32(
      _mm512_set_epi32(6, 6, 6, 6, 4, 4, 4, 4, 2, 2, 2, 2, 0, 0, 0, 0), q);
  const __m512i shifts = _mm512_set_epi32(3 * BITS, 2 * BITS, BITS, 0, 3 * BITS, 2 * BITS, BITS, 0,
                                          3 * BITS, 2 * BITS, BITS, 0, 3 * BITS, 2 * BITS, BITS, 0);
  return _mm512_and_si512(_mm512_srlv_epi32(spread, shifts), _mm512_set1_epi32((1 << BITS) - 1));
}

// Rows [n0, n1) for M = MROWS; BITS <= 4, K % 16 == 0 and (axis 1) group_size % 16 == 0.
template <int BITS, int MROWS>
__attribute__((target("avx512f"))) void rows_avx512(const float* x, const uint8_t* packed,
                                                   const uint16_t* lut, float* y,
                                                   const Params& p, int n0, int n1) {
  static_assert(BITS <= 4, "one register holds a LUT of at most 16 entries");
  constexpr int entries = 1 << BITS;
  alignas(64) float table[16] = {};
  __m512 t = _mm512_setzero_ps();
  int loaded = -1;
#define AFM_LOAD_LUT16(group)              \
  if ((group) != loaded) {                 \
    loaded = (group);                      \
    load_lut(lut, loaded, entries, table); \
    t = _mm512_load_ps(table);             \
  }
  for (int n = n0; n < n1; ++n) {
    const uint8_t* row = packed + size_t(n) * p.row_bytes;
    if (p.axis == 0) {
      AFM_LOAD_LUT16(n / p.group_size)
    }
    __m512 acc[MROWS];
    for (int m = 0; m < MROWS; ++m) acc[m] = _mm512_setzero_ps();
    for (int k = 0; k < p.K; k += 16) {
      if (p.axis == 1) {
        AFM_LOAD_LUT16(k / p.group_size)
      }
      __m512 w = _mm512_permutexvar_ps(decode16<BITS>(row + (k / 8) * BITS), t);
      for (int m = 0; m < MROWS; ++m) {
        acc[m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + size_t(m) * p.K + k), acc[m]);
      }
    }
    for (int m = 0; m < MROWS; ++m) y[size_t(m) * p.N + n] = _mm512_reduce_add_ps(acc[m]);
  }
#undef AFM_LOAD_LUT16
}

#endif  // AFM_X86

#ifdef AFM_NEON

// --- NEON: 8 indices per step as two 4-lane halves; LUTs of up to 16 fp32 entries (64 bytes)
// looked up with one 4-register byte-table lookup (vqtbl4q_u8), wider ones by scalar loads. ------

template <int BITS>
inline uint32x4_t decode4(uint32_t window) {
  const int32x4_t shifts = {0, -BITS, -2 * BITS, -3 * BITS};  // negative: shift right
  return vandq_u32(vshlq_u32(vdupq_n_u32(window), shifts), vdupq_n_u32((1u << BITS) - 1));
}

template <int BITS>
inline float32x4_t lookup4(uint32x4_t idx, const uint8x16x4_t& bytes, const float* table) {
  if constexpr (BITS <= 4) {
    // Lane i reads bytes 4*idx .. 4*idx+3 of the table: the fp32 LUT entry idx.
    uint32x4_t offsets = vmlaq_n_u32(vdupq_n_u32(0x03020100u), idx, 0x04040404u);
    return vreinterpretq_f32_u8(vqtbl4q_u8(bytes, vreinterpretq_u8_u32(offsets)));
  } else {
    float32x4_t w = vdupq_n_f32(table[vgetq_lane_u32(idx, 0)]);
    w = vsetq_lane_f32(table[vgetq_lane_u32(idx, 1)], w, 1);
    w = vsetq_lane_f32(table[vgetq_lane_u32(idx, 2)], w, 2);
    return vsetq_lane_f32(table[vgetq_lane_u32(idx, 3)], w, 3);
  }
}

// Rows [n0, n1) for M = MROWS; K % 8 == 0 and (axis 1) group_size % 8 == 0.
template <int BITS, int MROWS>
void rows_neon(const float* x, const uint8_t* packed, const uint16_t* lut, float* y,
               const Params& p, int n0, int n1) {
  constexpr int entries = 1 << BITS;
  alignas(16) float table[entries < 16 ? 16 : entries] = {};
  uint8x16x4_t bytes{};
  int loaded = -1;
  auto load = [&](int group) {
    if (group == loaded) return;
    loaded = group;
    load_lut(lut, group, entries, table);
    bytes = vld1q_u8_x4(reinterpret_cast<const uint8_t*>(table));
  };
  for (int n = n0; n < n1; ++n) {
    const uint8_t* row = packed + size_t(n) * p.row_bytes;
    if (p.axis == 0) load(n / p.group_size);
    float32x4_t acc[MROWS];
    for (int m = 0; m < MROWS; ++m) acc[m] = vdupq_n_f32(0.0f);
    for (int k = 0; k < p.K; k += 8) {
      if (p.axis == 1) load(k / p.group_size);
      uint32_t lo, hi;
      windows8<BITS>(row + (k / 8) * BITS, lo, hi);
      float32x4_t w0 = lookup4<BITS>(decode4<BITS>(lo), bytes, table);
      float32x4_t w1 = lookup4<BITS>(decode4<BITS>(hi), bytes, table);
      for (int m = 0; m < MROWS; ++m) {
        const float* xm = x + size_t(m) * p.K + k;
        acc[m] = vfmaq_f32(acc[m], w0, vld1q_f32(xm));
        acc[m] = vfmaq_f32(acc[m], w1, vld1q_f32(xm + 4));
      }
    }
    for (int m = 0; m < MROWS; ++m) y[size_t(m) * p.N + n] = vaddvq_f32(acc[m]);
  }
}

#endif  // AFM_NEON

// --- choosing a path ----------------------------------------------------------------------------

struct CpuFeatures {
  bool avx2 = false, avx512 = false, neon = false;
  CpuFeatures() {
#ifdef AFM_X86
    __builtin_cpu_init();
    avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    avx512 = __builtin_cpu_supports("avx512f");
#endif
#ifdef AFM_NEON
    neon = true;  // part of every AArch64 CPU
#endif
  }
};

inline const CpuFeatures& cpu() {
  static CpuFeatures features;
  return features;
}

// The widest path this CPU, shape and layout allow ("avx512", "avx2", "neon" or "scalar"),
// unless AFM_MLX_LUT_ISA caps it (tests use it to run every path on one machine).
inline std::string isa_for(const Params& p) {
  const char* env = std::getenv("AFM_MLX_LUT_ISA");
  std::string cap = env ? env : "any";
  const bool vector8 = p.K % 8 == 0 && (p.axis == 0 || p.group_size % 8 == 0);
  if (cap == "scalar") return "scalar";
  if (cpu().neon && vector8) return "neon";
  const bool vector16 = p.K % 16 == 0 && (p.axis == 0 || p.group_size % 16 == 0);
  if (cap != "avx2" && cpu().avx512 && p.bits <= 4 && vector16) return "avx512";
  if (cpu().avx2 && vector8) return "avx2";
  return "scalar";
}

template <template <int, int> class Pick, int BITS, int... Ms>
RowsFn pick_rows(int m, std::integer_sequence<int, Ms...>) {
  RowsFn fn = nullptr;
  ((m == Ms + 1 ? (fn = Pick<BITS, Ms + 1>::fn, 0) : 0), ...);
  return fn;
}

template <template <int, int> class Pick>
RowsFn by_bits(int bits, int m) {
  auto ms = std::make_integer_sequence<int, kMaxRows>{};
  switch (bits) {
    case 1: return pick_rows<Pick, 1>(m, ms);
    case 2: return pick_rows<Pick, 2>(m, ms);
    case 3: return pick_rows<Pick, 3>(m, ms);
    case 4: return pick_rows<Pick, 4>(m, ms);
    case 6: return pick_rows<Pick, 6>(m, ms);
    case 8: return pick_rows<Pick, 8>(m, ms);
  }
  return nullptr;
}

#ifdef AFM_X86
template <int BITS, int M>
struct Avx2Rows {
  static constexpr RowsFn fn = rows_avx2<BITS, M>;
};
template <int BITS, int M>
struct Avx512Rows {  // AVX-512 covers BITS <= 4; wider LUTs take the AVX2 gather path
  static constexpr RowsFn fn = BITS <= 4 ? rows_avx512<(BITS <= 4 ? BITS : 4), M> : nullptr;
};
#endif
#ifdef AFM_NEON
template <int BITS, int M>
struct NeonRows {
  static constexpr RowsFn fn = rows_neon<BITS, M>;
};
#endif

// The kernel for p.M <= kMaxRows rows.
inline RowsFn rows_fn(const Params& p) {
  const std::string isa = isa_for(p);
#ifdef AFM_X86
  if (isa == "avx512") return by_bits<Avx512Rows>(p.bits, p.M);
  if (isa == "avx2") return by_bits<Avx2Rows>(p.bits, p.M);
#endif
#ifdef AFM_NEON
  if (isa == "neon") return by_bits<NeonRows>(p.bits, p.M);
#endif
  return rows_scalar;
}

}  // namespace afm
