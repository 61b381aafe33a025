"""The GPU LUT kernel off a GPU: its one body for Metal and CUDA run on an emulated simdgroup
(32 threads and a barrier-based simd_sum, in C++), its CUDA text compiled by nvcc where present,
and scripts/gpu_kernel_check.py refusing to run without a GPU. On a GPU the script itself checks
the kernel against dequantize + matmul (never a CI test: no GPU there)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import mlx.core as mx
import pytest
from conftest import REPO, one_line_error
from test_lut_kernels import _ok

from afm_mlx.palettization import gpu_kernel

EMULATION = r"""
#include <algorithm>
#include <barrier>
#include <cstdint>
#include <cstdio>
#include <random>
#include <thread>
#include <vector>
using std::min;
typedef uint64_t u64;
#define PACKED_AS(TYPE, off) (*reinterpret_cast<const TYPE*>(packed + (off)))
#define TG_SHARED static  // one copy for all threads: a threadgroup's memory
#define SIMD_SYNC() group.sync.arrive_and_wait()
struct alignas(16) uint4 { uint32_t x, y, z, w; };
struct alignas(8) uint2 { uint32_t x, y; };

struct Simdgroup {
  std::barrier<> sync{32};
  float slots[32];
};

template <typename T, int BITS, int GS, int AXIS, int K, int N, int LUT_SIZE, int ROWS,
          int SIMDGROUPS, bool LUT_SHARED, int VEC>
void lane_main(const T* x, const uint8_t* packed, const _Float16* lut, T* out, int lane,
               int simdgroup, int row_block, int m, Simdgroup& group) {
  auto simd_sum = [&](float v) {
    group.slots[lane] = v;
    group.sync.arrive_and_wait();
    float s = 0;
    for (int i = 0; i < 32; ++i) s += group.slots[i];
    group.sync.arrive_and_wait();
    return s;
  };
  BODY
}

template <int BITS, int GS, int AXIS, int ROWS, int SIMDGROUPS, bool LUT_SHARED, int VEC>
int check() {
  constexpr int K = 512, N = 40, M = 3, P = 1 << BITS, ROW_BYTES = K * BITS / 8;
  constexpr int GROUPS = AXIS == 0 ? N / GS : K / GS;
  std::mt19937 rng(BITS * 10 + AXIS);
  std::vector<int> idx(N * K);
  std::vector<uint8_t> packed(N * ROW_BYTES, 0);
  for (int n = 0; n < N; ++n)
    for (int k = 0; k < K; ++k) {
      int v = int(rng() % P);
      idx[n * K + k] = v;
      for (int b = 0; b < BITS; ++b)
        if (v >> b & 1) packed[n * ROW_BYTES + (k * BITS + b) / 8] |= 1 << ((k * BITS + b) % 8);
    }
  std::vector<_Float16> lut(GROUPS * P);
  for (auto& e : lut) e = _Float16(float(int(rng() % 2001) - 1000) / 256.0f);
  std::vector<float> x(M * K), out(M * N, -1.0f);
  for (auto& v : x) v = float(int(rng() % 2001) - 1000) / 1000.0f;
  const int blocks = (N + ROWS * SIMDGROUPS - 1) / (ROWS * SIMDGROUPS);
  for (int m = 0; m < M; ++m)
    for (int rb = 0; rb < blocks; ++rb) {
      Simdgroup groups[SIMDGROUPS];
      std::vector<std::thread> threads;
      for (int t = 0; t < 32 * SIMDGROUPS; ++t)
        threads.emplace_back([&, t] {
          lane_main<float, BITS, GS, AXIS, K, N, P, ROWS, SIMDGROUPS, LUT_SHARED, VEC>(
              x.data(), packed.data(), lut.data(), out.data(), t % 32, t / 32, rb, m,
              groups[t / 32]);
        });
      for (auto& th : threads) th.join();
    }
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      double want = 0;
      for (int k = 0; k < K; ++k) {
        int g = AXIS == 0 ? n / GS : k / GS;
        want += double(float(lut[g * P + idx[n * K + k]])) * x[m * K + k];
      }
      if (std::abs(out[m * N + n] - want) > 1e-3) {
        std::printf("bits %d axis %d: out[%d, %d] = %g, want %g\n", BITS, AXIS, m, n,
                    out[m * N + n], want);
        return 1;
      }
    }
  std::printf("bits %d axis %d rows %d simdgroups %d shared %d vec %d ok\n", BITS, AXIS, ROWS,
              SIMDGROUPS, int(LUT_SHARED), VEC);
  return 0;
}

