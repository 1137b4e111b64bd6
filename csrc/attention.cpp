// Attention matmuls on integer codes (issue 15, phase 2): Q K^T and P V, bit-exact with
// mixq/backends/reference.py (attention_qk, attention_pv).
//
// Both are int16 "pair" GEMMs: C[r][c] = sum_k A[r][k] * B[k][c], exact in int32, with A a block
// of rows converted to int16 and B packed per (batch*head) as [col block of 16][k pair][16][2]
// int16, the operand layout of AVX2 `vpmaddwd` (and AVX-512 VNNI `vpdpwssd`): one broadcast of
// the pair (A[r][2p], A[r][2p+1]) times 16 columns gives 16 exact pair sums. Sign-extended int8
// or uint8 codes are at most 2^15 in magnitude, so every pair sum fits int32 exactly.
//
//   QK:          A = Q codes [N, D], B[d][j] = K[j][d]        -> acc [N, M], |acc| <= 2^14 D
//   PV uniform:  A = P codes [N, M] (0..255), B[j][d] = V[j][d] -> |acc| <= 255*128*M
//   PV log2:     weights 2^s, s = cmax - c in [0, 31], do not fit int16. Split by s:
//                  plane 0: s in [0, 14]   weight 2^s        (dense, int16 <= 2^14)
//                  plane 1: s in [15, 29]  weight 2^(s-15)   (dense, int16 <= 2^14)
//                  s in {30, 31} (p >= 2^-1.5: at most two per softmax row): sparse, added
//                  to the int64 sum directly as v << s.
//                acc = sum_chunks (C0 + (C1 << 15)) + sparse, in int64. A plane that no row of a
//                block uses is skipped (4 bits never use plane 1; flat rows rarely use plane 0).
//
// Overflow bounds (|v| <= 128 since V is int8, codes <= 255, one pair sum <= 2 * 2^14 * 128):
//   - QK: |acc| <= 128*128*D = 2^14 D <= 2^30 for D <= kMaxHeadDim = 65536: int32.
//   - PV uniform: |acc| <= 255*128*M <= 2,139,095,040 < 2^31 for M <= kMaxKeys = 65536: int32.
//   - PV log2, one plane, one chunk of kLog2ChunkPairs = 256 pairs (512 keys):
//     |C| <= 512 * 2^14 * 128 = 2^30 < 2^31: int32; chunks are summed in int64.
//   - PV log2 total: |acc| <= M * 128 * 2^31 = M * 2^38 <= 2^54 < 2^63 for M <= 65536: int64.
// fp32(acc): QK and uniform sums are int32, converted once (round to nearest even), as the
// reference's exact float64 -> fp32. The log2 int64 sum is converted as (float)(double)acc: the
// reference holds acc in float64 (exact below 2^53; beyond, its int64 result is rounded to
// float64 first), then rounds to fp32, so the same two steps give the same fp32 bit for bit.
//
// Threads: one OpenMP region per call; B is packed for every (batch*head) first, then items
// (batch*head, block of rows) are shared out dynamically, so both cores are busy from a single
// ViT head set (12 x 197 rows) to SAM's 300 windows. Inside an item, each 16-column panel of B
// stays in L1/L2 while every 4-row group of the block passes over it.
#include "mixq_cpu.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace mixq {

