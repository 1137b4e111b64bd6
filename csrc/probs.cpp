// Post-softmax probabilities -> uint8 codes (issue 15), bit-exact with formats.quantize_probs.
//
// log2 grid: the code is read off the fp32 bit pattern u, exact integer work, no log2 call. For a
// normal p = 1.f * 2^(E-127) = m * 2^e with m = 1.f / 2 in [0.5, 1) and e = E - 126 (frexp), and
// m < fp32(sqrt(1/2)) exactly when p's mantissa field is below that constant's (same exponent), so
//     code = 126 - E + (mantissa < kSqrtHalfMantissa),  clamped below at 0,
// and the zero code 2^b - 1 where code > cmax or p is NaN. The edge values fall out of the same
// integer arithmetic, with E taken as an arithmetic shift u >> 23 of the signed pattern:
//   - +0 and subnormals (E = 0): code >= 126 > cmax (<= 31) -> zero code, as frexp's e <= -126 gives;
//   - negatives, -0, -inf (sign bit set): u >> 23 is in [-256, -1], code >= 127 -> zero code (p <= 0);
//   - p >= 1 and +inf (E >= 127): code <= 0 -> 0 (torch.frexp(inf) has e = 0 and m = inf -> code 0);
//   - NaN (either sign): positive NaN patterns are > 0x7F800000 as int32 -> zero code; negative
//     ones already have the sign bit.
// uniform grid: y = fp32(p * (2^b - 1)), NaN -> 0, clamp to [0, 2^b - 1], round half to even. The
// vector max(y, 0) returns its second operand when y is NaN, which is the NaN -> 0 rule.
//
// bf16 / fp16 inputs widen to fp32 exactly (as p.to(torch.float32)), inside the loads. The tensor
// is treated as one flat array (an elementwise map), split in chunks over the OpenMP threads.
// Paths: AVX-512 (the kVnni family: avx512f + bw + vl, 16 lanes, masked tails), AVX2 (8 lanes),
// and portable scalar; all three compute the same integers.
#include "mixq_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace mixq {

namespace {

constexpr int32_t kSqrtHalfBits = 0x3F3504F3;  // fp32(sqrt(1/2)) = 0.70710677
constexpr int32_t kSqrtHalfMantissa = kSqrtHalfBits & 0x7FFFFF;
constexpr int32_t kPosInfBits = 0x7F800000;
// Elements per parallel chunk (~0.03 ms of work with AVX2): split only when each thread gets a sizeable
// share, as quantize.cpp's row_grain does (a thread wake-up costs a time slice on a busy machine).
constexpr int64_t kProbsGrain = int64_t{1} << 18;

inline float widen(float v) { return v; }
inline float widen(at::BFloat16 v) { return static_cast<float>(v); }
inline float widen(at::Half v) { return static_cast<float>(v); }

inline uint8_t log2_code(float p, int32_t cmax, int32_t zero_code) {
  int32_t u;
  std::memcpy(&u, &p, sizeof(u));
  const int32_t code = 126 - (u >> 23) + ((u & 0x7FFFFF) < kSqrtHalfMantissa ? 1 : 0);
  if (code > cmax || u > kPosInfBits) return static_cast<uint8_t>(zero_code);
  return static_cast<uint8_t>(std::max(code, 0));
}

// rne of y in [0, 255] as (y + 1.5 * 2^23) - 1.5 * 2^23 (the sum's ulp is 1, so the add rounds y to an
// integer, half to even; the subtraction is exact): branch-free, so GCC vectorizes the scalar loop,
// where a nearbyintf call per element took ~20x longer (kept exact: no fast-math in this build).
inline uint8_t uniform_code(float p, float lim) {
  const float y = p * lim;
  const float c = y != y ? 0.f : std::min(std::max(y, 0.f), lim);
  return static_cast<uint8_t>((c + 12582912.0f) - 12582912.0f);
}

template <typename T>
void probs_scalar(const T* x, int64_t n, bool log2, int32_t cmax, int32_t zero_code, float lim, uint8_t* out) {
  if (log2) {
    for (int64_t i = 0; i < n; ++i) out[i] = log2_code(widen(x[i]), cmax, zero_code);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = uniform_code(widen(x[i]), lim);
  }
}

#if defined(__x86_64__)
#define MIXQ_PROBS_AVX2 __attribute__((target("avx2,fma,f16c")))
#define MIXQ_PROBS_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl")))

MIXQ_PROBS_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
MIXQ_PROBS_AVX2 inline __m256 load8(const at::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
MIXQ_PROBS_AVX2 inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// 8 codes as int32 lanes (0..255).
MIXQ_PROBS_AVX2 inline __m256i log2_codes8(__m256 p, __m256i cmax, __m256i zero_code) {
  const __m256i u = _mm256_castps_si256(p);
  const __m256i below = _mm256_cmpgt_epi32(_mm256_set1_epi32(kSqrtHalfMantissa),
                                           _mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFF)));  // -1 where below
  const __m256i code = _mm256_sub_epi32(_mm256_sub_epi32(_mm256_set1_epi32(126), _mm256_srai_epi32(u, 23)), below);
  const __m256i zero = _mm256_or_si256(_mm256_cmpgt_epi32(code, cmax),
                                       _mm256_cmpgt_epi32(u, _mm256_set1_epi32(kPosInfBits)));
  return _mm256_blendv_epi8(_mm256_max_epi32(code, _mm256_setzero_si256()), zero_code, zero);
}

