// A CPU LUT-matmul primitive for MLX: y = x @ W.T with W stored as packed LUT indices.
//
// W is (N, K): row n holds K indices of `bits` bits, packed LSB-first in blocks of 8 indices per
// `bits` bytes (afm_mlx.palettization.packing), each row ceil(K * bits / 8) bytes. Every `group_size` rows
// (axis 0) or columns (axis 1) share one fp16 LUT of 2^bits entries. For small M (decode, short
// prefills) the row kernels (lut_rows.h) decode each index once, look its value up in a LUT held
// in registers (AVX-512: one permute for up to 16 entries; AVX2: two permutes and a blend;
// NEON: a 64-byte table lookup), and accumulate up to 8 rows of x at once (more rows: blocks of
// 8). Rows of W are split over a small thread pool. Long prefills stay in Python: dequantize one
// layer, then a BLAS GEMM.

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

#include "lut_rows.h"

namespace mx = mlx::core;
namespace nb = nanobind;

namespace {

using afm::kMaxRows;
using afm::Params;
using afm::RowsFn;
constexpr int kMaxBatch = 256;  // rows of x the op accepts (blocks of kMaxRows)

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

// Rows of x go through the kernels kMaxRows at a time (each block decodes W once more).
void run(const float* x, const uint8_t* packed, const uint16_t* lut, float* y,
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
    RowsFn fn = afm::rows_fn(q);
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
      // fp16 LUT entries go to the kernels as raw bits (they convert them once per group).
      run(xs, packed.data<uint8_t>(), reinterpret_cast<const uint16_t*>(lut.data<mx::float16_t>()),
          ys, p);
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
  return afm::isa_for(p);
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
