// Shared declarations of the mixq CPU kernels (the `mixq._C` extension).
//
// Every kernel obeys the integer contract of mixq/formats.py bit for bit; the AVX2 + FMA
// paths are compiled per function (target attribute) and chosen at run time, so the
// shared object loads on any x86-64 and falls back to portable scalar code.
#pragma once

// Per-op ATen headers instead of <ATen/ATen.h>: they keep each file's compile time short.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "cpu_features.h"

namespace mixq {

// ----------------------------------------------------------------------------- weights
// Prepacked layout, per tile of 8 output channels, along K in groups of 4 (see gemm.cpp).
constexpr int kTileN = 8;
int64_t prepack_k_unit(int64_t bits);                 // K padding of the prepacked layout
int64_t prepacked_tile_bytes(int64_t k, int64_t bits);
at::Tensor prepack_weight(const at::Tensor& canonical, int64_t bits, int64_t k);

// ----------------------------------------------------------------------------- GEMM
at::Tensor int_gemm(const at::Tensor& xq, const at::Tensor& w, int64_t bits, int64_t k, int64_t n);
at::Tensor packed_linear(const at::Tensor& xq, const at::Tensor& a_scale, const at::Tensor& w,
                         const at::Tensor& w_scale, const std::optional<at::Tensor>& bias, int64_t bits,
                         int64_t k, int64_t n, at::ScalarType out_dtype);

// Quantize + GEMM + epilogue in one parallel region, the activation codes kept in a per-thread
// workspace: the dynamic per-token rule, optionally after the smooth-mode multiply x * smooth_inv.
// Returns (out, the plain per-token steps); the epilogue uses step * a_scale_mul when given. With
// headroom, QuantLinear's power-of-two overflow headroom f (formats.epilogue_headroom of the steps)
// is applied instead: steps and bias times f in the epilogue, the output divided by f.
std::tuple<at::Tensor, at::Tensor> linear_dynamic(const at::Tensor& x, const std::optional<at::Tensor>& smooth_inv,
                                                  const at::Tensor& w, const at::Tensor& w_scale,
                                                  const std::optional<at::Tensor>& bias, int64_t w_bits,
                                                  int64_t a_bits, int64_t k, int64_t n, at::ScalarType out_dtype,
                                                  const std::optional<at::Tensor>& a_scale_mul, bool headroom);

// ----------------------------------------------------------------------------- activations
// One row by the dynamic rule (after x * smooth_inv in fp32 when smooth_inv is given): writes
// k codes to q and returns the row's scale. Bit-exact with quantize_dynamic.
float quantize_row_dynamic(const void* x, at::ScalarType dtype, const float* smooth_inv, int64_t k, int64_t bits,
                           int8_t* q);
std::tuple<at::Tensor, at::Tensor> quantize_dynamic(const at::Tensor& x, int64_t bits);
at::Tensor quantize_static(const at::Tensor& x, const at::Tensor& inv_scale, int64_t bits);
at::Tensor layernorm_quantize(const at::Tensor& x, const at::Tensor& norm_weight, const at::Tensor& norm_bias,
                              double eps, const at::Tensor& inv_scale, int64_t bits);

// ----------------------------------------------------------------------------- peak
// Measured int8 throughput of the GEMM's inner instruction sequence, in GOP/s (2 ops per MAC).
double measure_int8_peak(const std::string& sequence, int64_t iters, int64_t threads);

}  // namespace mixq

// ----------------------------------------------------------------------------- attention (issue 15)
// Integer attention matmuls on [BH, rows, cols] contiguous-or-not tensors (see attention.cpp for
// the scheme and the overflow bounds); outputs fp32, bit-exact with reference.attention_qk / _pv.
namespace mixq {
constexpr int64_t kMaxHeadDim = 65536;  // QK: |acc| <= 2^14 * D stays in int32
constexpr int64_t kMaxKeys = 65536;     // PV: uniform sums in int32; log2 sums < 2^54 in int64
// q [BH, N, D] int8, q_scale [BH, N] fp32, k [BH, M, D] int8, k_scale [BH, M] fp32 -> fp32 [BH, N, M].
at::Tensor attention_qk(const at::Tensor& q, const at::Tensor& q_scale, const at::Tensor& k,
                        const at::Tensor& k_scale);
// p [BH, N, M] uint8 codes c (value c / (2^bits - 1)), v [BH, M, D] int8, v_scale [BH, D] fp32 -> [BH, N, D].
at::Tensor attention_pv_uniform(const at::Tensor& p, const at::Tensor& v, const at::Tensor& v_scale, int64_t bits);
// Same on the log2 grid: value 2^-min(c, cmax), 0 for zero_code.
at::Tensor attention_pv_log2(const at::Tensor& p, const at::Tensor& v, const at::Tensor& v_scale, int64_t cmax,
                             int64_t zero_code);
}  // namespace mixq

// ----------------------------------------------------------------------------- probabilities (issue 15)
// Post-softmax probabilities (fp32 / bf16 / fp16, any shape, made contiguous) -> uint8 codes of the same
// shape, bit-exact with formats.quantize_probs: the log2 grid (log2 = true; code from the fp32 bit
// pattern, zero code 2^bits - 1) or the uniform grid (rne(clamp(p * (2^bits - 1))), NaN -> 0). See probs.cpp.
namespace mixq {
at::Tensor quantize_probs(const at::Tensor& p, int64_t bits, bool log2);
}  // namespace mixq

// ----------------------------------------------------------------------------- rotations (issue 23)
// Randomized Walsh-Hadamard transform of x [M, K] (fp32 / bf16 / fp16) -> fp32 [M, K], bit-exact
// with mixq/rotation.py's hadamard_fp32: signs [K] fp32, butterflies inside blocks of `block`
// (a power of two dividing K), then one multiply by `scale` (fp32(1/sqrt(block))). See hadamard.cpp.
namespace mixq {
at::Tensor hadamard_transform(const at::Tensor& x, const at::Tensor& signs, int64_t block, double scale);
}  // namespace mixq

// ----------------------------------------------------------------------------- per-channel activations
// V [B, H, M, D] (any strides) -> (codes int8 [B, H, M, D], steps fp32 [B, H, D]): the dynamic rule over
// the token axis, one step per channel, bit-exact with formats.quantize_act_dynamic on V^T. See quantize.cpp.
namespace mixq {
std::tuple<at::Tensor, at::Tensor> quantize_channels(const at::Tensor& v, int64_t bits);
// Q or K [B, H, N, D] (unit stride along D, any other strides) -> (codes [B, H, N, D], steps [B, H, N]): the
// per-token rule of quantize_dynamic row by row, without a contiguous copy of the view.
std::tuple<at::Tensor, at::Tensor> quantize_tokens(const at::Tensor& x, int64_t bits);
}  // namespace mixq
