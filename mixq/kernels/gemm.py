"""Mixed-bit integer GEMM: int8 activations x 4/6/8-bit packed weights on int8 tensor cores.

One kernel family; the weight bit-width is a compile-time constant. Each K tile's packed bytes
are loaded once (see :mod:`.layout`), turned into int8 sub-tiles in registers with one mask (and
for some sub-tiles one shift) per weight, and fed to ``tl.dot`` with an int32 accumulator. The
layout puts each field where the masked byte is the weight times 16 (W4) or 4 (W6), so no sign
extension is needed; the accumulator is shifted back (exactly) before the epilogue. The
epilogue applies the per-token (or per-tensor) activation scale, the per-output-channel weight
scale and the bias in fp32: ``out = (float(acc) * a_scale[m]) * w_scale[n] + bias[n]``.

Config switches (:class:`.tuning.GemmConfig`), all giving the same integers:

* ``split_k``: for small M, K is split across programs and a second small kernel sums the int32
  partials exactly and applies the epilogue, so the result does not depend on the split;
* ``swap_ab``: compute out^T = W @ X^T, so the unpacked weights are wgmma's A operand, which
  Hopper reads from registers, and the token count is wgmma's N (small M wastes less);
* ``asm_unpack``: on a GPU, do the W4/W6 masks and shifts with inline PTX on 32-bit words, four
  weights per instruction (Triton's byte-wise ops cost byte permutes around each op). The
  interpreter cannot run PTX, so there the same config runs the byte-wise ops; the PTX text is
  checked on the CPU by a small PTX emulator in the tests.

Offsets are 32-bit unless some operand has 2**31 elements or more (``INT64``).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from mixq import formats

from .layout import K_TILE, PRESHIFT, SUB_K, check_gpu_layout
from .quantize import quantize_values
from .tuning import GemmConfig, pick_config

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INT64_THRESHOLD = 2**31  # elements; past it the kernel computes offsets in 64 bits


@triton.jit
def _round_to_bf16_grid(x):
    """fp32 -> nearest bf16 value (ties to even), kept in fp32, so the final cast is exact.

    The cast alone rounds half-even on the GPU but truncates under the interpreter; rounding
    here makes both produce the reference's bf16 bits.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + (0x7FFF + ((bits >> 16) & 1))
    rounded = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, rounded)  # a NaN stays NaN (its low payload bits could carry into inf)


@triton.jit
def _w4_lo(b, ASM: tl.constexpr):
    """16 * low nibble of each int8 byte: (b << 4), or on 32-bit words (4 bytes) shl + and."""
    if ASM:
        return tl.inline_asm_elementwise("{ .reg .b32 t; shl.b32 t, $1, 4; and.b32 $0, t, 0xF0F0F0F0; }",
                                         "=r,r", [b], dtype=tl.int8, is_pure=True, pack=4)
    else:
        return (b << 4).to(tl.int8)  # the cast is a no-op where literals take the tensor's type


@triton.jit
def _w4_hi(b, ASM: tl.constexpr):
    """16 * high nibble of each int8 byte: (b & 0xF0), one and.b32 per 4 bytes."""
    if ASM:
        return tl.inline_asm_elementwise("and.b32 $0, $1, 0xF0F0F0F0;", "=r,r", [b], dtype=tl.int8,
                                         is_pure=True, pack=4)
    else:
        return (b & -16).to(tl.int8)


@triton.jit
def _w6_top(b, ASM: tl.constexpr):
    """4 * the 6-bit code in each byte's top six bits: (b & 0xFC)."""
    if ASM:
        return tl.inline_asm_elementwise("and.b32 $0, $1, 0xFCFCFCFC;", "=r,r", [b], dtype=tl.int8,
                                         is_pure=True, pack=4)
    else:
        return (b & -4).to(tl.int8)


@triton.jit
def _w6_last(b0, b1, b2, ASM: tl.constexpr):
    """4 * the fourth sub-tile's code from the low two bits of the three plane bytes."""
    if ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 x, y, z; shl.b32 x, $1, 6; shl.b32 y, $2, 4; shl.b32 z, $3, 2; "
            "and.b32 x, x, 0xC0C0C0C0; and.b32 y, y, 0x30303030; and.b32 z, z, 0x0C0C0C0C; "
            "or.b32 x, x, y; or.b32 $0, x, z; }",
            "=r,r,r,r", [b0, b1, b2], dtype=tl.int8, is_pure=True, pack=4)
    else:
        return ((b0 << 6) | ((b1 & 3) << 4) | ((b2 & 3) << 2)).to(tl.int8)


