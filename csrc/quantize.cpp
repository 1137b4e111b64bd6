// Activation quantization: float [M, K] -> int8 codes, bit-exact with mixq/formats.py.
//
// Dynamic (per token): amax of the row in fp32, scale = max(amax, 1e-8f) / qmax,
// inv = 1.0f / scale (IEEE divide), q = rne(clamp(x * inv, -qmax, qmax)).
// Static: the same rounding with a given fp32 inverse scale per channel [K] or per tensor [1].
// Inputs may be fp32, bf16 or fp16; they widen to fp32 exactly. Compiled without fast-math
// or FP contraction, so the multiply and the rounding are the IEEE operations the reference does.
//
// Non-finite input (as the reference, whose float -> int8 cast turns NaN into 0): a product
// x * inv that is NaN gives code 0, +-inf gives +-qmax after the clamp. A row amax is NaN when
// the row holds a NaN (NaN propagates, as torch.amax), so the dynamic scale is NaN and every
// code of that row 0; an inf in the row gives scale inf, inv 0, and x * 0 = 0 (inf * 0 = NaN
// -> 0). min/max instructions drop or keep NaN by operand order, so NaN is handled explicitly.
#include "mixq_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace mixq {

namespace {

constexpr float kScaleEps = 1e-8f;  // formats.SCALE_EPS

int qmax_of(int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 6 || bits == 8, "mixq cpu: unsupported a_bits=", bits, "; supported: 4, 6, 8");
  return (1 << (bits - 1)) - 1;
}

void check_input(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "mixq cpu: activations must be a 2-D CPU tensor [M, K], got ",
              x.sizes(), " on ", x.device());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf,
              "mixq cpu: activations must be float32, bfloat16 or float16, got ", t);
}

// Rows per parallel chunk: these passes are cheap (~0.1 ms per 2^18 values), so split only when
// each thread gets a sizeable share: waking a thread costs microseconds on a quiet machine and a
// whole time slice when the other core is busy, and the region's barrier waits for it.
int64_t row_grain(int64_t k) { return std::max<int64_t>(16, (int64_t{1} << 18) / std::max<int64_t>(k, 1)); }

inline float to_f32(float v) { return v; }
inline float to_f32(at::BFloat16 v) { return static_cast<float>(v); }
inline float to_f32(at::Half v) { return static_cast<float>(v); }

inline int8_t round_clamp(float y, float lim) {
  if (std::isnan(y)) return 0;  // the reference's NaN -> int8 cast
  // torch.clamp then torch.round (half to even under the default rounding mode).
  y = std::min(std::max(y, -lim), lim);
  return static_cast<int8_t>(std::nearbyintf(y));
}

template <typename T>
float row_amax_scalar(const T* x, int64_t k) {
  float m = 0.f;
  for (int64_t j = 0; j < k; ++j) {
    const float v = std::fabs(to_f32(x[j]));
    if (std::isnan(v)) return v;  // torch.amax propagates NaN
    m = std::max(m, v);
  }
  return m;
}

template <typename T>
void quantize_row_scalar(const T* x, const float* inv, bool per_channel, float lim, int64_t k, int8_t* q) {
  for (int64_t j = 0; j < k; ++j) q[j] = round_clamp(to_f32(x[j]) * inv[per_channel ? j : 0], lim);
}

#if defined(__x86_64__)
#define MIXQ_AVX2 __attribute__((target("avx2,fma,f16c")))

