// Checks every row-kernel path this build has (portable C++, AVX2, AVX-512 or NEON) against a
// double-precision reference, for every bit width, both group axes, odd shapes and 1..8 rows;
// and the fp16 -> fp32 conversion against the compiler's own for all 65,536 halves.
// Built and run by tests/test_lut_kernels.py, natively and (cross-compiled) under qemu-aarch64.

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../../afm_mlx/palettization/csrc/lut_rows.h"

namespace {

uint64_t state = 0x9e3779b97f4a7c15ull;
uint32_t next_u32() {
  state ^= state << 13;
  state ^= state >> 7;
  state ^= state << 17;
  return uint32_t(state >> 11);
}

// The compiler's own IEEE half is the reference (_Float16 on x86-64, __fp16 on AArch64).
#if defined(__aarch64__)
using half = __fp16;
#else
using half = _Float16;
#endif

uint16_t float_to_half_bits(float f) {
  half h = static_cast<half>(f);
  uint16_t bits;
  std::memcpy(&bits, &h, 2);
  return bits;
}

float native_half_to_float(uint16_t bits) {
  half h;
  std::memcpy(&h, &bits, 2);
  return static_cast<float>(h);
}

int check_halves() {
  for (uint32_t b = 0; b < 65536; ++b) {
    float want = native_half_to_float(uint16_t(b)), got = afm::half_to_float(uint16_t(b));
    bool same = std::isnan(want) ? std::isnan(got) : std::memcmp(&want, &got, 4) == 0;
    if (!same) {
      std::printf("half 0x%04x: got %g, want %g\n", b, got, want);
      return 1;
    }
  }
  return 0;
}

int check_kernels(const char* cap) {
  setenv("AFM_MLX_LUT_ISA", cap, 1);
  const int shapes[][3] = {{48, 64, 16}, {96, 128, 32}, {32, 40, 8}, {24, 36, 4}, {16, 256, 16}};
  int checked = 0;
  for (int bits : {1, 2, 3, 4, 6, 8}) {
    for (int axis : {0, 1}) {
      for (const auto& s : shapes) {
        const int N = s[0], K = s[1], gs = s[2], entries = 1 << bits;
        const int groups = axis == 0 ? N / gs : K / gs;
        const int row_bytes = (K * bits + 7) / 8;
        std::vector<uint8_t> packed(size_t(N) * row_bytes, 0);
        std::vector<int> idx(size_t(N) * K);
        for (int n = 0; n < N; ++n) {
          for (int k = 0; k < K; ++k) {
            int v = int(next_u32() & (entries - 1));
            idx[size_t(n) * K + k] = v;
            for (int b = 0; b < bits; ++b) {
              int bit = k * bits + b;
              if (v >> b & 1) packed[size_t(n) * row_bytes + bit / 8] |= uint8_t(1 << (bit % 8));
            }
          }
        }
        std::vector<uint16_t> lut(size_t(groups) * entries);
        for (auto& e : lut) e = float_to_half_bits(float(int(next_u32() % 2001) - 1000) / 512.0f);
        std::vector<float> x(size_t(afm::kMaxRows) * K);
        for (auto& v : x) v = float(int(next_u32() % 2001) - 1000) / 1000.0f;
        for (int M = 1; M <= afm::kMaxRows; ++M) {
          afm::Params p{bits, gs, axis, M, N, K, row_bytes};
          std::vector<float> y(size_t(M) * N, -1.0f);
          afm::rows_fn(p)(x.data(), packed.data(), lut.data(), y.data(), p, 0, N);
          for (int m = 0; m < M; ++m) {
            for (int n = 0; n < N; ++n) {
              double want = 0, scale = 0;
              for (int k = 0; k < K; ++k) {
                int g = axis == 0 ? n / gs : k / gs;
                double w = afm::half_to_float(lut[size_t(g) * entries + idx[size_t(n) * K + k]]);
                want += w * x[size_t(m) * K + k];
                scale += std::fabs(w * x[size_t(m) * K + k]);
              }
              if (std::fabs(y[size_t(m) * N + n] - want) > 1e-5 * (scale + 1)) {
                std::printf("%s (%s) bits %d axis %d %dx%d gs %d M %d row %d: %g vs %g\n", cap,
                            afm::isa_for(p).c_str(), bits, axis, N, K, gs, M, n,
                            y[size_t(m) * N + n], want);
                return 1;
              }
            }
          }
          ++checked;
        }
      }
    }
  }
  afm::Params wide{4, 16, 0, 1, 1, 4096, 0};
  std::printf("%s: %d layouts x rows ok (widest path here: %s)\n", cap, checked,
              afm::isa_for(wide).c_str());
  return 0;
}

}  // namespace

int main() {
  if (check_halves()) return 1;
  std::printf("halves: 65536 ok\n");
  for (const char* cap : {"scalar", "avx2", "widest"}) {
    if (check_kernels(cap)) return 1;
  }
  return 0;
}
