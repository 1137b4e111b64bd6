"""Integer attention matmuls on int8 tensor cores: Q K^T and softmax(.) V (issue 15, phase 2).

Both are batched over flattened leading dims (batch, heads, windows) and follow
``backends/reference.py`` (``attention_qk``, ``attention_pv``) bit for bit; the number format is in
docs/DESIGN_NOTES.md, "Attention matmuls".

``quantized_qk``: int8 Q [B, N, D] x int8 K [B, M, D]^T, one ``tl.dot`` per D tile into an int32
accumulator (exact: |acc| <= 128 * 128 * D <= 2**22 for D <= MAX_HEAD_DIM), then
``(fp32(acc) * q_scale[i]) * k_scale[j]``.

``quantized_pv``: uint8 probability codes P [B, N, M] x int8 V [B, M, D]. The integer weights do not
fit int8 (log2: 2**e with e = cmax - c up to 31; uniform: c up to 255), so each tile of codes is
split, in registers, into a few int8 matrices whose weighted sum is the weight matrix, and each goes
through its own int8 ``tl.dot`` with its own int32 accumulator:

* log2: e = 7 t + r (t = e // 7, r = e % 7), so 2**e = 2**(7 t) * 2**r with 2**r in {1, ..., 64}:
  P = sum_t 2**(7 t) P_t, where P_t holds 2**r where the code falls in bucket t, else 0; the zero
  code is 0 in every bucket. In registers: P_t = (2**e >> 7 t) & 127 on uint32 (three ops a code).
  ``cmax // 7 + 1`` buckets: 5 at cmax = 31 (6 and 8 bits), 3 at 14 (4 bits).
* uniform: c = 16 hi + lo with hi, lo in 0..15: two matrices.

Bound (why every int32 accumulator is exact): an entry of any split matrix is at most 64 (log2) or 15
(uniform) and |v| <= 128 (any int8), so every partial sum of one bucket over M tokens is at most
64 * 128 * M < 2**31 for M <= MAX_PV_TOKENS = 2**18 - 1. The buckets are combined once, after the
token loop, in int64: |acc| <= 128 * M * (2**31 - 1) < 2**57, exact. The int64 is then rounded as the
reference rounds it: to float64 (exact below 2**53; the reference's int64 path rounds there too),
then to fp32 (round to nearest even), then ``(acc * step) * v_scale[d]`` in fp32, in that order.

Codes outside the grid (a uint8 above 2**bits - 1, or a log2 code between cmax and the zero code)
get what the reference gives them: log2 clamps them to cmax (weight 1), uniform uses them as they
are. ``quantize_probs`` never makes them.

Launch conventions as in :mod:`.gemm`: ``enable_fp_fusion=False`` (the epilogue's two multiplies are
rounded separately), 64-bit offsets only when some operand spans 2**31 elements or more, no host
synchronisation (CUDA-graph safe). Head dims 1..MAX_HEAD_DIM are accepted: Q K^T loops over D in
tiles of 32 or 64 with masked loads, P V pads D to a power of two (>= 16) in registers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from mixq import formats

from .gemm import INT64_THRESHOLD, _round_to_bf16_grid
from .quantize import round_half_even

MAX_HEAD_DIM: int = 256
# Largest token count of P V: 64 * 128 * M must stay below 2**31 in every bucket's int32 accumulator.
MAX_PV_TOKENS: int = 2**18 - 1
LOG2_BUCKET_BITS: int = 7  # 2**6 = 64 is the largest power of two that int8 holds
MAX_PROGRAMS: int = 2**31 - 1  # CUDA's grid x limit


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Tiles of one attention launch: block_n rows of the output, block_m key tokens (QK: output
    columns; PV: the tokens summed per loop step)."""

    block_n: int
    block_m: int
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_n", "block_m"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot minimum), got {v}")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
            raise ValueError(f"num_warps must be one of 1, 2, 4, 8, 16 and num_stages >= 1, got {self}")