MIXQ_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
MIXQ_AVX2 inline __m256 load8(const at::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
MIXQ_AVX2 inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

template <typename T>
MIXQ_AVX2 float row_amax_avx2(const T* x, int64_t k) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 m0 = _mm256_setzero_ps(), m1 = _mm256_setzero_ps();
  __m256 nan = _mm256_setzero_ps();  // lanes that met a NaN (max_ps would drop it)
  int64_t j = 0;
  for (; j + 16 <= k; j += 16) {
    const __m256 a = _mm256_and_ps(load8(x + j), abs_mask);
    const __m256 b = _mm256_and_ps(load8(x + j + 8), abs_mask);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(a, b, _CMP_UNORD_Q));
    m0 = _mm256_max_ps(m0, a);
    m1 = _mm256_max_ps(m1, b);
  }
  if (_mm256_movemask_ps(nan) != 0) return std::numeric_limits<float>::quiet_NaN();
  m0 = _mm256_max_ps(m0, m1);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m0);
  float m = 0.f;
  for (float v : lanes) m = std::max(m, v);
  for (; j < k; ++j) {
    const float v = std::fabs(to_f32(x[j]));
    if (std::isnan(v)) return v;
    m = std::max(m, v);
  }
  return m;
}

MIXQ_AVX2 inline __m256i round_clamp8(__m256 y, __m256 lo, __m256 hi) {
  const __m256 nan = _mm256_cmp_ps(y, y, _CMP_UNORD_Q);
  y = _mm256_min_ps(_mm256_max_ps(y, lo), hi);  // a NaN lane becomes lo here; zeroed below
  const __m256i q = _mm256_cvtps_epi32(_mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return _mm256_andnot_si256(_mm256_castps_si256(nan), q);
}

template <typename T, bool PER_CHANNEL>
MIXQ_AVX2 inline __m256 scaled8(const T* x, const float* inv, __m256 inv_b, int64_t j) {
  return _mm256_mul_ps(load8(x + j), PER_CHANNEL ? _mm256_loadu_ps(inv + j) : inv_b);
}

template <typename T, bool PER_CHANNEL>
MIXQ_AVX2 void quantize_row_avx2(const T* x, const float* inv, float lim, int64_t k, int8_t* q) {
  const __m256 lo = _mm256_set1_ps(-lim), hi = _mm256_set1_ps(lim);
  const __m256 inv_b = _mm256_set1_ps(inv[0]);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  int64_t j = 0;
  for (; j + 32 <= k; j += 32) {
    const __m256i q0 = round_clamp8(scaled8<T, PER_CHANNEL>(x, inv, inv_b, j), lo, hi);
    const __m256i q1 = round_clamp8(scaled8<T, PER_CHANNEL>(x, inv, inv_b, j + 8), lo, hi);
    const __m256i q2 = round_clamp8(scaled8<T, PER_CHANNEL>(x, inv, inv_b, j + 16), lo, hi);
    const __m256i q3 = round_clamp8(scaled8<T, PER_CHANNEL>(x, inv, inv_b, j + 24), lo, hi);
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + j), _mm256_permutevar8x32_epi32(b, order));
  }
  for (; j < k; ++j) q[j] = round_clamp(to_f32(x[j]) * inv[PER_CHANNEL ? j : 0], lim);
}
#endif

template <typename T>
void quantize_dynamic_impl(const at::Tensor& x, int64_t bits, at::Tensor& q, at::Tensor& scale) {
  const int64_t m = x.size(0), k = x.size(1);
  const float lim = static_cast<float>(qmax_of(bits));
  const T* xp = x.data_ptr<T>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  const bool avx2 = use_avx2();
  at::parallel_for(0, m, row_grain(x.size(1)), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const T* row = xp + i * k;
#if defined(__x86_64__)
      const float amax = avx2 ? row_amax_avx2(row, k) : row_amax_scalar(row, k);
#else
      const float amax = row_amax_scalar(row, k);
#endif
      const float s = (std::isnan(amax) ? amax : std::max(amax, kScaleEps)) / lim;  // clamp_min keeps NaN
      const float inv = 1.0f / s;
      sp[i] = s;
#if defined(__x86_64__)
      if (avx2) {
        quantize_row_avx2<T, false>(row, &inv, lim, k, qp + i * k);
        continue;
      }
#endif
      quantize_row_scalar(row, &inv, false, lim, k, qp + i * k);
    }
  });
}

