// Integer GEMM of int8 activations with 4/6/8-bit weights: prepacking, kernels, epilogue.
//
// Prepacked layout (built once at load time from the canonical checkpoint layout). Output
// channels are cut into tiles of 8; K into groups of 4. In one tile, a "weight vector" is 32
// bytes: byte c*4 + j holds the weight of channel c at k = 4g + j. One AVX2 `maddubs` of a
// weight vector with the 4 activation bytes of group g broadcast to every lane gives, after a
// `madd` with ones, the 8 channel partial sums of that group.
//
// `maddubs` multiplies an unsigned operand by a signed one. The weights are the unsigned
// operand: below 8 bits they are stored as codes u = w + 2^(b-1) (u in [0, 15] or [0, 63]),
// and the kernel subtracts 2^(b-1) * rowsum(x) afterwards. Pair sums then stay far inside
// int16, so several `maddubs` results are added in int16 before one `madd` widens them (the
// count F is chosen per call from the measured max |x|, see choose_flush). Codes stay packed:
//   int4: 32 bytes per 2 groups (low nibble: group 2p, high nibble: group 2p+1);
//   int6: 96 bytes per 4 groups: two int4-style low planes, then a plane with the high 2 bits
//         of group 4q+j at bits 2j..2j+1;
//   int8: 32 bytes per group, the signed weight itself. With |x| <= 64 the kernel flips the
//         sign bit (u = w + 128, offset path); otherwise it uses |x| as the unsigned operand and
//         moves the sign of x onto w (`sign_epi8`), which is exact even for x = -128.
// K is padded with zero weights to a multiple of 4, 8, 16 (int8, int4, int6) and activations
// with zeros, so padding contributes nothing.
//
// With AVX-512 VNNI (+VL, BW) the same layout feeds `vpdpbusd` (see the VNNI kernels): every
// weight is an offset code there (int8 too: u = w + 128), exact for all int8 activations.
//
// Driver (run_gemm): one OpenMP region per call (torch's OpenMP pool) computes row sums (and
// a zero-padded copy only when K is not a multiple of the unit, or for the last partial row
// block), picks the kernel, then runs (row chunk x tile chunk) items; the kernels keep the
// whole of K in registers, and the epilogue ((float(acc) * a_scale[m]) * w_scale[n] + bias[n],
// fp32 or bf16) is fused per register tile. Without AVX2 the same prepacked layout feeds a
// portable scalar kernel.
#include "mixq_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace mixq {

namespace {

constexpr int kMR = 4;  // activation rows per micro-kernel call
constexpr int kMaxEpilogueStepLog2 = 64;  // formats._MAX_EPILOGUE_STEP = 2**64
constexpr int kGroup = 4;

enum class Mode { kW4, kW6, kW8Offset, kW8Sign };

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

void check_bits(int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 6 || bits == 8, "mixq cpu: unsupported w_bits=", bits,
              "; supported: 4, 6, 8");
}

int64_t code_offset(int64_t bits) { return int64_t{1} << (bits - 1); }

// Bytes of one unit (the smallest block the kernel unpacks) and groups per unit.
int64_t unit_groups(int64_t bits) { return bits == 8 ? 1 : (bits == 4 ? 2 : 4); }
int64_t unit_bytes(int64_t bits) { return bits == 6 ? 96 : 32; }

int64_t canonical_row_bytes(int64_t k, int64_t bits) {
  const int64_t unit = bits == 8 ? 1 : (bits == 4 ? 2 : 4);
  return round_up(k, unit) * bits / 8;
}

// Decode one canonical packed row (mixq/formats.py) into signed values w[0..k).
void decode_canonical_row(const uint8_t* row, int64_t bits, int64_t k, int8_t* out) {
  auto sext = [bits](int v) -> int8_t {
    const int half = 1 << (bits - 1);
    return static_cast<int8_t>(v >= half ? v - (1 << bits) : v);
  };
  if (bits == 8) {
    std::memcpy(out, row, static_cast<size_t>(k));
  } else if (bits == 4) {
    for (int64_t i = 0; i < k; ++i) out[i] = sext((row[i / 2] >> (4 * (i % 2))) & 0xF);
  } else {
    const int64_t kp = round_up(k, 4);
    const uint8_t* plane4 = row;
    const uint8_t* plane2 = row + kp / 2;
    for (int64_t i = 0; i < k; ++i) {
      const int lo = (plane4[i / 2] >> (4 * (i % 2))) & 0xF;
      const int hi = (plane2[i / 4] >> (2 * (i % 4))) & 0x3;
      out[i] = sext(lo | (hi << 4));
    }
  }
}

// Code of weight vector element i (= c*4 + j) of group g in a prepacked tile.
inline int tile_code(const uint8_t* tile, int64_t bits, int64_t g, int i) {
  if (bits == 8) return static_cast<int8_t>(tile[g * 32 + i]);
  if (bits == 4) return (tile[(g / 2) * 32 + i] >> (4 * (g % 2))) & 0xF;
  const uint8_t* quad = tile + (g / 4) * 96;
  const int j = static_cast<int>(g % 4);
  const int lo = (quad[(j / 2) * 32 + i] >> (4 * (j % 2))) & 0xF;
  const int hi = (quad[64 + i] >> (2 * j)) & 0x3;
  return lo | (hi << 4);
}

