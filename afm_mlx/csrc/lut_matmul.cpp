// A CPU LUT-matmul primitive for MLX: y = x @ W.T with W stored as packed LUT indices.
//
// W is (N, K): row n holds K indices of `bits` bits, packed LSB-first in blocks of 8 indices per
// `bits` bytes (afm_mlx.packing), each row ceil(K * bits / 8) bytes. Every `group_size` rows
// (axis 0) or columns (axis 1) share one fp16 LUT of 2^bits entries. x is (M, K) with small M
// (decode): the kernel decodes each index once, looks its value up in a LUT held in registers
// (AVX-512: one permute for up to 16 entries; AVX2: two permutes and a blend), and accumulates
// up to 8 rows of x at once (more rows: blocks of 8). Rows of W are split over a small thread
// pool. Long prefills (many rows) stay in Python: dequantize one layer, then a BLAS GEMM.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <thread>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define AFM_X86 1
#endif

namespace mx = mlx::core;
namespace nb = nanobind;

namespace {

constexpr int kMaxRows = 8;      // rows of x one pass over W serves (registers per row)
constexpr int kMaxBatch = 256;  // rows of x the op accepts (blocks of kMaxRows)

struct Params {
  int bits, group_size, axis;
  int M, N, K;
  int row_bytes;
};

// --- a persistent thread pool ---------------------------------------------------------------

class Pool {
 public:
  explicit Pool(int threads) {
    for (int i = 1; i < threads; ++i) {
      workers_.emplace_back([this] { work(); });
    }
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
  }
  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Runs fn(task) for task in [0, tasks) on every thread, the caller included; returns when done.
  void run(int tasks, const std::function<void(int)>& fn) {
    if (tasks <= 1 || workers_.empty()) {
      for (int t = 0; t < tasks; ++t) fn(t);
      return;
    }
    std::lock_guard<std::mutex> serial(serial_);  // one job at a time (several MLX streams)
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &fn;
      tasks_ = tasks;
      next_.store(0);
      busy_ = static_cast<int>(workers_.size());
      ++generation_;
    }
    wake_.notify_all();
    drain();
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return busy_ == 0; });
    job_ = nullptr;
  }

 private:
  void drain() {
    for (int t = next_.fetch_add(1); t < tasks_; t = next_.fetch_add(1)) (*job_)(t);
  }
  void work() {
    long seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
      }
      drain();
      std::lock_guard<std::mutex> lock(mutex_);
      if (--busy_ == 0) done_.notify_one();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mutex_, serial_;
  std::condition_variable wake_, done_;
  const std::function<void(int)>* job_ = nullptr;
  std::atomic<int> next_{0};
  int tasks_ = 0, busy_ = 0;
  long generation_ = 0;
  bool stop_ = false;
};