template <typename T>
void quantize_static_impl(const at::Tensor& x, const float* inv, bool per_channel, int64_t bits, at::Tensor& q) {
  const int64_t m = x.size(0), k = x.size(1);
  const float lim = static_cast<float>(qmax_of(bits));
  const T* xp = x.data_ptr<T>();
  int8_t* qp = q.data_ptr<int8_t>();
  const bool avx2 = use_avx2();
  at::parallel_for(0, m, row_grain(x.size(1)), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
#if defined(__x86_64__)
      if (avx2) {
        if (per_channel) quantize_row_avx2<T, true>(xp + i * k, inv, lim, k, qp + i * k);
        else quantize_row_avx2<T, false>(xp + i * k, inv, lim, k, qp + i * k);
        continue;
      }
#endif
      quantize_row_scalar(xp + i * k, inv, per_channel, lim, k, qp + i * k);
    }
  });
}

// Calls fn(T{}) with T the C++ type of a float32 / bfloat16 / float16 tensor (checked earlier).
template <typename Fn>
void dispatch_float(at::ScalarType t, Fn&& fn) {
  switch (t) {
    case at::kFloat: fn(float{}); break;
    case at::kBFloat16: fn(at::BFloat16{}); break;
    default: fn(at::Half{}); break;
  }
}

at::Tensor checked_inv_scale(const at::Tensor& inv_scale, int64_t k) {
  const at::Tensor inv = inv_scale.to(at::kFloat).contiguous().reshape({-1});
  TORCH_CHECK(inv.device().is_cpu() && (inv.numel() == k || inv.numel() == 1),
              "mixq cpu: inv_scale must be a CPU tensor of K=", k, " or 1 elements, got ", inv.numel(), " on ",
              inv.device());
  return inv;
}

template <typename T>
float quantize_row_dynamic_t(const T* row, int64_t k, float lim, int8_t* q) {
#if defined(__x86_64__)
  const bool avx2 = use_avx2();
  const float amax = avx2 ? row_amax_avx2(row, k) : row_amax_scalar(row, k);
#else
  const float amax = row_amax_scalar(row, k);
#endif
  const float s = (std::isnan(amax) ? amax : std::max(amax, kScaleEps)) / lim;
  const float inv = 1.0f / s;
#if defined(__x86_64__)
  if (avx2) {
    quantize_row_avx2<T, false>(row, &inv, lim, k, q);
    return s;
  }
#endif
  quantize_row_scalar(row, &inv, false, lim, k, q);
  return s;
}

}  // namespace

float quantize_row_dynamic(const void* x, at::ScalarType dtype, const float* smooth_inv, int64_t k, int64_t bits,
                           int8_t* q) {
  const float lim = static_cast<float>(qmax_of(bits));
  float s = 0.f;
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* row = static_cast<const T*>(x);
    if (smooth_inv == nullptr) {
      s = quantize_row_dynamic_t(row, k, lim, q);
      return;
    }
    // Smooth mode: x / s_k as the reference forms it (fp32 x times fp32 1/s_k, one rounding),
    // kept in a per-thread row buffer (L1) for the amax and the quantize passes.
    static thread_local std::vector<float> buf;
    if (static_cast<int64_t>(buf.size()) < k) buf.resize(static_cast<size_t>(k));
    for (int64_t j = 0; j < k; ++j) buf[j] = to_f32(row[j]) * smooth_inv[j];
    s = quantize_row_dynamic_t(buf.data(), k, lim, q);
  });
  return s;
}

std::tuple<at::Tensor, at::Tensor> quantize_dynamic(const at::Tensor& x_in, int64_t bits) {
  check_input(x_in);
  qmax_of(bits);
  const at::Tensor x = x_in.contiguous();
  at::Tensor q = at::empty(x.sizes(), at::kChar);
  at::Tensor scale = at::empty({x.size(0)}, at::kFloat);
  if (x.size(1) == 0) {
    scale.fill_(kScaleEps / static_cast<float>(qmax_of(bits)));
    return {q, scale};
  }
  dispatch_float(x.scalar_type(), [&](auto tag) { quantize_dynamic_impl<decltype(tag)>(x, bits, q, scale); });
  return {q, scale};
}