// ----------------------------------------------------------------------------- kernels
// A kernel computes out[r][t*8 + c] = sum_k code(w[c, k]) * x[r, k] for MR rows and NT adjacent
// tiles (tile_bytes apart), over the whole of K: out is [MR][NT*8] int32, the caller removes the
// code offset. `ngroups` is a multiple of the unit's group count. (MR, NT) depend on the family.
using KernelFn = void (*)(const int8_t* x, int64_t ldx, const uint8_t* tile, int64_t tile_bytes, int64_t ngroups,
                          int32_t* out);

void kernel_scalar(const int8_t* x, int64_t ldx, const uint8_t* tile, int64_t ngroups, int32_t* out,
                   int64_t bits) {
  int32_t acc[kMR][kTileN] = {};
  for (int64_t g = 0; g < ngroups; ++g) {
    for (int c = 0; c < kTileN; ++c) {
      int code[kGroup];
      for (int j = 0; j < kGroup; ++j) code[j] = tile_code(tile, bits, g, c * 4 + j);
      for (int r = 0; r < kMR; ++r) {
        const int8_t* xr = x + r * ldx + g * kGroup;
        int32_t s = 0;
        for (int j = 0; j < kGroup; ++j) s += code[j] * static_cast<int32_t>(xr[j]);
        acc[r][c] += s;
      }
    }
  }
  std::memcpy(out, acc, sizeof(acc));
}

template <int BITS>
void kernel_scalar_t(const int8_t* x, int64_t ldx, const uint8_t* tile, int64_t, int64_t ngroups, int32_t* out) {
  kernel_scalar(x, ldx, tile, ngroups, out, BITS);
}

#if defined(__x86_64__)
#define MIXQ_AVX2 __attribute__((target("avx2,fma")))

template <Mode MODE>
MIXQ_AVX2 inline void unpack_unit(const uint8_t* p, __m256i* wv) {
  if constexpr (MODE == Mode::kW8Offset) {
    wv[0] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), _mm256_set1_epi8(-128));
  } else if constexpr (MODE == Mode::kW4) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    wv[0] = _mm256_and_si256(v, m4);
    wv[1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
  } else if constexpr (MODE == Mode::kW6) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i m2 = _mm256_set1_epi8(0x30);
    const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64));
    // 16-bit shifts move bits across the two bytes of a lane; the byte masks drop them.
    wv[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_and_si256(_mm256_slli_epi16(h, 4), m2));
    wv[1] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                            _mm256_and_si256(_mm256_slli_epi16(h, 2), m2));
    wv[2] = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_and_si256(h, m2));
    wv[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                            _mm256_and_si256(_mm256_srli_epi16(h, 2), m2));
  }
}

MIXQ_AVX2 inline __m256i broadcast_group(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm256_set1_epi32(v);
}

// Offset-code kernel: F maddubs results are summed in int16 before one madd widens them.
template <Mode MODE, int F>
MIXQ_AVX2 void kernel_avx2_offset(const int8_t* x, int64_t ldx, const uint8_t* tile, int64_t, int64_t ngroups,
                                  int32_t* out) {
  constexpr int U = MODE == Mode::kW4 ? 2 : (MODE == Mode::kW6 ? 4 : 1);
  constexpr int UB = MODE == Mode::kW6 ? 96 : 32;
  constexpr int UNITS_PER_FLUSH = F >= U ? F / U : 1;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[kMR];
  __m256i a16[kMR];
  for (int r = 0; r < kMR; ++r) acc[r] = a16[r] = _mm256_setzero_si256();
  const int64_t nunits = ngroups / U;
  for (int64_t u0 = 0; u0 < nunits; u0 += UNITS_PER_FLUSH) {
    const int64_t ue = std::min<int64_t>(u0 + UNITS_PER_FLUSH, nunits);
    for (int64_t u = u0; u < ue; ++u) {
      __m256i wv[U];
      unpack_unit<MODE>(tile + u * UB, wv);
#pragma GCC unroll 4
      for (int v = 0; v < U; ++v) {
        const int8_t* xg = x + (u * U + v) * kGroup;
#pragma GCC unroll 8
        for (int r = 0; r < kMR; ++r) {
          a16[r] = _mm256_add_epi16(a16[r], _mm256_maddubs_epi16(wv[v], broadcast_group(xg + r * ldx)));
        }
        if constexpr (F < U) {
          if ((v + 1) % F == 0) {
            for (int r = 0; r < kMR; ++r) {
              acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(a16[r], ones));
              a16[r] = _mm256_setzero_si256();
            }
          }
        }
      }
    }
    if constexpr (F >= U) {
      for (int r = 0; r < kMR; ++r) {
        acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(a16[r], ones));
        a16[r] = _mm256_setzero_si256();
      }
    }
  }
  for (int r = 0; r < kMR; ++r) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * kTileN), acc[r]);
}

// int8 weights with full-range activations: |x| is the unsigned operand, sign(x) moves onto w.
// The activation panel is interleaved for this kernel (per group: 4 bytes x, then 4 bytes |x|,
// built in run_gemm), so |x| is computed once per call rather than once per weight tile.
MIXQ_AVX2 void kernel_avx2_w8_sign(const int8_t* x, int64_t ldx, const uint8_t* tile, int64_t, int64_t ngroups,
                                   int32_t* out) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[kMR];
  for (int r = 0; r < kMR; ++r) acc[r] = _mm256_setzero_si256();
  for (int64_t g = 0; g < ngroups; ++g) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + g * 32));
#pragma GCC unroll 8
    for (int r = 0; r < kMR; ++r) {
      const int8_t* xg = x + r * ldx + g * 2 * kGroup;
      const __m256i p = _mm256_maddubs_epi16(broadcast_group(xg + kGroup), _mm256_sign_epi8(w, broadcast_group(xg)));
      acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(p, ones));
    }
  }
  for (int r = 0; r < kMR; ++r) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * kTileN), acc[r]);
}