namespace {

constexpr int kMR = 4;               // rows per micro tile
constexpr int kNR = 16;              // columns per micro tile (two vectors of 8 int32)
constexpr int64_t kLog2ChunkPairs = 256;

int64_t round_up_i(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// A micro tile: c[r][0..16) = sum_{p < kpairs} a[r][2p..2p+1] . panel[p][0..16)[0..1], int32.
// a: kMR rows of int16 with row stride lda (elements); panel: [kpairs][16][2] int16.
using TileFn = void (*)(const int16_t* a, int64_t lda, const int16_t* panel, int64_t kpairs, int32_t* c);

// No loop vectorization here: GCC 12 at -O3 vectorizes the row loop with loads past the 4th row
// (seen as a segfault when the A block ended at a page boundary; a guard-page test reproduces it).
__attribute__((optimize("no-tree-loop-vectorize")))
void tile_scalar(const int16_t* a, int64_t lda, const int16_t* panel, int64_t kpairs, int32_t* c) {
  int32_t acc[kMR][kNR] = {};
  for (int64_t p = 0; p < kpairs; ++p) {
    const int16_t* b = panel + p * 2 * kNR;
    for (int r = 0; r < kMR; ++r) {
      const int32_t a0 = a[r * lda + 2 * p], a1 = a[r * lda + 2 * p + 1];
      for (int col = 0; col < kNR; ++col) acc[r][col] += a0 * b[2 * col] + a1 * b[2 * col + 1];
    }
  }
  std::memcpy(c, acc, sizeof(acc));
}

#if defined(__x86_64__)
#define MIXQ_ATTN_AVX2 __attribute__((target("avx2,fma")))
#define MIXQ_ATTN_VNNI __attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni")))

MIXQ_ATTN_AVX2 inline __m256i broadcast_pair(const int16_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm256_set1_epi32(v);
}

MIXQ_ATTN_AVX2 void tile_avx2(const int16_t* a, int64_t lda, const int16_t* panel, int64_t kpairs, int32_t* c) {
  __m256i acc[kMR][2];
#pragma GCC unroll 4
  for (int r = 0; r < kMR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int64_t p = 0; p < kpairs; ++p) {
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + p * 2 * kNR));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + p * 2 * kNR + kNR));
#pragma GCC unroll 4
    for (int r = 0; r < kMR; ++r) {
      const __m256i x = broadcast_pair(a + r * lda + 2 * p);
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(x, b0));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(x, b1));
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < kMR; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + r * kNR), acc[r][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + r * kNR + 8), acc[r][1]);
  }
}

MIXQ_ATTN_VNNI void tile_vnni(const int16_t* a, int64_t lda, const int16_t* panel, int64_t kpairs, int32_t* c) {
  __m256i acc[kMR][2];
#pragma GCC unroll 4
  for (int r = 0; r < kMR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int64_t p = 0; p < kpairs; ++p) {
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + p * 2 * kNR));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + p * 2 * kNR + kNR));
#pragma GCC unroll 4
    for (int r = 0; r < kMR; ++r) {
      int32_t v;
      std::memcpy(&v, a + r * lda + 2 * p, sizeof(v));
      const __m256i x = _mm256_set1_epi32(v);
      acc[r][0] = _mm256_dpwssd_epi32(acc[r][0], x, b0);  // non-saturating: exact within the bounds
      acc[r][1] = _mm256_dpwssd_epi32(acc[r][1], x, b1);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < kMR; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + r * kNR), acc[r][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + r * kNR + 8), acc[r][1]);
  }
}
#endif

TileFn choose_tile(Isa isa) {
#if defined(__x86_64__)
  // every family from VNNI up (a wider one such as AMX included) has AVX-512 VNNI
  if (static_cast<int>(isa) >= static_cast<int>(Isa::kVnni)) return tile_vnni;
  if (isa == Isa::kAvx2) return tile_avx2;
#endif
  (void)isa;
  return tile_scalar;
}

// B[k][c] = src[k * stride_k + c * stride_c] (int8), k < kdim, c < cols, packed as
// [ceil(cols/16)][kpairs][16][2] int16, zero outside.
void pack_b(const int8_t* src, int64_t stride_k, int64_t stride_c, int64_t kdim, int64_t cols, int64_t kpairs,
            int16_t* dst) {
  const int64_t nblocks = round_up_i(cols, kNR) / kNR;
  for (int64_t cb = 0; cb < nblocks; ++cb) {
    int16_t* panel = dst + cb * kpairs * 2 * kNR;
    for (int64_t p = 0; p < kpairs; ++p) {
      for (int col = 0; col < kNR; ++col) {
        const int64_t c = cb * kNR + col;
        for (int e = 0; e < 2; ++e) {
          const int64_t k = 2 * p + e;
          panel[(p * kNR + col) * 2 + e] = (c < cols && k < kdim) ? src[k * stride_k + c * stride_c] : 0;
        }
      }
    }
  }
}

int choose_threads(int64_t macs) { return macs < (int64_t{1} << 18) ? 1 : std::max(1, at::get_num_threads()); }

// Rows per work item: 32, fewer when that leaves fewer than 8 items per thread.
int64_t choose_row_block(int64_t bh, int64_t n, int nthreads) {
  int64_t rb = 32;
  while (rb > kMR && bh * ((n + rb - 1) / rb) < 8 * nthreads) rb /= 2;
  return rb;
}