at::Tensor quantize_static(const at::Tensor& x_in, const at::Tensor& inv_scale, int64_t bits) {
  check_input(x_in);
  qmax_of(bits);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor inv = checked_inv_scale(inv_scale, x.size(1));
  at::Tensor q = at::empty(x.sizes(), at::kChar);
  const bool per_channel = inv.numel() != 1;
  dispatch_float(x.scalar_type(), [&](auto tag) {
    quantize_static_impl<decltype(tag)>(x, inv.data_ptr<float>(), per_channel, bits, q);
  });
  return q;
}

// LayerNorm fused with static quantization: one read of x, no float intermediate in memory.
// Mean and variance accumulate in double; y = ((x - mean) * rstd) * gamma + beta in fp32.
at::Tensor layernorm_quantize(const at::Tensor& x_in, const at::Tensor& gamma_in, const at::Tensor& beta_in,
                              double eps, const at::Tensor& inv_scale, int64_t bits) {
  check_input(x_in);
  const float lim = static_cast<float>(qmax_of(bits));
  TORCH_CHECK(eps >= 0, "mixq cpu: layernorm eps must be >= 0, got ", eps);
  const at::Tensor x = x_in.contiguous();
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(k > 0, "mixq cpu: layernorm needs K > 0");
  const at::Tensor gamma = gamma_in.to(at::kFloat).contiguous().reshape({-1});
  const at::Tensor beta = beta_in.to(at::kFloat).contiguous().reshape({-1});
  TORCH_CHECK(gamma.numel() == k && beta.numel() == k, "mixq cpu: gamma and beta must have K=", k,
              " elements, got ", gamma.numel(), " and ", beta.numel());
  const at::Tensor inv = checked_inv_scale(inv_scale, k);
  const bool per_channel = inv.numel() != 1;
  at::Tensor q = at::empty({m, k}, at::kChar);
  const float* g = gamma.data_ptr<float>();
  const float* bt = beta.data_ptr<float>();
  const float* iv = inv.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, m, row_grain(x.size(1)), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const scalar_t* row = xp + i * k;
        double sum = 0.0, sq = 0.0;
        for (int64_t j = 0; j < k; ++j) sum += static_cast<double>(to_f32(row[j]));
        const double mean = sum / static_cast<double>(k);
        for (int64_t j = 0; j < k; ++j) {
          const double d = static_cast<double>(to_f32(row[j])) - mean;
          sq += d * d;
        }
        const float rstd = static_cast<float>(1.0 / std::sqrt(sq / static_cast<double>(k) + eps));
        const float meanf = static_cast<float>(mean);
        for (int64_t j = 0; j < k; ++j) {
          const float y = ((to_f32(row[j]) - meanf) * rstd) * g[j] + bt[j];
          qp[i * k + j] = round_clamp(y * iv[per_channel ? j : 0], lim);
        }
      }
    });
  });
  return q;
}