template <Mode MODE>
KernelFn pick_offset_kernel(int f) {
  switch (f) {
    case 1: return kernel_avx2_offset<MODE, 1>;
    case 2: return kernel_avx2_offset<MODE, 2>;
    case 4: return kernel_avx2_offset<MODE, 4>;
    case 8: return kernel_avx2_offset<MODE, 8>;
    case 16: return kernel_avx2_offset<MODE, 16>;
    case 32: return kernel_avx2_offset<MODE, 32>;
    default: return kernel_avx2_offset<MODE, 64>;
  }
}

// ----------------------------------------------------------------------------- VNNI kernels
// AVX-512 VNNI on 256-bit vectors (EVEX vpdpbusd, 32 vector registers). vpdpbusd adds the four
// products u8 x s8 of each 32-bit lane straight into the int32 accumulator: there is no 16-bit
// pair sum (maddubs saturates there), so every code (u <= 255) times every int8 activation
// (-128 included) is exact; the non-saturating form wraps modulo 2^32 like the scalar path, and
// only the final sum must fit int32. One instruction per 32 MACs, against maddubs + madd + add
// (or maddubs + add16 + amortized madd) on AVX2. int8 weights use the offset code u = w + 128
// (the sign flip is one xor per weight vector, shared by MR rows). Register tile: MR rows x NT
// tiles of 8 channels = MR*NT accumulators (16) + NT*U weight vectors + 1 broadcast <= 32.
#define MIXQ_VNNI __attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni")))

template <Mode MODE, int MR, int NT>
MIXQ_VNNI void kernel_vnni(const int8_t* x, int64_t ldx, const uint8_t* tile, int64_t tile_bytes, int64_t ngroups,
                           int32_t* out) {
  constexpr int U = MODE == Mode::kW4 ? 2 : (MODE == Mode::kW6 ? 4 : 1);
  constexpr int UB = MODE == Mode::kW6 ? 96 : 32;
  __m256i acc[MR][NT];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) acc[r][t] = _mm256_setzero_si256();
  const int64_t nunits = ngroups / U;
  for (int64_t u = 0; u < nunits; ++u) {
    __m256i wv[NT][U];
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) unpack_unit<MODE>(tile + t * tile_bytes + u * UB, wv[t]);
#pragma GCC unroll 4
    for (int v = 0; v < U; ++v) {
      const int8_t* xg = x + (u * U + v) * kGroup;
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const __m256i xb = broadcast_group(xg + r * ldx);
#pragma GCC unroll 4
        for (int t = 0; t < NT; ++t) acc[r][t] = _mm256_dpbusd_epi32(acc[r][t], wv[t][v], xb);
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (r * NT + t) * kTileN), acc[r][t]);
}
#endif

// Largest power of two F <= 64 such that F maddubs pair sums of codes <= umax times
// activations |x| <= xmax stay inside int16: F * 2 * umax * xmax <= 32767.
int choose_flush(int umax, int xmax) {
  const int pair = 2 * umax * std::max(xmax, 1);
  int f = 1;
  while (f < 64 && 2 * f * pair <= 32767) f *= 2;
  return f;
}

struct KernelChoice {
  KernelFn fn = nullptr;       // MR rows x NT tiles
  KernelFn fn_one = nullptr;   // MR rows x 1 tile (the last tile when the tile count is odd)
  int mr = kMR, nt = 1;
  int32_t offset = 0;          // code offset to remove: acc -= offset * rowsum(x)
  bool interleaved = false;    // the kernel reads the x / |x| interleaved panel
};

constexpr int kVnniMR = 8, kVnniNT = 2;

int family_mr(Isa isa) { return isa == Isa::kVnni ? kVnniMR : kMR; }

KernelChoice choose_kernel(Isa isa, int64_t bits, int xmax) {
#if defined(__x86_64__)
  if (isa == Isa::kVnni) {
    constexpr int R = kVnniMR, T = kVnniNT;
    if (bits == 4) return {kernel_vnni<Mode::kW4, R, T>, kernel_vnni<Mode::kW4, R, 1>, R, T, 8};
    if (bits == 6) return {kernel_vnni<Mode::kW6, R, T>, kernel_vnni<Mode::kW6, R, 1>, R, T, 32};
    return {kernel_vnni<Mode::kW8Offset, R, T>, kernel_vnni<Mode::kW8Offset, R, 1>, R, T, 128};
  }
  if (isa == Isa::kAvx2) {
    KernelFn f;
    if (bits == 4) f = pick_offset_kernel<Mode::kW4>(choose_flush(15, xmax));
    else if (bits == 6) f = pick_offset_kernel<Mode::kW6>(choose_flush(63, xmax));
    else if (xmax <= 64) f = pick_offset_kernel<Mode::kW8Offset>(choose_flush(255, xmax));
    else return {kernel_avx2_w8_sign, kernel_avx2_w8_sign, kMR, 1, 0, true};
    return {f, f, kMR, 1, static_cast<int32_t>(bits == 4 ? 8 : (bits == 6 ? 32 : 128))};
  }
#endif
  (void)xmax;
  if (bits == 4) return {kernel_scalar_t<4>, kernel_scalar_t<4>, kMR, 1, 8};
  if (bits == 6) return {kernel_scalar_t<6>, kernel_scalar_t<6>, kMR, 1, 32};
  return {kernel_scalar_t<8>, kernel_scalar_t<8>, kMR, 1, 0};
}