MIXQ_PROBS_AVX2 inline __m256i uniform_codes8(__m256 p, __m256 lim) {
  __m256 y = _mm256_max_ps(_mm256_mul_ps(p, lim), _mm256_setzero_ps());  // NaN -> 0 (second operand)
  y = _mm256_min_ps(y, lim);
  return _mm256_cvtps_epi32(_mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

template <typename T, bool LOG2>
MIXQ_PROBS_AVX2 inline __m256i codes8(const T* x, __m256i cmax, __m256i zero_code, __m256 lim) {
  return LOG2 ? log2_codes8(load8(x), cmax, zero_code) : uniform_codes8(load8(x), lim);
}

template <typename T, bool LOG2>
MIXQ_PROBS_AVX2 void probs_avx2(const T* x, int64_t n, int32_t cmax_i, int32_t zero_i, float lim_f, uint8_t* out) {
  const __m256i cmax = _mm256_set1_epi32(cmax_i), zero_code = _mm256_set1_epi32(zero_i);
  const __m256 lim = _mm256_set1_ps(lim_f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256i c0 = codes8<T, LOG2>(x + i, cmax, zero_code, lim);
    const __m256i c1 = codes8<T, LOG2>(x + i + 8, cmax, zero_code, lim);
    const __m256i c2 = codes8<T, LOG2>(x + i + 16, cmax, zero_code, lim);
    const __m256i c3 = codes8<T, LOG2>(x + i + 24, cmax, zero_code, lim);
    // all lanes are in 0..255: the saturating packs are exact; the permute undoes their lane interleave
    const __m256i b = _mm256_packus_epi16(_mm256_packus_epi32(c0, c1), _mm256_packus_epi32(c2, c3));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm256_permutevar8x32_epi32(b, order));
  }
  for (; i < n; ++i) out[i] = LOG2 ? log2_code(widen(x[i]), cmax_i, zero_i) : uniform_code(widen(x[i]), lim_f);
}

// GCC 12 warns "__Y may be used uninitialized" inside its own AVX-512 headers (their _mm512_undefined
// placeholders); the warning is about the headers, not this code.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// 16 lanes, the tail by masked loads (masked-off lanes are never stored).
MIXQ_PROBS_AVX512 inline __m512 load16(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
MIXQ_PROBS_AVX512 inline __m512 load16(const at::BFloat16* p, __mmask16 k) {
  const __m256i h = _mm256_maskz_loadu_epi16(k, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
MIXQ_PROBS_AVX512 inline __m512 load16(const at::Half* p, __mmask16 k) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
}

template <typename T, bool LOG2>
MIXQ_PROBS_AVX512 inline __m512i codes16(const T* x, __mmask16 k, __m512i cmax, __m512i zero_code, __m512 lim) {
  const __m512 p = load16(x, k);
  if constexpr (LOG2) {
    const __m512i u = _mm512_castps_si512(p);
    const __mmask16 below =
        _mm512_cmplt_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFF)), _mm512_set1_epi32(kSqrtHalfMantissa));
    __m512i code = _mm512_sub_epi32(_mm512_set1_epi32(126), _mm512_srai_epi32(u, 23));
    code = _mm512_mask_add_epi32(code, below, code, _mm512_set1_epi32(1));
    const __mmask16 zero = _mm512_cmpgt_epi32_mask(code, cmax) | _mm512_cmpgt_epi32_mask(u, _mm512_set1_epi32(kPosInfBits));
    return _mm512_mask_mov_epi32(_mm512_max_epi32(code, _mm512_setzero_si512()), zero, zero_code);
  } else {
    __m512 y = _mm512_max_ps(_mm512_mul_ps(p, lim), _mm512_setzero_ps());  // NaN -> 0 (second operand)
    y = _mm512_min_ps(y, lim);
    return _mm512_cvtps_epi32(_mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

template <typename T, bool LOG2>
MIXQ_PROBS_AVX512 void probs_avx512(const T* x, int64_t n, int32_t cmax_i, int32_t zero_i, float lim_f,
                                    uint8_t* out) {
  const __m512i cmax = _mm512_set1_epi32(cmax_i), zero_code = _mm512_set1_epi32(zero_i);
  const __m512 lim = _mm512_set1_ps(lim_f);
  // the two saturating packs leave dword 4 L + j = vector j's elements 4 L .. 4 L + 3; put them back in order
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const __mmask16 all = 0xFFFF;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    const __m512i c0 = codes16<T, LOG2>(x + i, all, cmax, zero_code, lim);
    const __m512i c1 = codes16<T, LOG2>(x + i + 16, all, cmax, zero_code, lim);
    const __m512i c2 = codes16<T, LOG2>(x + i + 32, all, cmax, zero_code, lim);
    const __m512i c3 = codes16<T, LOG2>(x + i + 48, all, cmax, zero_code, lim);
    const __m512i b = _mm512_packus_epi16(_mm512_packus_epi32(c0, c1), _mm512_packus_epi32(c2, c3));
    _mm512_storeu_si512(out + i, _mm512_permutexvar_epi32(order, b));
  }
  for (; i < n; i += 16) {  // tail: masked loads, masked narrowing stores (lanes in 0..255: no saturation)
    const __mmask16 k = n - i >= 16 ? all : static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_cvtusepi32_storeu_epi8(out + i, k, codes16<T, LOG2>(x + i, k, cmax, zero_code, lim));
  }
}
#pragma GCC diagnostic pop
#endif

template <typename T>
void probs_run(const T* x, int64_t n, bool log2, int32_t cmax, int32_t zero_code, float lim, uint8_t* out,
               Isa isa) {
#if defined(__x86_64__)
  if (isa == Isa::kVnni) {
    if (log2) probs_avx512<T, true>(x, n, cmax, zero_code, lim, out);
    else probs_avx512<T, false>(x, n, cmax, zero_code, lim, out);
    return;
  }
  if (isa == Isa::kAvx2) {
    if (log2) probs_avx2<T, true>(x, n, cmax, zero_code, lim, out);
    else probs_avx2<T, false>(x, n, cmax, zero_code, lim, out);
    return;
  }
#endif
  (void)isa;
  probs_scalar(x, n, log2, cmax, zero_code, lim, out);
}

}  // namespace

at::Tensor quantize_probs(const at::Tensor& p_in, int64_t bits, bool log2) {
  TORCH_CHECK(bits == 4 || bits == 6 || bits == 8, "mixq quantize_probs: unsupported bits=", bits,
              "; supported: 4, 6, 8");
  TORCH_CHECK(p_in.device().is_cpu(), "mixq quantize_probs: p must be a CPU tensor, got ", p_in.device());
  const auto t = p_in.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf,
              "mixq quantize_probs: p must be float32, bfloat16 or float16, got ", t);
  const at::Tensor p = p_in.contiguous();
  at::Tensor out = at::empty(p.sizes(), p.options().dtype(at::kByte));
  const int64_t n = p.numel();
  if (n == 0) return out;
  const int32_t levels = (1 << bits) - 1;
  const int32_t cmax = std::min(levels - 1, 31);  // formats.log2_max_code
  const int32_t zero_code = levels;               // formats.prob_zero_code (log2)
  const float lim = static_cast<float>(levels);
  const Isa isa = active_isa();
  uint8_t* op = out.data_ptr<uint8_t>();
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(p.const_data_ptr());
    at::parallel_for(0, n, kProbsGrain, [&](int64_t b, int64_t e) {
      probs_run(xp + b, e - b, log2, cmax, zero_code, lim, op + b, isa);
    });
  };
  switch (t) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(at::BFloat16{}); break;
    default: run(at::Half{}); break;
  }
  return out;
}

}  // namespace mixq