// ----------------------------------------------------------------------------- per channel (attention V)
// V [B, H, M, D] (any strides, fp32/bf16/fp16) -> (codes int8 [B, H, M, D] contiguous, steps fp32 [B, H, D]):
// the dynamic rule of formats.quantize_act_dynamic over the token axis M, one step per channel d, as
// QuantAttention quantizes V (the reference runs it on V^T). amax in fp32 (NaN propagates), step =
// max(amax, eps) / qmax, inv = 1 / step, code = rne(clamp(v * inv)) with NaN -> 0: the row rule
// column by column, bit for bit. One pass for the amax, one for the codes; (b, h) pairs in parallel.
std::tuple<at::Tensor, at::Tensor> quantize_channels(const at::Tensor& v, int64_t bits) {
  TORCH_CHECK(v.device().is_cpu() && v.dim() == 4, "mixq cpu: quantize_channels takes a 4-D CPU tensor "
              "[B, H, M, D], got ", v.sizes(), " on ", v.device());
  const auto t = v.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf,
              "mixq cpu: quantize_channels takes float32, bfloat16 or float16, got ", t);
  const float lim = static_cast<float>(qmax_of(bits));
  const int64_t nb = v.size(0), nh = v.size(1), m = v.size(2), d = v.size(3);
  at::Tensor q = at::empty({nb, nh, m, d}, at::kChar);
  at::Tensor scale = at::empty({nb, nh, d}, at::kFloat);
  if (q.numel() == 0 && scale.numel() == 0) return {q, scale};
  const int64_t sb = v.stride(0), sh = v.stride(1), sm = v.stride(2), sd = v.stride(3);
  dispatch_float(t, [&](auto tag) {
    using T = decltype(tag);
    const T* base = static_cast<const T*>(v.data_ptr());
    int8_t* qp = q.data_ptr<int8_t>();
    float* sp = scale.data_ptr<float>();
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(m * d, 1));
    at::parallel_for(0, nb * nh, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> amax(static_cast<size_t>(d)), inv(static_cast<size_t>(d));
      std::vector<uint8_t> nan(static_cast<size_t>(d));
      for (int64_t bh = begin; bh < end; ++bh) {
        const T* x = base + (bh / nh) * sb + (bh % nh) * sh;
        std::fill(amax.begin(), amax.end(), 0.f);
        std::fill(nan.begin(), nan.end(), uint8_t{0});
        for (int64_t i = 0; i < m; ++i) {
          const T* row = x + i * sm;
          for (int64_t j = 0; j < d; ++j) {
            const float a = std::fabs(to_f32(row[j * sd]));
            nan[j] |= static_cast<uint8_t>(std::isnan(a));
            amax[j] = std::max(amax[j], a);  // a NaN a leaves amax[j]; the flag carries it
          }
        }
        float* s_out = sp + bh * d;
        for (int64_t j = 0; j < d; ++j) {
          const float s = (nan[j] ? std::numeric_limits<float>::quiet_NaN() : std::max(amax[j], kScaleEps)) / lim;
          s_out[j] = s;
          inv[j] = 1.0f / s;
        }
        int8_t* qo = qp + bh * m * d;
        for (int64_t i = 0; i < m; ++i) {
          const T* row = x + i * sm;
          for (int64_t j = 0; j < d; ++j) qo[i * d + j] = round_clamp(to_f32(row[j * sd]) * inv[j], lim);
        }
      }
    });
  });
  return {q, scale};
}

// Q or K [B, H, N, D] with unit stride along D (any other strides: a permuted qkv view) -> (codes int8
// [B, H, N, D] contiguous, steps fp32 [B, H, N]): the per-token dynamic rule, each row through
// quantize_row_dynamic (the same code as quantize_dynamic's), so no contiguous copy of the view is made.
std::tuple<at::Tensor, at::Tensor> quantize_tokens(const at::Tensor& x, int64_t bits) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4, "mixq cpu: quantize_tokens takes a 4-D CPU tensor "
              "[B, H, N, D], got ", x.sizes(), " on ", x.device());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf,
              "mixq cpu: quantize_tokens takes float32, bfloat16 or float16, got ", t);
  const int64_t nb = x.size(0), nh = x.size(1), n = x.size(2), d = x.size(3);
  TORCH_CHECK(d > 0 && (x.stride(3) == 1 || d == 1), "mixq cpu: quantize_tokens needs D > 0 with unit stride, got "
              "sizes ", x.sizes(), " strides ", x.strides());
  qmax_of(bits);
  at::Tensor q = at::empty({nb, nh, n, d}, at::kChar);
  at::Tensor scale = at::empty({nb, nh, n}, at::kFloat);
  const int64_t rows = nb * nh * n;
  if (rows == 0) return {q, scale};
  const int64_t sb = x.stride(0), sh = x.stride(1), sn = x.stride(2);
  const int64_t elem = static_cast<int64_t>(x.element_size());
  const char* base = static_cast<const char*>(x.data_ptr());
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / d);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i = r % n, bh = r / n;
      const char* row = base + ((bh / nh) * sb + (bh % nh) * sh + i * sn) * elem;
      sp[r] = quantize_row_dynamic(row, t, nullptr, d, bits, qp + r * d);
    }
  });
  return {q, scale};
}

}  // namespace mixq