def default_config(op: str, n: int, m: int, device: torch.device) -> AttentionConfig:
    """Heuristic tiles (no table yet; statically spill-free at sm_90a, bench/results/gpu_static.md): QK^T
    64x64 / 4 warps (one Hopper warpgroup), 128x128 / 8 warps at long sequences; P V 64x64 / 8 warps.
    Small tiles under the interpreter, where work grows with the tile."""
    if device.type != "cuda":
        return AttentionConfig(32, 32, num_warps=1, num_stages=1)
    if op == "qk":
        big = n >= 1024 and m >= 1024
        return AttentionConfig(128, 128, num_warps=8, num_stages=3) if big else AttentionConfig(64, 64, 4, 3)
    # P V: 8 warps split the five int32 bucket accumulators (4 warps: 255 registers, spills at sm_90a)
    return AttentionConfig(64, 64, num_warps=8, num_stages=3)


@triton.jit
def _store_out(out_ptr, out, mask):
    if out_ptr.dtype.element_ty == tl.bfloat16:
        out = _round_to_bf16_grid(out)  # the interpreter's cast truncates; the reference rounds to even
    tl.store(out_ptr, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qk_kernel(
    q_ptr, k_ptr, qs_ptr, ks_ptr, out_ptr,
    N, M, D, tiles_n, tiles_m,
    stride_qb, stride_qn, stride_qd, stride_kb, stride_km, stride_kd,
    stride_qsb, stride_qsn, stride_ksb, stride_ksm, stride_ob, stride_on, stride_om,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, INT64: tl.constexpr,
):
    pid = tl.program_id(0)
    per_batch = tiles_n * tiles_m
    b = pid // per_batch
    pid_n = (pid % per_batch) // tiles_m
    pid_m = pid % tiles_m
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    if INT64:  # every index that multiplies a stride: a strided view may put D or N far apart
        b = b.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
        offs_m = offs_m.to(tl.int64)
        offs_d = offs_d.to(tl.int64)
    mask_n = offs_n < N
    mask_m = offs_m < M
    q_rows = q_ptr + b * stride_qb + offs_n[:, None] * stride_qn
    k_rows = k_ptr + b * stride_kb + offs_m[None, :] * stride_km
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + offs_d
        q = tl.load(q_rows + ds[None, :] * stride_qd, mask=mask_n[:, None] & (ds < D)[None, :], other=0)
        k_t = tl.load(k_rows + ds[:, None] * stride_kd, mask=(ds < D)[:, None] & mask_m[None, :], other=0)
        acc = tl.dot(q, k_t, acc, out_dtype=tl.int32)  # |acc| <= 128 * 128 * D: exact
    q_s = tl.load(qs_ptr + b * stride_qsb + offs_n * stride_qsn, mask=mask_n, other=0.0)
    k_s = tl.load(ks_ptr + b * stride_ksb + offs_m * stride_ksm, mask=mask_m, other=0.0)
    out = (acc.to(tl.float32) * q_s[:, None]) * k_s[None, :]
    _store_out(out_ptr + b * stride_ob + offs_n[:, None] * stride_on + offs_m[None, :] * stride_om, out,
               mask_n[:, None] & mask_m[None, :])


@triton.jit
def _bucket(pow2, which: tl.constexpr):
    """The int8 matrix of bucket ``which``: 2**(e - 7 which) where 7 which <= e < 7 which + 7, else 0.

    ``pow2`` = 2**e as uint32 (0 for the zero code): shifted down by 7 which, the bit lands in the low
    seven bits exactly when e is in the bucket (below it, it shifts out; above it, the mask drops it).
    """
    return ((pow2 >> (7 * which)) & 127).to(tl.int8)


@triton.jit
def _pv_kernel(
    p_ptr, v_ptr, vs_ptr, out_ptr,
    N, M, D, tiles_n,
    stride_pb, stride_pn, stride_pm, stride_vb, stride_vm, stride_vd,
    stride_vsb, stride_vsd, stride_ob, stride_on, stride_od,
    LOG2: tl.constexpr, CMAX: tl.constexpr, ZERO_CODE: tl.constexpr, BUCKETS: tl.constexpr,
    STEP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, INT64: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // tiles_n
    pid_n = pid % tiles_n
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    if INT64:
        b = b.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
        offs_d = offs_d.to(tl.int64)
    mask_n = offs_n < N
    mask_d = offs_d < D
    p_rows = p_ptr + b * stride_pb + offs_n[:, None] * stride_pn
    v_cols = v_ptr + b * stride_vb + offs_d[None, :] * stride_vd
    # one int32 accumulator per bucket (log2) or per nibble (uniform); unused ones fold away
    acc0 = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.int32)
    acc1 = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.int32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.int32)
    acc3 = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.int32)
    acc4 = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.int32)
    for m0 in range(0, M, BLOCK_M):
        ks = m0 + offs_k
        mask_k = ks < M
        c = tl.load(p_rows + ks[None, :] * stride_pm, mask=mask_n[:, None] & mask_k[None, :], other=ZERO_CODE)
        c = c.to(tl.int32)
        v = tl.load(v_cols + ks[:, None] * stride_vm, mask=mask_k[:, None] & mask_d[None, :], other=0)
        if LOG2:
            e = CMAX - tl.minimum(c, CMAX)  # the reference clamps off-grid codes to cmax
            pow2 = tl.full(e.shape, 1, tl.uint32) << e.to(tl.uint32)  # 2**e, e <= 31: fits uint32
            pow2 = tl.where(c == ZERO_CODE, 0, pow2)  # the zero code is in no bucket
            acc0 = tl.dot(_bucket(pow2, 0), v, acc0, out_dtype=tl.int32)
            if BUCKETS > 1:
                acc1 = tl.dot(_bucket(pow2, 1), v, acc1, out_dtype=tl.int32)
            if BUCKETS > 2:
                acc2 = tl.dot(_bucket(pow2, 2), v, acc2, out_dtype=tl.int32)
            if BUCKETS > 3:
                acc3 = tl.dot(_bucket(pow2, 3), v, acc3, out_dtype=tl.int32)
            if BUCKETS > 4:
                acc4 = tl.dot(_bucket(pow2, 4), v, acc4, out_dtype=tl.int32)
        else:
            acc0 = tl.dot((c & 15).to(tl.int8), v, acc0, out_dtype=tl.int32)
            acc1 = tl.dot((c >> 4).to(tl.int8), v, acc1, out_dtype=tl.int32)
    # combine once, exactly, in int64 (|acc| < 2**57), then round as the reference does
    if LOG2:
        total = (acc0.to(tl.int64) + acc1.to(tl.int64) * 128 + acc2.to(tl.int64) * 16384
                 + acc3.to(tl.int64) * 2097152 + acc4.to(tl.int64) * 268435456)
    else:
        total = acc0.to(tl.int64) + acc1.to(tl.int64) * 16
    accf = total.to(tl.float64).to(tl.float32)
    v_s = tl.load(vs_ptr + b * stride_vsb + offs_d * stride_vsd, mask=mask_d, other=0.0)
    out = (accf * STEP) * v_s[None, :]
    _store_out(out_ptr + b * stride_ob + offs_n[:, None] * stride_on + offs_d[None, :] * stride_od, out,
               mask_n[:, None] & mask_d[None, :])