@triton.jit
def _mma(acc, w, a_ptr, offs_m, ks, M, K, stride_am, stride_ak, SWAP_AB: tl.constexpr,
         inv, A_FLOAT: tl.constexpr, QMAX: tl.constexpr):
    """acc += A_tile @ W_tile, or with SWAP_AB acc^T += W_tile @ A_tile^T.

    Swapped, the unpacked weights are wgmma's A operand, which Hopper reads from registers (only B
    must come from shared memory), and the token count becomes wgmma's N, which may be as small as 8.
    With A_FLOAT the activations arrive in float and are quantized here with the per-row ``inv``,
    by the same rule (and the same fp32 ops) as the standalone quantize kernel.
    """
    if SWAP_AB:
        mask = (offs_m[None, :] < M) & (ks[:, None] < K)
        a_t = tl.load(a_ptr + offs_m[None, :] * stride_am + ks[:, None] * stride_ak, mask=mask, other=0)
        if A_FLOAT:
            a_t = quantize_values(a_t.to(tl.float32) * inv[None, :], QMAX)
        return tl.dot(w, a_t, acc, out_dtype=tl.int32)
    else:
        mask = (offs_m[:, None] < M) & (ks[None, :] < K)
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + ks[None, :] * stride_ak, mask=mask, other=0)
        if A_FLOAT:
            a = quantize_values(a.to(tl.float32) * inv[:, None], QMAX)
        return tl.dot(a, w, acc, out_dtype=tl.int32)


