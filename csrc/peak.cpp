// Microbenchmark of the GEMM's inner instruction sequence, to state kernel speed as a share
// of what this CPU can do with AVX2 int8 (no VNNI): independent chains of
//   "maddubs_madd":  maddubs(u8, s8) -> madd(., ones) -> add_epi32   (one flush per maddubs)
//   "maddubs_add16": maddubs(u8, s8) -> add_epi16                    (int16 accumulation)
//   "dpbusd":        AVX-512 VNNI vpdpbusd on 256-bit vectors          (the VNNI kernels)
// Each maddubs is 32 multiply-accumulates; figures count 2 ops per MAC.
#include "mixq_cpu.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <atomic>
#include <chrono>

namespace mixq {

namespace {

#if defined(__x86_64__)
template <bool FLUSH_EACH>
__attribute__((target("avx2,fma"), noinline)) int64_t run_chains(int64_t iters, int32_t seed) {
  // 4 distinct products per iteration (none can be merged or hoisted). The products do not
  // depend on the accumulators, so 4 chains cover the 1-cycle add latency; 4 accumulators +
  // 5 operands + ones fit the 16 ymm registers without spills.
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i a0 = _mm256_set1_epi8(static_cast<char>(3 + (seed & 1))), a1 = _mm256_set1_epi8(4),
          a2 = _mm256_set1_epi8(5), a3 = _mm256_set1_epi8(6);
  __m256i b0 = _mm256_set1_epi8(-2);
  __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0;
#define MIXQ_STEP(acc, x, y)                                                       \
  if constexpr (FLUSH_EACH)                                                        \
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), ones)); \
  else                                                                             \
    acc = _mm256_add_epi16(acc, _mm256_maddubs_epi16(x, y));
  for (int64_t it = 0; it < iters; ++it) {
    // Keep the operands opaque so the products are not hoisted out of the loop.
    __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(b0));
    MIXQ_STEP(c0, a0, b0) MIXQ_STEP(c1, a1, b0) MIXQ_STEP(c2, a2, b0) MIXQ_STEP(c3, a3, b0)
  }
#undef MIXQ_STEP
  __m256i s = _mm256_add_epi32(_mm256_add_epi32(c0, c1), _mm256_add_epi32(c2, c3));
  return _mm256_extract_epi32(s, 0);
}

// 8 independent vpdpbusd chains: enough to cover its latency at 2 per cycle.
__attribute__((target("avx2,avx512f,avx512vl,avx512bw,avx512vnni"), noinline)) int64_t run_dpbusd(int64_t iters,
                                                                                              int32_t seed) {
  __m256i a0 = _mm256_set1_epi8(static_cast<char>(3 + (seed & 1))), a1 = _mm256_set1_epi8(4);
  __m256i b0 = _mm256_set1_epi8(-2);
  __m256i c[8];
  for (auto& v : c) v = _mm256_setzero_si256();
  for (int64_t it = 0; it < iters; ++it) {
    __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(b0));
    c[0] = _mm256_dpbusd_epi32(c[0], a0, b0); c[1] = _mm256_dpbusd_epi32(c[1], a1, b0);
    c[2] = _mm256_dpbusd_epi32(c[2], a0, b0); c[3] = _mm256_dpbusd_epi32(c[3], a1, b0);
    c[4] = _mm256_dpbusd_epi32(c[4], a0, b0); c[5] = _mm256_dpbusd_epi32(c[5], a1, b0);
    c[6] = _mm256_dpbusd_epi32(c[6], a0, b0); c[7] = _mm256_dpbusd_epi32(c[7], a1, b0);
  }
  __m256i s = c[0];
  for (int i = 1; i < 8; ++i) s = _mm256_add_epi32(s, c[i]);
  return _mm256_extract_epi32(s, 0);
}
#endif

}  // namespace

double measure_int8_peak(const std::string& sequence, int64_t iters, int64_t threads) {
#if defined(__x86_64__)
  TORCH_CHECK(cpu_has_avx2(), "mixq cpu: the int8 peak microbenchmark needs AVX2");
  TORCH_CHECK(sequence == "maddubs_madd" || sequence == "maddubs_add16" || sequence == "dpbusd",
              "mixq cpu: sequence must be 'maddubs_madd', 'maddubs_add16' or 'dpbusd', got '", sequence, "'");
  TORCH_CHECK(sequence != "dpbusd" || cpu_has_vnni(), "mixq cpu: 'dpbusd' needs AVX-512 VNNI");
  const bool vnni = sequence == "dpbusd";
  TORCH_CHECK(iters > 0 && threads > 0, "mixq cpu: iters and threads must be positive");
  const bool flush = sequence == "maddubs_madd";
  const int64_t prev = at::get_num_threads();
  at::set_num_threads(static_cast<int>(threads));
  std::atomic<int64_t> sink{0};
  const auto t0 = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const auto seed = static_cast<int32_t>(t);
      sink += vnni ? run_dpbusd(iters / 2, seed) : flush ? run_chains<true>(iters, seed) : run_chains<false>(iters, seed);
    }
  });
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  at::set_num_threads(static_cast<int>(prev));
  const double macs = static_cast<double>(threads) * static_cast<double>(iters) * 4.0 * 32.0;
  return 2.0 * macs / secs / 1e9 + 0.0 * static_cast<double>(sink.load());
#else
  TORCH_CHECK(false, "mixq cpu: the int8 peak microbenchmark needs x86-64 with AVX2");
  return 0.0;
#endif
}

}  // namespace mixq