# ----------------------------------------------------------------------------- launchers


def _span(t: torch.Tensor) -> int:
    """Elements between a tensor's first and last addressed element, plus one (what offsets reach)."""
    return 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 0)


def _flat3(t: torch.Tensor) -> torch.Tensor:
    """[..., R, C] -> [B, R, C], a view whenever the leading dims allow one."""
    return t.reshape(-1, t.shape[-2], t.shape[-1])


def _check_same_device(device: torch.device, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(f"{name} on {t.device} but the codes on {device}")


def _check_head_dim(d: int) -> None:
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head dim {d} is above the attention kernels' limit of {MAX_HEAD_DIM}")


def quantized_qk(q: torch.Tensor, q_scale: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor,
                 out_dtype: torch.dtype, config: Optional[AttentionConfig] = None) -> torch.Tensor:
    """int8 q [..., N, D], k [..., M, D] (same leading dims), steps [..., N], [..., M] -> [..., N, M]:
    ``(fp32(q @ k^T) * q_scale[i]) * k_scale[j]`` in ``out_dtype``, exact integer sums."""
    lead, n, m, d = formats.check_qk_operands(q, q_scale, k, k_scale, out_dtype)
    _check_same_device(q.device, k=k, q_scale=q_scale, k_scale=k_scale)
    _check_head_dim(d)
    q_scale, k_scale = q_scale.to(torch.float32), k_scale.to(torch.float32)
    out = torch.empty((*lead, n, m), dtype=out_dtype, device=q.device)
    if out.numel() == 0:
        return out
    q3, k3, o3 = _flat3(q), _flat3(k), _flat3(out)
    qs2, ks2 = q_scale.reshape(-1, n), k_scale.reshape(-1, m)
    batch = q3.shape[0]
    cfg = config or default_config("qk", n, m, q.device)
    tiles_n, tiles_m = triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m)
    grid = batch * tiles_n * tiles_m
    if grid > MAX_PROGRAMS:
        raise ValueError(f"quantized_qk: {grid} programs exceed CUDA's grid limit {MAX_PROGRAMS}; use larger tiles")
    big = max(_span(q3), _span(k3), _span(o3)) >= INT64_THRESHOLD
    _qk_kernel[(grid,)](
        q3, k3, qs2, ks2, o3, n, m, d, tiles_n, tiles_m,
        *q3.stride(), *k3.stride(), *qs2.stride(), *ks2.stride(), *o3.stride(),
        BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_D=64 if d % 64 == 0 else 32, INT64=big,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False,
    )
    return out