template <int ROWS, int SIMDGROUPS, bool LUT_SHARED, int VEC>
int layout() {
  return check<1, 8, 0, ROWS, SIMDGROUPS, LUT_SHARED, VEC>() |
         check<2, 8, 0, ROWS, SIMDGROUPS, LUT_SHARED, VEC>() |
         check<3, 8, 0, ROWS, SIMDGROUPS, LUT_SHARED, VEC>() |
         check<4, 8, 0, ROWS, SIMDGROUPS, LUT_SHARED, VEC>() |
         check<6, 8, 0, ROWS, SIMDGROUPS, LUT_SHARED, VEC>() |
         check<8, 8, 0, ROWS, SIMDGROUPS, LUT_SHARED, VEC>() |
         check<1, 16, 1, ROWS, SIMDGROUPS, LUT_SHARED, VEC>() |
         check<2, 16, 1, ROWS, SIMDGROUPS, LUT_SHARED, VEC>() |
         check<3, 16, 1, ROWS, SIMDGROUPS, LUT_SHARED, VEC>() |
         check<4, 16, 1, ROWS, SIMDGROUPS, LUT_SHARED, VEC>() |
         check<6, 16, 1, ROWS, SIMDGROUPS, LUT_SHARED, VEC>() |
         check<8, 16, 1, ROWS, SIMDGROUPS, LUT_SHARED, VEC>();
}

int main() { return LAYOUTS; }
"""


@pytest.mark.skipif(not shutil.which("c++"), reason="no C++ compiler")
def test_gpu_kernel_body_on_an_emulated_simdgroup(tmp_path):
    """Every bit width and axis in the backends' layouts and in the candidates that
    gpu_kernel_check.py times with 2 simdgroups (the others differ only in that number). N = 40
    leaves a partial row block; K = 512 gives a lane several chunks."""
    layouts = {*gpu_kernel.GPU_LAYOUTS.values()} | {
        g for g in gpu_kernel.GPU_CANDIDATES if g.simdgroups == 2
    }
    calls = " | ".join(
        f"layout<{g.rows}, {g.simdgroups}, {str(g.lut_shared).lower()}, {g.vec}>()" for g in layouts
    )
    source = tmp_path / "emulate.cpp"
    source.write_text(EMULATION.replace("BODY", gpu_kernel.GPU_BODY).replace("LAYOUTS", calls))
    _ok(["c++", "-O0", "-std=c++20", "-pthread", str(source), "-o", str(tmp_path / "emulate")])
    assert _ok([str(tmp_path / "emulate")]).count(" ok") == 12 * len(layouts)


@pytest.mark.skipif(not shutil.which("nvcc"), reason="no CUDA compiler")
def test_gpu_kernel_cuda_text_compiles(tmp_path):
    """What mx.fast.cuda_kernel would compile: header, then the body inside a templated kernel."""
    source = tmp_path / "kernel.cu"

    def instance(t, bits, group_size, axis, layout):  # the template constants a call passes
        template, _, _ = gpu_kernel._launch(
            {"float": mx.float32, "__half": mx.float16}[t], bits, group_size, axis, 4096, 4096,
            1 << bits, layout,
        )  # fmt: skip
        values = [str(v).lower() if isinstance(v, bool) else str(v) for _, v in template[1:]]
        return f"template __global__ void afm_lut_gemv<{t}, {', '.join(values)}>" + (
            f"(const {t}*, const uint8_t*, const __half*, {t}*);"
        )

    instances = "\n".join(
        instance(t, b, g, a, layout)
        for t, b, g, a in (("float", 4, 16, 0), ("__half", 2, 16, 1), ("float", 8, 1, 0))
        for layout in {*gpu_kernel.GPU_LAYOUTS.values(), *gpu_kernel.GPU_CANDIDATES}
    )
    source.write_text(
        "#include <cuda_fp16.h>\n#include <cstdint>\n"
        + gpu_kernel.CUDA_HEADER
        + "template <typename T, int BITS, int GS, int AXIS, int K, int N, int LUT_SIZE, "
        "int ROWS, int SIMDGROUPS, bool LUT_SHARED, int VEC>\n"
        "__global__ void afm_lut_gemv(const T* x, const uint8_t* packed, const __half* lut, "
        "T* out) {\n" + gpu_kernel.CUDA_PROLOGUE + gpu_kernel.GPU_BODY + "}\n" + instances
    )
    _ok(["nvcc", "-c", "-std=c++17", "-arch=sm_80", str(source), "-o", str(tmp_path / "k.o")])


@pytest.mark.skipif(mx.default_device().type == mx.gpu, reason="the gate under test is for CPUs")
def test_gpu_kernel_check_is_gated_off_gpus():
    script = REPO / "scripts" / "gpu_kernel_check.py"
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert "needs MLX on a GPU" in one_line_error(proc) and "nothing was run" in proc.stderr