// ----------------------------------------------------------------------------- workspace
// Per calling thread, grown and never shrunk: the hot path allocates nothing but its output.
struct Workspace {
  std::vector<int8_t> x;        // zero-padded activation copy (K not a multiple of the unit), or tail rows
  std::vector<int8_t> xi;       // x / |x| interleaved panel (AVX2 int8 sign kernel)
  std::vector<int32_t> rowsum;  // [mp]
  std::vector<float> scale;     // fused linear: the chunk's per-token steps (times scale_mul)
};

Workspace& workspace() {
  static thread_local Workspace ws;
  return ws;
}

template <typename T>
T* grow(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  return v.data();
}

// Row sum and max |x| of one int8 row. One body, compiled twice: plain, and inlined into an AVX2
// function so the compiler auto-vectorizes it for that target.
static inline __attribute__((always_inline)) void row_stats_body(const int8_t* x, int64_t k, int32_t* sum,
                                                                 int* amax) {
  int32_t s = 0;
  int mx = 0;
  for (int64_t j = 0; j < k; ++j) {
    const int v = x[j];
    s += v;
    mx = std::max(mx, v < 0 ? -v : v);
  }
  *sum = s;
  *amax = mx;
}

#if defined(__x86_64__)
MIXQ_AVX2 void row_stats_avx2(const int8_t* x, int64_t k, int32_t* sum, int* amax) {
  row_stats_body(x, k, sum, amax);
}
#endif

void row_stats(const int8_t* x, int64_t k, int32_t* sum, int* amax, bool avx2) {
#if defined(__x86_64__)
  if (avx2) return row_stats_avx2(x, k, sum, amax);
#endif
  (void)avx2;
  row_stats_body(x, k, sum, amax);
}

// ----------------------------------------------------------------------------- epilogue
struct Epilogue {
  int32_t* out_i32 = nullptr;       // int_gemm: exact int32
  float* out_f32 = nullptr;         // packed_linear fp32
  at::BFloat16* out_bf16 = nullptr; // packed_linear bf16
  const float* a_scale = nullptr;
  bool a_scale_per_row = false;
  int64_t a_scale_row0 = 0;         // a_scale[m - a_scale_row0] when per row (chunk-local scales)
  const float* w_scale = nullptr;
  const float* bias = nullptr;
  int64_t ldo = 0;
};

#if defined(__x86_64__)
// fp32 -> bf16 with round-to-nearest-even (NaN stays NaN), as torch's .to(bfloat16).
MIXQ_AVX2 inline __m128i f32_to_bf16_avx2(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
  const __m256i packed = _mm256_packus_epi32(r, r);  // per 128-bit lane: 4 values, repeated
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}

// One full tile of 8 channels (n0 + 8 <= N, so the 8 scales and biases exist unpadded).
MIXQ_AVX2 void finish_tile_avx2(const int32_t* acc, int64_t lda, const int32_t* rowsum, int32_t offset, int64_t m0,
                                int64_t rows, int64_t n0, const Epilogue& ep) {
  const bool int_out = ep.out_i32 != nullptr;
  const __m256 ws = int_out ? _mm256_setzero_ps() : _mm256_loadu_ps(ep.w_scale + n0);
  const __m256 b = ep.bias ? _mm256_loadu_ps(ep.bias + n0) : _mm256_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t m = m0 + r;
    __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + r * lda));
    v = _mm256_sub_epi32(v, _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(offset) *
                                                                   static_cast<uint32_t>(rowsum[r]))));
    if (int_out) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(ep.out_i32 + m * ep.ldo + n0), v);
      continue;
    }
    const __m256 as = _mm256_set1_ps(ep.a_scale[ep.a_scale_per_row ? m - ep.a_scale_row0 : 0]);
    __m256 o = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(v), as), ws);
    if (ep.bias) o = _mm256_add_ps(o, b);
    if (ep.out_f32) {
      _mm256_storeu_ps(ep.out_f32 + m * ep.ldo + n0, o);
    } else {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(ep.out_bf16 + m * ep.ldo + n0), f32_to_bf16_avx2(o));
    }
  }
}
#endif

// Same arithmetic in the same order as the reference: ((float)acc * a_scale) * w_scale + bias.
void finish_tile_scalar(const int32_t* acc, int64_t lda, const int32_t* rowsum, int32_t offset, int64_t m0,
                        int64_t rows, int64_t n0, int64_t cols, const Epilogue& ep) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t m = m0 + r;
    const float as = ep.out_i32 ? 0.f : ep.a_scale[ep.a_scale_per_row ? m - ep.a_scale_row0 : 0];
    for (int64_t c = 0; c < cols; ++c) {
      // Wrapping int32 arithmetic: the true result fits, intermediates may wrap.
      const int32_t v = static_cast<int32_t>(static_cast<uint32_t>(acc[r * lda + c]) -
                                             static_cast<uint32_t>(offset) * static_cast<uint32_t>(rowsum[r]));
      const int64_t n = n0 + c;
      if (ep.out_i32) {
        ep.out_i32[m * ep.ldo + n] = v;
        continue;
      }
      float o = static_cast<float>(v) * as;
      o = o * ep.w_scale[n];
      if (ep.bias) o = o + ep.bias[n];
      if (ep.out_f32) {
        ep.out_f32[m * ep.ldo + n] = o;
      } else {
        ep.out_bf16[m * ep.ldo + n] = c10::BFloat16(o);
      }
    }
  }
}