// The shared driver of the int32 pair GEMMs (QK, PV uniform).
// a_row(bh, i, dst): writes row i of A (kpad int16, zero padded). epilogue(bh, i, c0, ncols, acc)
// turns acc[0..ncols) (row i, columns c0..) into outputs.
template <class ARow, class Epilogue>
void run_pair_gemm(int64_t bh_count, int64_t n, int64_t cols, int64_t kdim, const int8_t* b_src,
                   int64_t b_bh_stride, int64_t b_stride_k, int64_t b_stride_c, const ARow& a_row,
                   const Epilogue& epilogue) {
  if (bh_count == 0 || n == 0 || cols == 0) return;
  const int64_t kpairs = round_up_i(kdim, 2) / 2;
  const int64_t kpad = 2 * kpairs;
  const int64_t nblocks = round_up_i(cols, kNR) / kNR;
  const int64_t panel_elems = kpairs * 2 * kNR;
  const int64_t b_elems = nblocks * panel_elems;
  std::vector<int16_t> bpack(static_cast<size_t>(bh_count * b_elems));
  const TileFn tile = choose_tile(active_isa());
  const int nthreads = choose_threads(bh_count * n * cols * std::max<int64_t>(kdim, 1));
  const int64_t rb = choose_row_block(bh_count, n, nthreads);
  const int64_t row_blocks = (n + rb - 1) / rb;

#pragma omp parallel num_threads(nthreads)
  {
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < bh_count; ++bh)
      pack_b(b_src + bh * b_bh_stride, b_stride_k, b_stride_c, kdim, cols, kpairs, bpack.data() + bh * b_elems);
    // (implicit barrier: every panel is packed before any item reads it)
    std::vector<int16_t> abuf(static_cast<size_t>(rb * std::max<int64_t>(kpad, 1)));
    alignas(64) int32_t ctile[kMR * kNR];
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < bh_count * row_blocks; ++item) {
      const int64_t bh = item / row_blocks;
      const int64_t i0 = (item % row_blocks) * rb;
      const int64_t rows = std::min(rb, n - i0);
      const int64_t rows_pad = round_up_i(rows, kMR);
      for (int64_t r = 0; r < rows_pad; ++r) {
        int16_t* dst = abuf.data() + r * kpad;
        if (r < rows) a_row(bh, i0 + r, dst);
        else std::fill(dst, dst + kpad, int16_t{0});
      }
      const int16_t* bp = bpack.data() + bh * b_elems;
      for (int64_t cb = 0; cb < nblocks; ++cb) {
        const int64_t c0 = cb * kNR;
        const int64_t ncols = std::min<int64_t>(kNR, cols - c0);
        for (int64_t r0 = 0; r0 < rows; r0 += kMR) {
          tile(abuf.data() + r0 * kpad, kpad, bp + cb * panel_elems, kpairs, ctile);
          for (int64_t r = 0; r < std::min<int64_t>(kMR, rows - r0); ++r)
            epilogue(bh, i0 + r0 + r, c0, ncols, ctile + r * kNR);
        }
      }
    }
  }
}

at::Tensor contiguous_of(const at::Tensor& t, at::ScalarType dtype, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), "mixq attention: ", what, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == dtype, "mixq attention: ", what, " must be ", c10::toString(dtype), ", got ",
              c10::toString(t.scalar_type()));
  return t.contiguous();
}

}  // namespace