def pv_constants(p_bits: int, p_grid: str) -> dict:
    """The P V kernel's grid constants: the reference's step (formats.prob_integer_weights) and codes."""
    return dict(_pv_constants(p_bits, p_grid))


@functools.lru_cache(maxsize=None)
def _pv_constants(p_bits: int, p_grid: str) -> tuple:
    formats.check_bits(p_bits, "p_bits")
    formats.check_p_grid(p_grid)
    _, step = formats.prob_integer_weights(torch.zeros(1, dtype=torch.uint8), p_bits, p_grid)
    log2 = p_grid == "log2"
    cmax = formats.log2_max_code(p_bits) if log2 else 0
    return tuple(dict(LOG2=log2, CMAX=cmax, ZERO_CODE=formats.prob_zero_code(p_bits, p_grid),
                      BUCKETS=cmax // LOG2_BUCKET_BITS + 1 if log2 else 2, STEP=float(step)).items())


def quantized_pv(p: torch.Tensor, v: torch.Tensor, v_scale: torch.Tensor, p_bits: int, p_grid: str,
                 out_dtype: torch.dtype, config: Optional[AttentionConfig] = None) -> torch.Tensor:
    """uint8 probability codes p [..., N, M] (formats.quantize_probs) x int8 v [..., M, D] with per-channel
    steps v_scale [..., D] -> [..., N, D]: ``(fp32(exact sum) * step) * v_scale[d]`` in ``out_dtype``."""
    lead, n, m, d = formats.check_pv_operands(p, v, v_scale, p_bits, p_grid, out_dtype)
    _check_same_device(p.device, v=v, v_scale=v_scale)
    consts = pv_constants(p_bits, p_grid)
    _check_head_dim(d)
    if m > MAX_PV_TOKENS:
        raise ValueError(f"quantized_pv sums over {m} tokens; the exact int32 bucket sums allow at most "
                         f"{MAX_PV_TOKENS} (64 * 128 * M < 2**31)")
    v_scale = v_scale.to(torch.float32)
    out = torch.empty((*lead, n, d), dtype=out_dtype, device=p.device)
    if out.numel() == 0:
        return out
    p3, v3, o3 = _flat3(p), _flat3(v), _flat3(out)
    vs2 = v_scale.reshape(-1, d)
    batch = p3.shape[0]
    cfg = config or default_config("pv", n, m, p.device)
    tiles_n = triton.cdiv(n, cfg.block_n)
    grid = batch * tiles_n
    if grid > MAX_PROGRAMS:
        raise ValueError(f"quantized_pv: {grid} programs exceed CUDA's grid limit {MAX_PROGRAMS}; use larger tiles")
    big = max(_span(p3), _span(v3), _span(o3)) >= INT64_THRESHOLD
    _pv_kernel[(grid,)](
        p3, v3, vs2, o3, n, m, d, tiles_n,
        *p3.stride(), *v3.stride(), *vs2.stride(), *o3.stride(),
        **consts, BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_D=max(16, triton.next_power_of_2(d)), INT64=big,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False,
    )
    return out


# ----------------------------------------------------------------------------- probability codes

_SQRT_HALF_MANTISSA = tl.constexpr(0x3504F3)  # mantissa field of fp32(sqrt(1/2)) = 0x3F3504F3
_POS_INF_BITS = tl.constexpr(0x7F800000)
PROBS_BLOCK: int = 1024


@triton.jit
def _quantize_probs_kernel(p_ptr, out_ptr, n, LOG2: tl.constexpr, CMAX: tl.constexpr, ZERO_CODE: tl.constexpr,
                           LIM: tl.constexpr, BLOCK: tl.constexpr):
    """One block of the flat probabilities -> uint8 codes (``formats.quantize_probs``).

    log2: from the fp32 bit pattern u (exact integer work): code = 126 - (u >> 23, arithmetic)
    + (mantissa < sqrt(1/2)'s mantissa), clamped below at 0; the zero code where code > CMAX (+0,
    subnormals, every negative: the arithmetic shift makes their code >= 127) or p is NaN (u above
    +inf's pattern; negative NaNs have the sign bit). uniform: rne(clamp(p * LIM, 0, LIM)), NaN -> 0.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if LOG2:
        u = p.to(tl.int32, bitcast=True)
        code = 126 - (u >> 23) + ((u & 0x7FFFFF) < _SQRT_HALF_MANTISSA).to(tl.int32)
        zero = (code > CMAX) | (u > _POS_INF_BITS)
        c = tl.where(zero, ZERO_CODE, tl.maximum(code, 0))
    else:
        y = p * LIM
        y = tl.where(y != y, 0.0, y)
        y = tl.minimum(tl.maximum(y, 0.0), LIM)
        c = round_half_even(y).to(tl.int32)
    tl.store(out_ptr + offs, c.to(tl.uint8), mask=mask)


def quantize_probs(p: torch.Tensor, p_bits: int, p_grid: str) -> torch.Tensor:
    """Post-softmax probabilities (any shape; fp32/bf16/fp16 read as they are, other dtypes converted to
    fp32 first, as formats does) -> uint8 codes of the same shape, bit-identical to
    ``formats.quantize_probs``. One elementwise launch over the flattened (contiguous) tensor."""
    formats.check_bits(p_bits, "p_bits")
    log2 = formats.check_p_grid(p_grid) == "log2"
    if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        p = p.to(torch.float32)
    flat = p.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    out = torch.empty(p.shape, dtype=torch.uint8, device=p.device)
    n = flat.numel()
    if n == 0:
        return out
    levels = 2**p_bits - 1
    _quantize_probs_kernel[(triton.cdiv(n, PROBS_BLOCK),)](
        flat, out, n, LOG2=log2, CMAX=formats.log2_max_code(p_bits), ZERO_CODE=levels, LIM=float(levels),
        BLOCK=PROBS_BLOCK, num_warps=4, enable_fp_fusion=False)
    return out