// ----------------------------------------------------------------------------- driver
// Fused linear: the GEMM's first phase quantizes the float rows itself (into the workspace).
struct RowSource {
  const char* x = nullptr;              // float rows [M, K] (fp32, bf16 or fp16)
  at::ScalarType dtype = at::kFloat;
  int64_t row_bytes = 0;
  const float* smooth_inv = nullptr;    // smooth mode: x * smooth_inv before the dynamic rule
  int64_t a_bits = 8;
  float* scale_out = nullptr;           // [M] the plain per-token steps
  float scale_mul = 1.f;                // the epilogue uses step * scale_mul (overflow headroom)
};

void check_prepacked(const at::Tensor& w, int64_t bits, int64_t k, int64_t n) {
  check_bits(bits);
  TORCH_CHECK(k > 0 && n > 0, "mixq cpu: k and n must be positive, got k=", k, " n=", n);
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.is_contiguous(),
              "mixq cpu: prepacked weights must be a contiguous uint8 CPU tensor (from CpuBackend.prepack), got ",
              w.scalar_type(), " on ", w.device());
  const int64_t expect = round_up(n, kTileN) / kTileN * prepacked_tile_bytes(k, bits);
  TORCH_CHECK(w.numel() == expect, "mixq cpu: prepacked weights have ", w.numel(), " bytes but k=", k, " n=", n,
              " at ", bits, " bits need ", expect, "; pass the output of CpuBackend.prepack, not canonical weights");
}

// One OpenMP parallel region per call, and no barrier inside it: under load a barrier waits
// for a descheduled thread (a whole time slice), so the only one is the region's end.
// Items are (row chunk x tile chunk), handed out dynamically in order. A thread prepares a row
// chunk itself the first time it meets it, in its own workspace: row sums, the kernel choice
// (AVX2 depends on the chunk's max |x|), and the rows the kernel cannot read in place (the
// fused quantize, a K that needs zero padding, the last partial MR block, the AVX2 int8 x/|x|
// panel). When two threads share a chunk both prepare it (a pass over M x K, ~1/N of the GEMM)
// instead of waiting for each other. Row chunks keep <= ~128 KiB of activations (L2); inside
// an item the NT-tile weight panel stays in L1 while every MR-row block of the chunk passes
// over it; kernels keep the whole of K in registers and the epilogue is fused per tile.
// M ~ 200 is one or two row chunks, so the items cut N and both cores stay busy.
void run_gemm(const int8_t* x, int64_t m, int64_t k, const uint8_t* wp, int64_t bits, int64_t n,
              const Epilogue& ep_in, const RowSource* src = nullptr) {
  if (m == 0) return;
  const int64_t kpad = round_up(k, prepack_k_unit(bits));
  const int64_t tile_bytes = prepacked_tile_bytes(k, bits);
  const int64_t ntiles = round_up(n, kTileN) / kTileN;
  const int64_t ngroups = kpad / kGroup;
  const Isa isa = active_isa();
  const bool avx2 = isa >= Isa::kAvx2;
  const int mr = family_mr(isa);
  const int nt_family = isa == Isa::kVnni ? kVnniNT : 1;
  const int64_t mp = round_up(m, mr);
  const bool copy_all = kpad != k || src != nullptr;  // else rows are read in place (but the tail)

  // Threads: all of torch's, unless the call is too small to pay for waking them.
  const int64_t work = m * kpad * ntiles * kTileN;
  const int nthreads = work < (int64_t{1} << 20) ? 1 : std::max(1, at::get_num_threads());

  // Row chunks of <= 128 KiB of activations, equal sizes in MR blocks; then tile chunks so that
  // every thread gets several items.
  const int64_t mblocks = mp / mr;
  const int64_t nm = std::min(mblocks, std::max<int64_t>(1, (mp * kpad + (128 << 10) - 1) / (128 << 10)));
  const int64_t chunk_blocks = (mblocks + nm - 1) / nm;
  const int64_t mchunks = (mblocks + chunk_blocks - 1) / chunk_blocks;
  const int64_t tgroups = (ntiles + nt_family - 1) / nt_family;
  const int64_t want = std::max<int64_t>(1, (4 * nthreads + mchunks - 1) / mchunks);
  const int64_t tchunk_groups = std::max<int64_t>(1, tgroups / std::min(want, tgroups));
  const int64_t tchunks = (tgroups + tchunk_groups - 1) / tchunk_groups;
  const int64_t chunk_rows = chunk_blocks * mr;

#pragma omp parallel num_threads(nthreads)
  {
    Workspace& ws = workspace();  // this thread's
    int32_t* rowsum = grow(ws.rowsum, chunk_rows);
    int8_t* xbuf = grow(ws.x, (copy_all ? chunk_rows : mr) * kpad);
    int8_t* xi = (isa == Isa::kAvx2 && bits == 8) ? grow(ws.xi, chunk_rows * 2 * kpad) : nullptr;
    float* row_scale = src != nullptr ? grow(ws.scale, chunk_rows) : nullptr;
    Epilogue ep = ep_in;
    int64_t prepared = -1;
    int64_t row0 = 0, rows_end = 0, full = 0;  // chunk rows [row0, rows_end); in place below `full`
    KernelChoice kc;
    alignas(64) int32_t acc[kVnniMR * kVnniNT * kTileN];

#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t item = 0; item < mchunks * tchunks; ++item) {
      const int64_t mc = item / tchunks, tc = item % tchunks;
      if (mc != prepared) {
        prepared = mc;
        row0 = mc * chunk_rows;
        rows_end = std::min(mp, row0 + chunk_rows);
        full = copy_all ? row0 : std::max(row0, std::min(rows_end, m / mr * mr));
        int xmax = 0;
        for (int64_t i = row0; i < rows_end; ++i) {
          int32_t sum = 0;
          int mx = 0;
          int8_t* dst = i >= full ? xbuf + (i - full) * kpad : nullptr;
          if (i < m && src != nullptr) {
            const float step = quantize_row_dynamic(src->x + i * src->row_bytes, src->dtype, src->smooth_inv, k,
                                                    src->a_bits, dst);
            if (tc == 0) src->scale_out[i] = step;  // one writer per chunk: its first tile chunk
            row_scale[i - row0] = step * src->scale_mul;
            std::memset(dst + k, 0, static_cast<size_t>(kpad - k));
            row_stats(dst, k, &sum, &mx, avx2);
          } else if (i < m) {
            row_stats(x + i * k, k, &sum, &mx, avx2);
            if (dst != nullptr) {
              std::memcpy(dst, x + i * k, static_cast<size_t>(k));
              std::memset(dst + k, 0, static_cast<size_t>(kpad - k));
            }
          } else {
            std::memset(dst, 0, static_cast<size_t>(kpad));
          }
          rowsum[i - row0] = sum;
          xmax = std::max(xmax, mx);
        }
        kc = choose_kernel(isa, bits, xmax);
        if (kc.interleaved) {
          // The AVX2 int8 sign kernel reads, per group of 4, the 4 bytes of x then the 4 bytes
          // of |x| (|-128| = 128 read as unsigned by maddubs): once per chunk, not per tile.
          for (int64_t i = row0; i < rows_end; ++i) {
            const int8_t* row = i >= full ? xbuf + (i - full) * kpad : x + i * k;
            int8_t* dst = xi + (i - row0) * 2 * kpad;
            for (int64_t g = 0; g < ngroups; ++g) {
              for (int j = 0; j < kGroup; ++j) {
                const int8_t v = row[g * kGroup + j];
                dst[g * 2 * kGroup + j] = v;
                dst[g * 2 * kGroup + kGroup + j] = static_cast<int8_t>(v < 0 ? -static_cast<int>(v) : v);
              }
            }
          }
        }
        if (src != nullptr) {
          ep.a_scale = row_scale;
          ep.a_scale_per_row = true;
          ep.a_scale_row0 = row0;
        }
      }
      const int64_t g0 = tc * tchunk_groups, g1 = std::min(tgroups, g0 + tchunk_groups);
      for (int64_t tg = g0; tg < g1; ++tg) {
        const int64_t t0 = tg * kc.nt;
        const int nt = static_cast<int>(std::min<int64_t>(kc.nt, ntiles - t0));
        const KernelFn fn = nt == kc.nt ? kc.fn : kc.fn_one;
        const uint8_t* wt = wp + t0 * tile_bytes;
        for (int64_t m0 = row0; m0 < rows_end; m0 += mr) {
          const int8_t* xp;
          int64_t ldx;
          if (kc.interleaved) {
            xp = xi + (m0 - row0) * 2 * kpad, ldx = 2 * kpad;
          } else if (m0 < full) {
            xp = x + m0 * k, ldx = k;
          } else {
            xp = xbuf + (m0 - full) * kpad, ldx = kpad;
          }
          fn(xp, ldx, wt, tile_bytes, ngroups, acc);
          const int64_t rows = std::min<int64_t>(mr, m - m0);
          const int32_t* rs = rowsum + (m0 - row0);
          for (int t = 0; t < nt; ++t) {
            const int64_t n0 = (t0 + t) * kTileN;
            const int64_t cols = std::min<int64_t>(kTileN, n - n0);
            const int32_t* a = acc + t * kTileN;
#if defined(__x86_64__)
            if (avx2 && cols == kTileN) {
              finish_tile_avx2(a, nt * kTileN, rs, kc.offset, m0, rows, n0, ep);
              continue;
            }
#endif
            finish_tile_scalar(a, nt * kTileN, rs, kc.offset, m0, rows, n0, cols, ep);
          }
        }
      }
    }
  }
}

