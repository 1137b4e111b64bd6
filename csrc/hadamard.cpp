// Randomized fast Walsh-Hadamard transform of activation rows, bit-exact with
// mixq/rotation.py's hadamard_fp32 (the contract):
//   y = fp32(x) * sign[k] (exact), then for h = 1, 2, ..., block/2 inside each block of `block`
//   channels the butterfly (y[j], y[j+h]) <- (y[j] + y[j+h], y[j] - y[j+h]), then y * scale.
// Each output is a fixed sequence of IEEE fp32 adds and one multiply; built with
// -ffp-contract=off and no fast-math, the compiler may vectorize the loops but not reorder them.
#include "mixq_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

namespace mixq {

namespace {

inline float widen(float v) { return v; }
inline float widen(at::BFloat16 v) { return static_cast<float>(v); }
inline float widen(at::Half v) { return static_cast<float>(v); }

// One row in place: the butterflies of every block, then the scale.
void fwht_row(float* y, int64_t k, int64_t block, float scale) {
  for (int64_t base = 0; base < k; base += block) {
    float* b = y + base;
    for (int64_t h = 1; h < block; h *= 2) {
      for (int64_t g = 0; g < block; g += 2 * h) {
        float* lo = b + g;
        float* hi = b + g + h;
        for (int64_t i = 0; i < h; ++i) {
          const float u = lo[i], v = hi[i];
          lo[i] = u + v;
          hi[i] = u - v;
        }
      }
    }
  }
  for (int64_t i = 0; i < k; ++i) y[i] = y[i] * scale;
}

template <typename T>
void fwht_rows(const at::Tensor& x, const float* sign, float* out, int64_t k, int64_t block, float scale) {
  const T* src = x.data_ptr<T>();
  const int64_t m = x.size(0);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(k, 1));
  at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = src + r * k;
      float* y = out + r * k;
      for (int64_t i = 0; i < k; ++i) y[i] = widen(xr[i]) * sign[i];
      fwht_row(y, k, block, scale);
    }
  });
}

}  // namespace

at::Tensor hadamard_transform(const at::Tensor& x, const at::Tensor& signs, int64_t block, double scale) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "mixq cpu hadamard_transform: x must be a 2-D CPU tensor [M, K], got ",
              x.sizes(), " on ", x.device());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf,
              "mixq cpu hadamard_transform: x must be float32, bfloat16 or float16, got ", t);
  const int64_t k = x.size(1);
  TORCH_CHECK(signs.device().is_cpu() && signs.scalar_type() == at::kFloat && signs.dim() == 1 && signs.size(0) == k,
              "mixq cpu hadamard_transform: signs must be a float32 CPU tensor [", k, "], got ", signs.sizes(), " ",
              signs.scalar_type());
  TORCH_CHECK(block >= 1 && (block & (block - 1)) == 0 && k % block == 0,
              "mixq cpu hadamard_transform: block ", block, " must be a power of two dividing K=", k);
  const at::Tensor xc = x.contiguous();
  const at::Tensor sc = signs.contiguous();
  at::Tensor out = at::empty({x.size(0), k}, x.options().dtype(at::kFloat));
  if (x.size(0) == 0 || k == 0) return out;
  const float s = static_cast<float>(scale);
  if (t == at::kFloat) fwht_rows<float>(xc, sc.data_ptr<float>(), out.data_ptr<float>(), k, block, s);
  else if (t == at::kBFloat16) fwht_rows<at::BFloat16>(xc, sc.data_ptr<float>(), out.data_ptr<float>(), k, block, s);
  else fwht_rows<at::Half>(xc, sc.data_ptr<float>(), out.data_ptr<float>(), k, block, s);
  return out;
}

}  // namespace mixq