@triton.jit
def _row_scales(a_ptr, offs_m, M, K, stride_am, stride_ak, QMAX: tl.constexpr, EPS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per-row dynamic scale and its reciprocal over all of K, as _dynamic_quant_kernel computes them."""
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    cols = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + cols
        x = tl.load(a_ptr + offs_m[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=(offs_m[:, None] < M) & (ks[None, :] < K), other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
    scale = tl.math.div_rn(tl.maximum(amax, EPS), tl.zeros_like(amax) + QMAX * 1.0)
    inv = tl.math.div_rn(tl.zeros_like(scale) + 1.0, scale)
    return scale, inv


@triton.jit
def _epilogue_store(acc, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, offs_m, offs_n, M, N,
                    stride_om, stride_on, stride_as, SCALED: tl.constexpr, HAS_BIAS: tl.constexpr,
                    a_s_reg, A_S_IN_REG: tl.constexpr, a_scale_mul_ptr, HAS_A_SCALE_MUL: tl.constexpr):
    mask_m = offs_m < M
    mask_n = offs_n < N
    ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    mask = mask_m[:, None] & mask_n[None, :]
    if SCALED:
        if A_S_IN_REG:
            a_s = a_s_reg
        else:
            a_s = tl.load(a_scale_ptr + offs_m * stride_as, mask=mask_m, other=0.0)
        if HAS_A_SCALE_MUL:  # QuantLinear's overflow headroom: a power of two times the step, as torch's a_scale * f
            a_s = a_s * tl.load(a_scale_mul_ptr)
        w_s = tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)
        out = (acc.to(tl.float32) * a_s[:, None]) * w_s[None, :]
        if HAS_BIAS:
            out = out + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if out_ptr.dtype.element_ty == tl.bfloat16:
            out = _round_to_bf16_grid(out)
        tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptrs, acc, mask=mask)


@triton.jit
def _mixed_gemm_kernel(
    a_ptr, w_ptr, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, a_scale_mul_ptr,
    M, N, K, tiles_per_split,
    stride_am, stride_ak, stride_wn, stride_os, stride_om, stride_on, stride_as,
    W_BITS: tl.constexpr, K_TILE: tl.constexpr, SUB_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    SCALED: tl.constexpr, HAS_BIAS: tl.constexpr, SWAP_AB: tl.constexpr, INT64: tl.constexpr,
    ASM: tl.constexpr, A_FLOAT: tl.constexpr, QMAX: tl.constexpr, EPS: tl.constexpr, HAS_A_SCALE_MUL: tl.constexpr,
):
    # Grouped tile order: GROUP_M row-tiles share each weight column-tile while it is in L2.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if INT64:  # only when an offset can pass 2**31: 64-bit address math costs registers and IMADs
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    offs_s = tl.arange(0, SUB_K)
    # one plane's bytes of a K tile: [SUB_K, BLOCK_N], or [BLOCK_N, SUB_K] swapped; planes follow
    # each other by SUB_K bytes. Weights arrive as int8 (the launcher passes an int8 view).
    if SWAP_AB:
        w_cols = w_ptr + offs_n[:, None] * stride_wn + offs_s[None, :]
        mask_w = (offs_n < N)[:, None]
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    else:
        w_cols = w_ptr + offs_n[None, :] * stride_wn + offs_s[:, None]
        mask_w = (offs_n < N)[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)

    if A_FLOAT:  # fused dynamic quantize: every program derives its rows' scales from all of K
        scale, inv = _row_scales(a_ptr, offs_m, M, K, stride_am, stride_ak, QMAX, EPS, BLOCK_M, K_TILE)
        if (pid_n == 0) & (pid_k == 0):  # the scales also go out (split-K's reduce and the caller read them)
            tl.store(a_scale_ptr + offs_m, scale, mask=offs_m < M)
    else:
        scale = tl.zeros((BLOCK_M,), dtype=tl.float32)
        inv = scale

    t_lo = pid_k * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, tl.cdiv(K, K_TILE))
    for t in range(t_lo, t_hi):
        k0 = t * K_TILE
        w_tile = w_cols + t * (K_TILE * W_BITS // 8)
        if W_BITS == 8:
            w = tl.load(w_tile, mask=mask_w, other=0)
            acc = _mma(acc, w, a_ptr, offs_m, k0 + offs_s, M, K, stride_am, stride_ak, SWAP_AB, inv, A_FLOAT, QMAX)
        elif W_BITS == 4:
            # int8 b = lo | hi << 4: (b << 4) = 16 lo and (b & 0xF0) = 16 hi, signs in place
            b = tl.load(w_tile, mask=mask_w, other=0)
            acc = _mma(acc, _w4_lo(b, ASM), a_ptr, offs_m, k0 + offs_s, M, K, stride_am, stride_ak, SWAP_AB, inv, A_FLOAT, QMAX)
            acc = _mma(acc, _w4_hi(b, ASM), a_ptr, offs_m, k0 + SUB_K + offs_s, M, K, stride_am, stride_ak, SWAP_AB, inv, A_FLOAT, QMAX)
        else:
            # int8 b_j = code_j << 2 | piece_j of the fourth sub-tile: (b_j & 0xFC) = 4 w_j
            b0 = tl.load(w_tile, mask=mask_w, other=0)
            b1 = tl.load(w_tile + SUB_K, mask=mask_w, other=0)
            b2 = tl.load(w_tile + 2 * SUB_K, mask=mask_w, other=0)
            acc = _mma(acc, _w6_top(b0, ASM), a_ptr, offs_m, k0 + offs_s, M, K, stride_am, stride_ak, SWAP_AB, inv, A_FLOAT, QMAX)
            acc = _mma(acc, _w6_top(b1, ASM), a_ptr, offs_m, k0 + SUB_K + offs_s, M, K, stride_am, stride_ak, SWAP_AB, inv, A_FLOAT, QMAX)
            acc = _mma(acc, _w6_top(b2, ASM), a_ptr, offs_m, k0 + 2 * SUB_K + offs_s, M, K, stride_am, stride_ak, SWAP_AB, inv, A_FLOAT, QMAX)
            w3 = _w6_last(b0, b1, b2, ASM)
            acc = _mma(acc, w3, a_ptr, offs_m, k0 + 3 * SUB_K + offs_s, M, K, stride_am, stride_ak, SWAP_AB, inv, A_FLOAT, QMAX)

    if W_BITS == 4:
        acc = acc >> 4  # exact: every product was a multiple of 16
    elif W_BITS == 6:
        acc = acc >> 2
    if SWAP_AB:
        acc = tl.trans(acc)
    split_base = pid_k.to(tl.int64) * stride_os if INT64 else pid_k * stride_os
    _epilogue_store(acc, out_ptr + split_base, a_scale_ptr, w_scale_ptr, bias_ptr, offs_m, offs_n,
                    M, N, stride_om, stride_on, stride_as, SCALED, HAS_BIAS, scale, A_FLOAT, a_scale_mul_ptr, HAS_A_SCALE_MUL)


@triton.jit
def _splitk_reduce_kernel(
    part_ptr, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, a_scale_mul_ptr,
    M, N, SPLIT_K,
    stride_ps, stride_pm, stride_pn, stride_om, stride_on, stride_as,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SCALED: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_A_SCALE_MUL: tl.constexpr,
):
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ptrs = part_ptr + offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for s in range(0, SPLIT_K):
        acc += tl.load(ptrs + s * stride_ps, mask=mask, other=0)
    _epilogue_store(acc, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, offs_m, offs_n, M, N,
                    stride_om, stride_on, stride_as, SCALED, HAS_BIAS, acc, False, a_scale_mul_ptr, HAS_A_SCALE_MUL)


def mixed_gemm(
    xq: torch.Tensor,
    w: torch.Tensor,
    w_bits: int,
    k: int,
    n: int,
    a_scale: Optional[torch.Tensor] = None,
    w_scale: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    config: Optional[GemmConfig] = None,
) -> torch.Tensor:
    """xq int8 [M, k] @ W^T with W in the GPU layout (uint8 [n, k_tiles, tile_bytes]).

    Without scales it returns the exact int32 [M, n] accumulator. With ``a_scale`` ([M] per
    token or [1] per tensor, fp32) and ``w_scale`` ([n], fp32) it returns
    ``(acc * a_scale[m]) * w_scale[n] + bias[n]`` in ``out_dtype`` (bf16, fp16 or fp32).
    No host synchronisation and no data-dependent branching: safe under CUDA-graph capture.
    """
    if xq.dtype != torch.int8 or xq.dim() != 2 or xq.shape[1] != k:
        raise ValueError(f"activations must be int8 [M, {k}], got {xq.dtype} {tuple(xq.shape)}")
    scaled = a_scale is not None or w_scale is not None
    m = xq.shape[0]
    if scaled:
        if a_scale is None or w_scale is None:
            raise ValueError("the scaled epilogue needs both a_scale and w_scale")
        a_scale = a_scale.reshape(-1).to(torch.float32)
        if a_scale.numel() not in (1, m):
            raise ValueError(f"a_scale must have 1 (per tensor) or M={m} (per token) entries, got {a_scale.numel()}")
    elif bias is not None:
        raise ValueError("bias needs the scaled epilogue (pass a_scale and w_scale)")
    return _launch(xq, w, w_bits, k, n, a_scale, w_scale, bias, out_dtype, config, None, None)


def quantized_linear_dynamic(
    x: torch.Tensor,
    w: torch.Tensor,
    w_bits: int,
    a_bits: int,
    k: int,
    n: int,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    config: Optional[GemmConfig] = None,
    a_scale_mul: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token activation quantize fused into the GEMM: float x [M, k] -> (out [M, n], a_scale [M]).

    One launch instead of two (plus the int8 round trip through memory), which pays at small M
    (ViT at batch 1), where each GEMM program reading its rows' amax over all of K is cheap.
    Bit-identical to ``quantize_dynamic`` followed by ``mixed_gemm``: same scales, same integers.
    ``a_scale_mul`` (1 fp32 entry, on x's device) multiplies each step in the epilogue only, as
    ``mixed_gemm(..., a_scale * a_scale_mul, ...)`` would (QuantLinear's power-of-two overflow
    headroom); the returned ``a_scale`` is the plain step.
    """
    from .quantize import FLOAT_INPUTS

    formats.check_bits(a_bits, "a_bits")
    if x.dim() != 2 or x.shape[1] != k or x.dtype not in FLOAT_INPUTS:
        raise ValueError(f"x must be a float tensor [M, {k}] in {FLOAT_INPUTS}, got {x.dtype} {tuple(x.shape)}")
    if a_scale_mul is not None:
        a_scale_mul = a_scale_mul.reshape(-1).to(torch.float32)
        if a_scale_mul.numel() != 1 or a_scale_mul.device != x.device:
            raise ValueError(f"a_scale_mul must be one fp32 value on {x.device}, got shape "
                             f"{tuple(a_scale_mul.shape)} on {a_scale_mul.device}")
    a_scale = torch.empty((x.shape[0],), dtype=torch.float32, device=x.device)
    out = _launch(x, w, w_bits, k, n, a_scale, w_scale, bias, out_dtype or x.dtype, config, a_bits, a_scale_mul)
    return out, a_scale


def _asm_ok(cfg: GemmConfig, w_bits: int, device: torch.device) -> bool:
    """The PTX unpack packs 4 weights per 32-bit register: needs a GPU, W4/W6, and a weight tile
    that gives every thread a multiple of 4 bytes (else the byte-wise path runs, same integers)."""
    per_thread = cfg.block_n * SUB_K[w_bits] // (32 * cfg.num_warps)
    return bool(cfg.asm_unpack) and device.type == "cuda" and w_bits != 8 and per_thread >= 4 and per_thread % 4 == 0


def _launch(a, w, w_bits, k, n, a_scale, w_scale, bias, out_dtype, config, a_bits, a_scale_mul) -> torch.Tensor:
    """Shared launcher; ``a_bits`` set means ``a`` is float and quantized inside (``a_scale`` is output)."""
    formats.check_bits(w_bits, "w_bits")
    check_gpu_layout(w, w_bits, k, n)
    if w.device != a.device:
        raise ValueError(f"activations on {a.device} but weights on {w.device}")
    fused = a_bits is not None
    w = w.contiguous()
    scaled = w_scale is not None
    m = a.shape[0]
    if scaled:
        if out_dtype not in OUT_DTYPES:
            raise ValueError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
        w_scale = w_scale.reshape(-1).to(torch.float32).contiguous()
        if w_scale.numel() != n:
            raise ValueError(f"w_scale must have N={n} entries, got {w_scale.numel()}")
        if bias is not None:
            bias = bias.reshape(-1).contiguous()
            if bias.numel() != n:
                raise ValueError(f"bias must have N={n} entries, got {bias.numel()}")
        out = torch.empty((m, n), dtype=out_dtype, device=a.device)
        stride_as = a_scale.stride(0) if a_scale.numel() == m and m > 1 else 0
    else:
        out = torch.empty((m, n), dtype=torch.int32, device=a.device)
        stride_as = 0
    if m == 0 or n == 0:
        return out
    cfg = config or pick_config(w_bits, m, n, k, a.device)
    k_tiles = w.shape[1]
    # The unpacked int8 weights carry a factor 2**PRESHIFT (layout.py); the int32 accumulator must
    # hold the scaled sum exactly.
    if (formats.qmax(w_bits) << PRESHIFT[w_bits]) * 128 * k_tiles * K_TILE >= 2**31:
        raise ValueError(f"k={k} is too large for the int32 accumulator of the W{w_bits} GEMM "
                         f"(at most {2**31 // ((formats.qmax(w_bits) << PRESHIFT[w_bits]) * 128 * K_TILE) * K_TILE})")
    tiles_per_split = triton.cdiv(k_tiles, cfg.split_k)
    split = triton.cdiv(k_tiles, tiles_per_split)
    dummy = out  # never read when the matching constexpr flag is off
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
    # 64-bit offsets only where one can pass 2**31 (elements of any operand, or of the split-K partials)
    big = max(m * a.stride(0) + k * a.stride(1), w.numel(), split * m * n) >= INT64_THRESHOLD
    w = w.view(torch.int8)  # the kernel's shifts and masks work on signed bytes
    common = dict(W_BITS=w_bits, K_TILE=K_TILE, SUB_K=SUB_K[w_bits], BLOCK_M=cfg.block_m,
                  BLOCK_N=cfg.block_n, GROUP_M=cfg.group_m, SWAP_AB=bool(cfg.swap_ab), INT64=big,
                  ASM=_asm_ok(cfg, w_bits, a.device),
                  A_FLOAT=fused, QMAX=formats.qmax(a_bits) if fused else 127, EPS=formats.SCALE_EPS,
                  HAS_A_SCALE_MUL=a_scale_mul is not None,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                  # the contract rounds (acc * a_s) * w_s and + bias separately; left on, ptxas fuses
                  # them into one FFMA (one rounding) and the GPU drifts an ulp from the reference
                  enable_fp_fusion=False)
    if split == 1:
        _mixed_gemm_kernel[grid](
            a, w, out, a_scale if scaled or fused else dummy, w_scale if scaled else dummy,
            bias if bias is not None else dummy, a_scale_mul if a_scale_mul is not None else dummy,
            m, n, k, tiles_per_split,
            a.stride(0), a.stride(1), w.stride(0), 0, out.stride(0), out.stride(1), stride_as,
            SCALED=scaled, HAS_BIAS=bias is not None, **common,
        )
        return out
    partial = torch.empty((split, m, n), dtype=torch.int32, device=a.device)
    _mixed_gemm_kernel[grid](
        a, w, partial, a_scale if fused else dummy, dummy, dummy, dummy,
        m, n, k, tiles_per_split,
        a.stride(0), a.stride(1), w.stride(0), partial.stride(0), partial.stride(1), partial.stride(2), 0,
        SCALED=False, HAS_BIAS=False, **common,
    )
    rb_m, rb_n = 32, 64
    _splitk_reduce_kernel[(triton.cdiv(m, rb_m), triton.cdiv(n, rb_n))](
        partial, out, a_scale if scaled else dummy, w_scale if scaled else dummy,
        bias if bias is not None else dummy, a_scale_mul if a_scale_mul is not None else dummy,
        m, n, split,
        partial.stride(0), partial.stride(1), partial.stride(2), out.stride(0), out.stride(1), stride_as,
        BLOCK_M=rb_m, BLOCK_N=rb_n, SCALED=scaled, HAS_BIAS=bias is not None, HAS_A_SCALE_MUL=a_scale_mul is not None,
        num_warps=4, enable_fp_fusion=False,
    )
    return out