void check_activations(const at::Tensor& xq, int64_t k) {
  TORCH_CHECK(xq.device().is_cpu() && xq.scalar_type() == at::kChar && xq.dim() == 2,
              "mixq cpu: activations must be a 2-D int8 CPU tensor [M, K], got ", xq.scalar_type(), " ",
              xq.sizes(), " on ", xq.device());
  TORCH_CHECK(xq.size(1) == k, "mixq cpu: activations have K=", xq.size(1), " but the weights have k=", k);
}

}  // namespace

// ----------------------------------------------------------------------------- public
int64_t prepack_k_unit(int64_t bits) {
  check_bits(bits);
  return kGroup * unit_groups(bits);
}

int64_t prepacked_tile_bytes(int64_t k, int64_t bits) {
  const int64_t kpad = round_up(k, prepack_k_unit(bits));
  return kpad / (kGroup * unit_groups(bits)) * unit_bytes(bits);
}

at::Tensor prepack_weight(const at::Tensor& canonical, int64_t bits, int64_t k) {
  check_bits(bits);
  TORCH_CHECK(canonical.device().is_cpu() && canonical.scalar_type() == at::kByte && canonical.dim() == 2,
              "mixq cpu: prepack expects canonical packed weights, a 2-D uint8 CPU tensor [N, row_bytes], got ",
              canonical.scalar_type(), " ", canonical.sizes(), " on ", canonical.device());
  TORCH_CHECK(k > 0, "mixq cpu: k must be positive, got ", k);
  TORCH_CHECK(canonical.size(1) == canonical_row_bytes(k, bits), "mixq cpu: canonical rows have ",
              canonical.size(1), " bytes but k=", k, " at ", bits, " bits needs ", canonical_row_bytes(k, bits));
  const at::Tensor src = canonical.contiguous();
  const int64_t n = src.size(0);
  const int64_t kpad = round_up(k, prepack_k_unit(bits));
  const int64_t ntiles = round_up(n, kTileN) / kTileN;
  const int64_t tile_bytes = prepacked_tile_bytes(k, bits);
  at::Tensor out = at::zeros({ntiles * tile_bytes}, at::kByte);
  uint8_t* dst = out.data_ptr<uint8_t>();
  const uint8_t* s = src.data_ptr<uint8_t>();
  const int64_t rb = src.size(1);
  const int off = bits == 8 ? 0 : static_cast<int>(code_offset(bits));
  bool has_min8 = false;

  at::parallel_for(0, ntiles, 1, [&](int64_t tb, int64_t te) {
    std::vector<int8_t> w(static_cast<size_t>(kpad));
    for (int64_t t = tb; t < te; ++t) {
      uint8_t* tile = dst + t * tile_bytes;
      for (int c = 0; c < kTileN; ++c) {
        const int64_t ch = t * kTileN + c;
        std::fill(w.begin(), w.end(), 0);
        if (ch < n) decode_canonical_row(s + ch * rb, bits, k, w.data());
        for (int64_t kk = 0; kk < kpad; ++kk) {
          const int64_t g = kk / kGroup;
          const int i = c * 4 + static_cast<int>(kk % kGroup);
          if (bits == 8 && w[kk] == -128) has_min8 = true;
          const int code = w[kk] + off;
          if (bits == 8) {
            tile[g * 32 + i] = static_cast<uint8_t>(code);
          } else if (bits == 4) {
            tile[(g / 2) * 32 + i] |= static_cast<uint8_t>(code << (4 * (g % 2)));
          } else {
            uint8_t* quad = tile + (g / 4) * 96;
            const int j = static_cast<int>(g % 4);
            quad[(j / 2) * 32 + i] |= static_cast<uint8_t>((code & 0xF) << (4 * (j % 2)));
            quad[64 + i] |= static_cast<uint8_t>((code >> 4) << (2 * j));
          }
        }
      }
    }
  });
  TORCH_CHECK(!has_min8, "mixq cpu: 8-bit weights hold -128, outside the symmetric range [-127, 127] of the format");
  return out;
}