int default_threads() {
  if (const char* env = std::getenv("AFM_MLX_LUT_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

Pool& pool() {
  static Pool p(default_threads());
  return p;
}

// --- index decoding -------------------------------------------------------------------------

// Index k of a row: bits [k * bits, (k + 1) * bits) of the row's LSB-first bit stream.
inline int index_at(const uint8_t* row, int k, int bits) {
  int bit = k * bits, byte = bit >> 3, shift = bit & 7;
  unsigned v = row[byte] >> shift;
  if (shift + bits > 8) v |= unsigned(row[byte + 1]) << (8 - shift);
  return int(v & ((1u << bits) - 1));
}

// LUT of row n (axis 0) or of column group g (axis 1), as fp32.
inline void load_lut(const mx::float16_t* lut, int group, int entries, float* out) {
  const mx::float16_t* src = lut + size_t(group) * entries;
  for (int i = 0; i < entries; ++i) out[i] = static_cast<float>(src[i]);
}

// --- portable kernel (any bits, any shape) ------------------------------------------------------

void rows_scalar(const float* x, const uint8_t* packed, const mx::float16_t* lut, float* y,
                 const Params& p, int n0, int n1) {
  const int entries = 1 << p.bits;
  std::vector<float> table(entries);
  int loaded = -1;
  float acc[kMaxRows];
  for (int n = n0; n < n1; ++n) {
    const uint8_t* row = packed + size_t(n) * p.row_bytes;
    std::fill(acc, acc + p.M, 0.0f);
    for (int k = 0; k < p.K; ++k) {
      int group = p.axis == 0 ? n / p.group_size : k / p.group_size;
      if (group != loaded) {
        load_lut(lut, group, entries, table.data());
        loaded = group;
      }
      float w = table[index_at(row, k, p.bits)];
      for (int m = 0; m < p.M; ++m) acc[m] += w * x[size_t(m) * p.K + k];
    }
    for (int m = 0; m < p.M; ++m) y[size_t(m) * p.N + n] = acc[m];
  }
}

#ifdef AFM_X86

// --- AVX2: 8 indices per step ------------------------------------------------------------------

// 8 indices live in `BITS` bytes. Split into two 4-index windows (4 * BITS <= 32 bits), put each
// in 4 lanes and shift lane j of a window right by j * BITS.
template <int BITS>
__attribute__((target("avx2,fma"))) inline __m256i decode8(const uint8_t* src) {
  uint64_t w = 0;
  std::memcpy(&w, src, BITS);
  const uint64_t lo_mask = (uint64_t(1) << (4 * BITS)) - 1;
  const int lo = int(w & lo_mask), hi = int((w >> (4 * BITS)) & lo_mask);
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
                                                   const mx::float16_t* lut, float* y,
                                                   const Params& p, int n0, int n1) {
  constexpr int entries = 1 << BITS;
  alignas(32) float table[entries < 16 ? 16 : entries] = {};
  __m256 t0 = _mm256_setzero_ps(), t1 = _mm256_setzero_ps();
  int loaded = -1;
  // (A lambda would not inherit this function's target ISA, so the LUT load is spelled out.)
#define AFM_LOAD_LUT8(group)                          \
  if ((group) != loaded) {                            \
    loaded = (group);                                 \
    load_lut(lut, loaded, entries, table);            \
    t0 = _mm256_load_ps(table);                       \
    t1 = _mm256_load_ps(table + 8);                   \
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

__attribute__((target("avx512f"))) inline float hsum16(__m512 v) {
  return _mm512_reduce_add_ps(v);
}

// Rows [n0, n1) for M = MROWS; BITS <= 4, K % 16 == 0 and (axis 1) group_size % 16 == 0.
template <int BITS, int MROWS>
__attribute__((target("avx512f"))) void rows_avx512(const float* x, const uint8_t* packed,
                                                   const mx::float16_t* lut, float* y,
                                                   const Params& p, int n0, int n1) {
  static_assert(BITS <= 4, "one register holds a LUT of at most 16 entries");
  constexpr int entries = 1 << BITS;
  alignas(64) float table[16] = {};
  __m512 t = _mm512_setzero_ps();
  int loaded = -1;
#define AFM_LOAD_LUT16(group)                         \
  if ((group) != loaded) {                            \
    loaded = (group);                                 \
    load_lut(lut, loaded, entries, table);            \
    t = _mm512_load_ps(table);                        \
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
    for (int m = 0; m < MROWS; ++m) y[size_t(m) * p.N + n] = hsum16(acc[m]);
  }
#undef AFM_LOAD_LUT16
}

#endif  // AFM_X86

using RowsFn = void (*)(const float*, const uint8_t*, const mx::float16_t*, float*,
                        const Params&, int, int);

template <template <int, int> class Pick, int BITS, int... Ms>
RowsFn pick_rows(int m, std::integer_sequence<int, Ms...>) {
  RowsFn fn = nullptr;
  ((m == Ms + 1 ? (fn = Pick<BITS, Ms + 1>::fn, 0) : 0), ...);
  return fn;
}

#ifdef AFM_X86
template <int BITS, int M>
struct Avx2Rows {
  static constexpr RowsFn fn = rows_avx2<BITS, M>;
};

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

template <int BITS, int M>
struct Avx512Rows4 {  // AVX-512 covers BITS <= 4; wider LUTs take the AVX2 gather path
  static constexpr RowsFn fn = BITS <= 4 ? rows_avx512<(BITS <= 4 ? BITS : 4), M> : nullptr;
};
#endif

struct CpuFeatures {
  bool avx2 = false, avx512 = false;
  CpuFeatures() {
#ifdef AFM_X86
    __builtin_cpu_init();
    avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    avx512 = __builtin_cpu_supports("avx512f");
#endif
  }
};

const CpuFeatures& cpu() {
  static CpuFeatures features;
  return features;
}

// The widest path this CPU, shape and layout allow ("avx512", "avx2" or "scalar"), unless
// AFM_MLX_LUT_ISA caps it (tests use it to exercise every path on one machine).
std::string isa_for(const Params& p) {
  std::string cap = std::getenv("AFM_MLX_LUT_ISA") ? std::getenv("AFM_MLX_LUT_ISA") : "avx512";
  bool avx512_ok = cap == "avx512" && cpu().avx512 && p.bits <= 4 && p.K % 16 == 0 &&
                   (p.axis == 0 || p.group_size % 16 == 0);
  if (avx512_ok) return "avx512";
  bool avx2_ok = cap != "scalar" && cpu().avx2 && p.K % 8 == 0 &&
                 (p.axis == 0 || p.group_size % 8 == 0);
  return avx2_ok ? "avx2" : "scalar";
}

RowsFn rows_fn(const Params& p) {
#ifdef AFM_X86
  std::string isa = isa_for(p);
  if (isa == "avx512") return by_bits<Avx512Rows4>(p.bits, p.M);
  if (isa == "avx2") return by_bits<Avx2Rows>(p.bits, p.M);
#endif
  return rows_scalar;
}

// Rows of x go through the kernels kMaxRows at a time (each block decodes W once more).
void run(const float* x, const uint8_t* packed, const mx::float16_t* lut, float* y,
         const Params& p) {
  const int blocks = (p.M + kMaxRows - 1) / kMaxRows;
  // Tasks of whole rows of W, enough to balance the threads, none so small that syncing dominates.
  const long weights = long(p.N) * p.K;
  const int threads = weights < (1 << 16) ? 1 : pool().size();
  const int tasks = std::min(p.N, threads * 4);
  const int per = (p.N + tasks - 1) / tasks;
  for (int b = 0; b < blocks; ++b) {
    Params q = p;
    q.M = std::min(kMaxRows, p.M - b * kMaxRows);
    const float* xb = x + size_t(b) * kMaxRows * p.K;
    float* yb = y + size_t(b) * kMaxRows * p.N;
    RowsFn fn = rows_fn(q);
    auto task = [&](int t) {
      int n0 = t * per, n1 = std::min(p.N, n0 + per);
      if (n0 < n1) fn(xb, packed, lut, yb, q, n0, n1);
    };
    if (threads == 1) {
      fn(xb, packed, lut, yb, q, 0, p.N);
    } else {
      pool().run(tasks, task);
    }
  }
}

// --- the MLX primitive ------------------------------------------------------------------------

class LutMatmul : public mx::UnaryPrimitive {
 public:
  LutMatmul(mx::Stream stream, Params p) : mx::UnaryPrimitive(stream), p_(p) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& x = inputs[0];
    auto& packed = inputs[1];
    auto& lut = inputs[2];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(x);
    encoder.set_input_array(packed);
    encoder.set_input_array(lut);
    encoder.set_output_array(out);
    encoder.dispatch([x, packed, lut, out, p = p_]() mutable {
      const float* xs = x.data<float>();
      float* ys = out.data<float>();
      run(xs, packed.data<uint8_t>(), lut.data<mx::float16_t>(), ys, p);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("afm_lut_matmul runs on the CPU only");
  }

  const char* name() const override { return "AfmLutMatmul"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const LutMatmul&>(other);
    return p_.bits == o.p_.bits && p_.group_size == o.p_.group_size && p_.axis == o.p_.axis &&
           p_.M == o.p_.M && p_.N == o.p_.N && p_.K == o.p_.K;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>&) override {
    return {{p_.M, p_.N}};
  }

 private:
  Params p_;
};

void check(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("lut_matmul: " + what);
}

// y = x @ W.T for x (..., K) with at most kMaxRows rows; float32 compute, result in x's dtype.
mx::array lut_matmul(const mx::array& x, const mx::array& packed, const mx::array& lut, int bits,
                     int group_size, int axis, int in_dims) {
  check(bits == 1 || bits == 2 || bits == 3 || bits == 4 || bits == 6 || bits == 8,
        "bits must be 1, 2, 3, 4, 6 or 8");
  check(axis == 0 || axis == 1, "axis must be 0 or 1");
  check(packed.ndim() == 2 && packed.dtype() == mx::uint8, "packed must be a 2-D uint8 array");
  check(lut.ndim() == 2 && lut.dtype() == mx::float16 && lut.shape(1) == (1 << bits),
        "lut must be (groups, 2**bits) float16");
  check(x.ndim() >= 1 && x.shape(-1) == in_dims, "x's last axis must equal in_dims");
  const int N = packed.shape(0), K = in_dims;
  check(packed.shape(1) == (K * bits + 7) / 8, "packed rows do not hold in_dims indices");
  check(group_size > 0 && (axis == 0 ? N : K) % group_size == 0 &&
            lut.shape(0) == (axis == 0 ? N : K) / group_size,
        "lut groups do not match group_size");
  const int M = static_cast<int>(x.size() / std::max(1, K));
  check(M >= 1 && M <= kMaxBatch, "the kernel takes 1 to 256 rows of x");
  auto s = mx::default_stream(mx::Device::cpu);
  auto x2 = mx::contiguous(mx::astype(mx::reshape(x, {M, K}, s), mx::float32, s), false, s);
  Params p{bits, group_size, axis, M, N, K, int(packed.shape(1))};
  auto y = mx::array({M, N}, mx::float32, std::make_shared<LutMatmul>(s, p),
                     {x2, mx::contiguous(packed, false, s), mx::contiguous(lut, false, s)});
  auto shape = x.shape();
  shape.back() = N;
  return mx::astype(mx::reshape(y, shape, s), x.dtype(), s);
}

std::string isa(int bits, int in_dims, int group_size, int axis) {
  Params p{bits, group_size, axis, 1, 1, in_dims, 0};
  return isa_for(p);
}

}  // namespace

NB_MODULE(_lut_cpu, m) {
  m.doc() = "afm_mlx's CPU LUT-matmul kernel (an MLX primitive)";
  m.def("lut_matmul", &lut_matmul, nb::arg("x"), nb::arg("packed"), nb::arg("lut"),
        nb::arg("bits"), nb::arg("group_size"), nb::arg("axis"), nb::arg("in_dims"),
        "y = x @ W.T, W given as packed LUT indices (1..256 rows of x, float32 compute).");
  m.def("isa", &isa, nb::arg("bits"), nb::arg("in_dims"), nb::arg("group_size"), nb::arg("axis"),
        "The instruction set the kernel uses for this layout: avx512, avx2 or scalar.");
  m.def("threads", [] { return pool().size(); }, "Threads the kernel splits rows over.");
  m.attr("mlx_version") = mx::version();
  m.attr("max_rows") = kMaxBatch;
}