at::Tensor attention_qk(const at::Tensor& q_in, const at::Tensor& q_scale_in, const at::Tensor& k_in,
                        const at::Tensor& k_scale_in) {
  TORCH_CHECK(q_in.dim() == 3 && k_in.dim() == 3, "mixq attention_qk: q and k must be 3-D [BH, N, D] / [BH, M, D]");
  const at::Tensor q = contiguous_of(q_in, at::kChar, "q"), k = contiguous_of(k_in, at::kChar, "k");
  const at::Tensor qs = contiguous_of(q_scale_in, at::kFloat, "q_scale");
  const at::Tensor ks = contiguous_of(k_scale_in, at::kFloat, "k_scale");
  const int64_t bh = q.size(0), n = q.size(1), d = q.size(2), m = k.size(1);
  TORCH_CHECK(k.size(0) == bh && k.size(2) == d, "mixq attention_qk: k must be [BH, M, D] with q's BH and D");
  TORCH_CHECK(d <= kMaxHeadDim, "mixq attention_qk: head dim ", d, " above ", kMaxHeadDim, " (int32 bound)");
  TORCH_CHECK(qs.numel() == bh * n && ks.numel() == bh * m, "mixq attention_qk: scales must be [BH, N] / [BH, M]");
  at::Tensor out = at::empty({bh, n, m}, q.options().dtype(at::kFloat));
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* qsp = qs.data_ptr<float>();
  const float* ksp = ks.data_ptr<float>();
  float* op = out.data_ptr<float>();
  run_pair_gemm(
      bh, n, m, d, k.data_ptr<int8_t>(), m * d, /*stride_k=*/1, /*stride_c=*/d,
      [&](int64_t b, int64_t i, int16_t* dst) {
        const int8_t* row = qp + (b * n + i) * d;
        for (int64_t t = 0; t < d; ++t) dst[t] = row[t];
        if (d % 2) dst[d] = 0;
      },
      [&](int64_t b, int64_t i, int64_t c0, int64_t ncols, const int32_t* acc) {
        const float s = qsp[b * n + i];
        const float* kss = ksp + b * m + c0;
        float* o = op + (b * n + i) * m + c0;
        for (int64_t c = 0; c < ncols; ++c) o[c] = (static_cast<float>(acc[c]) * s) * kss[c];
      });
  return out;
}

namespace {

// One row of log2 codes -> the two plane weights (as the tables in attention_pv_log2 define them),
// OR-ing each plane's weights and the sparse flag (a shift >= 30) into flags[0..2]. One body,
// compiled plain and inlined into an AVX2 function, where GCC vectorizes it (vpsllvd).
inline void log2_weights_body(const uint8_t* row, int64_t m, int cmax, int zero_code, int16_t* d0, int16_t* d1,
                              int* flags) {
  int o0 = 0, o1 = 0, os = 0;
  for (int64_t j = 0; j < m; ++j) {
    const int c = row[j];
    const int s = cmax - std::min(c, cmax);
    const int live = c != zero_code;
    const int w0 = (live & (s < 15)) ? 1 << (s & 15) : 0;
    const int w1 = (live & (s >= 15) & (s < 30)) ? 1 << ((s - 15) & 15) : 0;
    d0[j] = static_cast<int16_t>(w0);
    d1[j] = static_cast<int16_t>(w1);
    o0 |= w0;
    o1 |= w1;
    os |= live & (s >= 30);
  }
  flags[0] |= o0;
  flags[1] |= o1;
  flags[2] |= os;
}

using Log2WeightsFn = void (*)(const uint8_t*, int64_t, int, int, int16_t*, int16_t*, int*);

void log2_weights_plain(const uint8_t* row, int64_t m, int cmax, int zero_code, int16_t* d0, int16_t* d1,
                        int* flags) {
  log2_weights_body(row, m, cmax, zero_code, d0, d1, flags);
}

#if defined(__x86_64__)
MIXQ_ATTN_AVX2 void log2_weights_avx2(const uint8_t* row, int64_t m, int cmax, int zero_code, int16_t* d0,
                                      int16_t* d1, int* flags) {
  log2_weights_body(row, m, cmax, zero_code, d0, d1, flags);
}
#endif

Log2WeightsFn choose_log2_weights(Isa isa) {
#if defined(__x86_64__)
  if (isa >= Isa::kAvx2) return log2_weights_avx2;
#endif
  (void)isa;
  return log2_weights_plain;
}

void check_pv(const at::Tensor& p, const at::Tensor& v, const at::Tensor& vs) {
  TORCH_CHECK(p.dim() == 3 && v.dim() == 3 && vs.dim() == 2,
              "mixq attention_pv: p [BH, N, M], v [BH, M, D], v_scale [BH, D]");
  TORCH_CHECK(v.size(0) == p.size(0) && v.size(1) == p.size(2), "mixq attention_pv: v must be [BH, M, D]");
  TORCH_CHECK(vs.size(0) == p.size(0) && vs.size(1) == v.size(2), "mixq attention_pv: v_scale must be [BH, D]");
  TORCH_CHECK(p.size(2) <= kMaxKeys, "mixq attention_pv: ", p.size(2), " keys, above ", kMaxKeys,
              " (overflow bound)");
}

}  // namespace