at::Tensor int_gemm(const at::Tensor& xq_in, const at::Tensor& w, int64_t bits, int64_t k, int64_t n) {
  check_prepacked(w, bits, k, n);
  check_activations(xq_in, k);
  const at::Tensor xq = xq_in.contiguous();
  at::Tensor out = at::empty({xq.size(0), n}, at::kInt);
  Epilogue ep;
  ep.out_i32 = out.data_ptr<int32_t>();
  ep.ldo = n;
  run_gemm(xq.data_ptr<int8_t>(), xq.size(0), k, w.data_ptr<uint8_t>(), bits, n, ep);
  return out;
}

at::Tensor packed_linear(const at::Tensor& xq_in, const at::Tensor& a_scale_in, const at::Tensor& w,
                         const at::Tensor& w_scale_in, const std::optional<at::Tensor>& bias_in, int64_t bits,
                         int64_t k, int64_t n, at::ScalarType out_dtype) {
  check_prepacked(w, bits, k, n);
  check_activations(xq_in, k);
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16,
              "mixq cpu: out_dtype must be float32 or bfloat16, got ", out_dtype);
  const int64_t m = xq_in.size(0);
  const at::Tensor xq = xq_in.contiguous();
  const at::Tensor a_scale = a_scale_in.to(at::kFloat).contiguous().reshape({-1});
  const at::Tensor w_scale = w_scale_in.to(at::kFloat).contiguous().reshape({-1});
  TORCH_CHECK(a_scale.numel() == m || a_scale.numel() == 1, "mixq cpu: a_scale must have M=", m,
              " or 1 elements, got ", a_scale.numel());
  TORCH_CHECK(w_scale.numel() == n, "mixq cpu: w_scale must have N=", n, " elements, got ", w_scale.numel());
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    bias = bias_in->to(at::kFloat).contiguous().reshape({-1});
    TORCH_CHECK(bias.numel() == n, "mixq cpu: bias must have N=", n, " elements, got ", bias.numel());
  }
  at::Tensor out = at::empty({m, n}, out_dtype);
  Epilogue ep;
  if (out_dtype == at::kFloat) ep.out_f32 = out.data_ptr<float>();
  else ep.out_bf16 = out.data_ptr<at::BFloat16>();
  ep.a_scale = a_scale.data_ptr<float>();
  ep.a_scale_per_row = a_scale.numel() == m;
  ep.w_scale = w_scale.data_ptr<float>();
  ep.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  ep.ldo = n;
  run_gemm(xq.data_ptr<int8_t>(), m, k, w.data_ptr<uint8_t>(), bits, n, ep);
  return out;
}

// formats.epilogue_headroom of the steps: f = 2^-e with e = max(0, floor(log2(max(top, 1))) - 64),
// top = the largest finite step (NaN and inf rows are their own business). floor(log2) is read off
// the exponent (frexp), exactly, as formats.py does with torch.frexp.
static float epilogue_headroom(const float* step, int64_t m) {
  float top = 1.f;
  for (int64_t i = 0; i < m; ++i) {
    if (std::isfinite(step[i]) && step[i] > top) top = step[i];
  }
  int exp2 = 0;
  std::frexp(top, &exp2);  // top = mantissa * 2^exp2, mantissa in [0.5, 1)
  const int e = std::max(0, exp2 - 1 - kMaxEpilogueStepLog2);
  return std::ldexp(1.f, -e);
}

std::tuple<at::Tensor, at::Tensor> linear_dynamic(const at::Tensor& x_in, const std::optional<at::Tensor>& smooth_inv_in,
                                                  const at::Tensor& w, const at::Tensor& w_scale_in,
                                                  const std::optional<at::Tensor>& bias_in, int64_t w_bits,
                                                  int64_t a_bits, int64_t k, int64_t n, at::ScalarType out_dtype,
                                                  const std::optional<at::Tensor>& a_scale_mul, bool headroom) {
  check_prepacked(w, w_bits, k, n);
  TORCH_CHECK(a_bits == 4 || a_bits == 6 || a_bits == 8, "mixq cpu: unsupported a_bits=", a_bits,
              "; supported: 4, 6, 8");
  const auto t = x_in.scalar_type();
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() == 2 && (t == at::kFloat || t == at::kBFloat16 || t == at::kHalf),
              "mixq cpu: linear_dynamic expects a 2-D float32/bfloat16/float16 CPU tensor [M, K], got ", t, " ",
              x_in.sizes(), " on ", x_in.device());
  TORCH_CHECK(x_in.size(1) == k, "mixq cpu: x has K=", x_in.size(1), " but the weights have k=", k);
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf,
              "mixq cpu: out_dtype must be float32, bfloat16 or float16, got ", out_dtype);
  const bool has_mul = a_scale_mul.has_value() && a_scale_mul->defined();
  TORCH_CHECK(!(headroom && has_mul), "mixq cpu: linear_dynamic takes a_scale_mul or headroom=True, not both");
  const at::Tensor x = x_in.contiguous();
  const int64_t m = x.size(0);
  at::Tensor smooth_inv;
  if (smooth_inv_in.has_value() && smooth_inv_in->defined()) {
    smooth_inv = smooth_inv_in->to(at::kFloat).contiguous().reshape({-1});
    TORCH_CHECK(smooth_inv.numel() == k, "mixq cpu: smooth_inv must have K=", k, " elements, got ", smooth_inv.numel());
  }
  const at::Tensor w_scale = w_scale_in.to(at::kFloat).contiguous().reshape({-1});
  TORCH_CHECK(w_scale.numel() == n, "mixq cpu: w_scale must have N=", n, " elements, got ", w_scale.numel());
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    bias = bias_in->to(at::kFloat).contiguous().reshape({-1});
    TORCH_CHECK(bias.numel() == n, "mixq cpu: bias must have N=", n, " elements, got ", bias.numel());
  }
  float mul = 1.f;
  if (has_mul) {
    TORCH_CHECK(a_scale_mul->numel() == 1, "mixq cpu: a_scale_mul must hold one value, got ", a_scale_mul->numel());
    mul = a_scale_mul->to(at::kFloat).item<float>();
  }
  // The kernels write fp32 or bf16; fp16 is rounded from fp32 afterwards, as the reference rounds it.
  const at::ScalarType kernel_dtype = out_dtype == at::kHalf ? at::kFloat : out_dtype;
  at::Tensor out = at::empty({m, n}, kernel_dtype);
  at::Tensor a_scale = at::empty({m}, at::kFloat);
  if (m == 0) return {out.to(out_dtype), a_scale};
  Epilogue ep;
  if (kernel_dtype == at::kFloat) ep.out_f32 = out.data_ptr<float>();
  else ep.out_bf16 = out.data_ptr<at::BFloat16>();
  ep.w_scale = w_scale.data_ptr<float>();
  ep.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  ep.ldo = n;
  RowSource src;
  src.x = static_cast<const char*>(x.data_ptr());
  src.dtype = t;
  src.row_bytes = k * static_cast<int64_t>(x.element_size());
  src.smooth_inv = smooth_inv.defined() ? smooth_inv.data_ptr<float>() : nullptr;
  src.a_bits = a_bits;
  src.scale_out = a_scale.data_ptr<float>();
  src.scale_mul = mul;
  run_gemm(nullptr, m, k, w.data_ptr<uint8_t>(), w_bits, n, ep, &src);
  // Headroom (QuantLinear's dynamic forward): the factor depends on every row's step, known only
  // once the call has quantized them all, so the call runs with f = 1 (every input below ~1e21)
  // and, in the rare case that needs f < 1, once more with steps * f and bias * f, then divides
  // the output (in its own dtype) by f: the operations, in the order, of formats.py's rule.
  const float f = headroom ? epilogue_headroom(a_scale.data_ptr<float>(), m) : 1.f;
  at::Tensor bias_f;
  if (f != 1.f) {
    if (bias.defined()) {
      bias_f = at::empty({n}, at::kFloat);
      for (int64_t j = 0; j < n; ++j) bias_f.data_ptr<float>()[j] = bias.data_ptr<float>()[j] * f;
      ep.bias = bias_f.data_ptr<float>();
    }
    src.scale_mul = f;
    run_gemm(nullptr, m, k, w.data_ptr<uint8_t>(), w_bits, n, ep, &src);
  }
  if (out_dtype != kernel_dtype) out = out.to(out_dtype);
  if (f != 1.f) out.div_(at::scalar_tensor(f, at::kFloat));
  return {out, a_scale};
}

}  // namespace mixq