at::Tensor attention_pv_uniform(const at::Tensor& p_in, const at::Tensor& v_in, const at::Tensor& v_scale_in,
                                int64_t bits) {
  const at::Tensor p = contiguous_of(p_in, at::kByte, "p"), v = contiguous_of(v_in, at::kChar, "v");
  const at::Tensor vs = contiguous_of(v_scale_in, at::kFloat, "v_scale");
  check_pv(p, v, vs);
  TORCH_CHECK(bits >= 2 && bits <= 8, "mixq attention_pv: bits must be in [2, 8]");
  const int64_t bh = p.size(0), n = p.size(1), m = p.size(2), d = v.size(2);
  at::Tensor out = at::empty({bh, n, d}, p.options().dtype(at::kFloat));
  const uint8_t* pp = p.data_ptr<uint8_t>();
  const float* vsp = vs.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // fp32(1 / (2^b - 1)), as formats.prob_integer_weights rounds it.
  const float step = static_cast<float>(1.0 / static_cast<double>((int64_t{1} << bits) - 1));
  run_pair_gemm(
      bh, n, d, m, v.data_ptr<int8_t>(), m * d, /*stride_k=*/d, /*stride_c=*/1,
      [&](int64_t b, int64_t i, int16_t* dst) {
        const uint8_t* row = pp + (b * n + i) * m;
        for (int64_t t = 0; t < m; ++t) dst[t] = row[t];
        if (m % 2) dst[m] = 0;
      },
      [&](int64_t b, int64_t i, int64_t c0, int64_t ncols, const int32_t* acc) {
        const float* vss = vsp + b * d + c0;
        float* o = op + (b * n + i) * d + c0;
        for (int64_t c = 0; c < ncols; ++c) o[c] = (static_cast<float>(acc[c]) * step) * vss[c];
      });
  return out;
}

at::Tensor attention_pv_log2(const at::Tensor& p_in, const at::Tensor& v_in, const at::Tensor& v_scale_in,
                             int64_t cmax, int64_t zero_code) {
  const at::Tensor p = contiguous_of(p_in, at::kByte, "p"), v = contiguous_of(v_in, at::kChar, "v");
  const at::Tensor vs = contiguous_of(v_scale_in, at::kFloat, "v_scale");
  check_pv(p, v, vs);
  TORCH_CHECK(cmax >= 0 && cmax <= 31, "mixq attention_pv: cmax must be in [0, 31]");
  const int64_t bh = p.size(0), n = p.size(1), m = p.size(2), d = v.size(2);
  at::Tensor out = at::empty({bh, n, d}, p.options().dtype(at::kFloat));
  if (bh == 0 || n == 0 || d == 0) return out;
  const uint8_t* pp = p.data_ptr<uint8_t>();
  const int8_t* vp = v.data_ptr<int8_t>();
  const float* vsp = vs.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float step = static_cast<float>(1.0 / static_cast<double>(int64_t{1} << cmax));  // 2^-cmax, exact

  // Per code: its shift s = cmax - min(c, cmax) (formats.prob_integer_weights), -1 for the zero code
  // (log2_weights_body computes the plane weights from the same rule).
  int shift_of[256];
  for (int c = 0; c < 256; ++c) shift_of[c] = c == zero_code ? -1 : static_cast<int>(cmax - std::min<int64_t>(c, cmax));
  const Log2WeightsFn log2_weights = choose_log2_weights(active_isa());

  const int64_t kpairs = round_up_i(m, 2) / 2, kpad = 2 * kpairs;
  const int64_t nblocks = round_up_i(d, kNR) / kNR;
  const int64_t panel_elems = kpairs * 2 * kNR;
  const int64_t b_elems = nblocks * panel_elems;
  std::vector<int16_t> bpack(static_cast<size_t>(bh * b_elems));
  const TileFn tile = choose_tile(active_isa());
  const int nthreads = choose_threads(2 * bh * n * d * std::max<int64_t>(m, 1));
  const int64_t rb = choose_row_block(bh, n, nthreads);
  const int64_t row_blocks = (n + rb - 1) / rb;

#pragma omp parallel num_threads(nthreads)
  {
#pragma omp for schedule(static)
    for (int64_t b = 0; b < bh; ++b) pack_b(vp + b * m * d, d, 1, m, d, kpairs, bpack.data() + b * b_elems);
    std::vector<int16_t> a0(static_cast<size_t>(rb * std::max<int64_t>(kpad, 1)));
    std::vector<int16_t> a1(a0.size());
    std::vector<int64_t> sparse_start(static_cast<size_t>(rb + 1));
    std::vector<int64_t> sparse_j;  // (j, shift) of the codes with s >= 30, by row
    std::vector<int> sparse_s;
    alignas(64) int32_t c0t[kMR * kNR], c1t[kMR * kNR];
    int64_t acc[kMR][kNR];
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < bh * row_blocks; ++item) {
      const int64_t b = item / row_blocks;
      const int64_t i0 = (item % row_blocks) * rb;
      const int64_t rows = std::min(rb, n - i0);
      const int64_t rows_pad = round_up_i(rows, kMR);
      sparse_j.clear();
      sparse_s.clear();
      int flags[3] = {0, 0, 0};  // the block uses plane 0 / plane 1 / sparse shifts (4 bits: never plane 1)
      for (int64_t r = 0; r < rows_pad; ++r) {
        int16_t* d0 = a0.data() + r * kpad;
        int16_t* d1 = a1.data() + r * kpad;
        if (r >= rows) {
          std::fill(d0, d0 + kpad, int16_t{0});
          std::fill(d1, d1 + kpad, int16_t{0});
          continue;
        }
        log2_weights(pp + (b * n + i0 + r) * m, m, static_cast<int>(cmax), static_cast<int>(zero_code), d0, d1,
                     flags);
        if (m % 2) d0[m] = d1[m] = 0;
      }
      for (int64_t r = 0; r < rows_pad; ++r) {  // shifts 30 and 31, by row (none on most rows)
        sparse_start[r] = static_cast<int64_t>(sparse_j.size());
        if (!flags[2] || r >= rows) continue;
        const uint8_t* row = pp + (b * n + i0 + r) * m;
        for (int64_t j = 0; j < m; ++j) {
          if (shift_of[row[j]] >= 30) {
            sparse_j.push_back(j);
            sparse_s.push_back(shift_of[row[j]]);
          }
        }
      }
      sparse_start[rows_pad] = static_cast<int64_t>(sparse_j.size());
      const int16_t* bp = bpack.data() + b * b_elems;
      const int8_t* vb = vp + b * m * d;
      for (int64_t cb = 0; cb < nblocks; ++cb) {
        const int64_t col0 = cb * kNR;
        const int64_t ncols = std::min<int64_t>(kNR, d - col0);
        const int16_t* panel = bp + cb * panel_elems;
        for (int64_t r0 = 0; r0 < rows; r0 += kMR) {
          std::memset(acc, 0, sizeof(acc));
          for (int64_t p0 = 0; p0 < kpairs; p0 += kLog2ChunkPairs) {  // int32 chunks, summed in int64
            const int64_t np = std::min(kLog2ChunkPairs, kpairs - p0);
            if (flags[0]) tile(a0.data() + r0 * kpad + 2 * p0, kpad, panel + p0 * 2 * kNR, np, c0t);
            else std::memset(c0t, 0, sizeof(c0t));
            if (flags[1]) tile(a1.data() + r0 * kpad + 2 * p0, kpad, panel + p0 * 2 * kNR, np, c1t);
            else std::memset(c1t, 0, sizeof(c1t));
            for (int r = 0; r < kMR; ++r)
              for (int c = 0; c < kNR; ++c)
                acc[r][c] += static_cast<int64_t>(c0t[r * kNR + c]) + static_cast<int64_t>(c1t[r * kNR + c]) * 32768;
          }
          const int64_t nr = std::min<int64_t>(kMR, rows - r0);
          for (int64_t r = 0; r < nr; ++r) {
            for (int64_t e = sparse_start[r0 + r]; e < sparse_start[r0 + r + 1]; ++e) {
              const int8_t* vrow = vb + sparse_j[e] * d + col0;
              for (int64_t c = 0; c < ncols; ++c) acc[r][c] += static_cast<int64_t>(vrow[c]) * (int64_t{1} << sparse_s[e]);
            }
            const float* vss = vsp + b * d + col0;
            float* o = op + (b * n + i0 + r0 + r) * d + col0;
            for (int64_t c = 0; c < ncols; ++c)
              o[c] = (static_cast<float>(static_cast<double>(acc[r][c])) * step) * vss[c];
          }
        }
      }
    }
  }
  return out;
}

}  // namespace mixq
