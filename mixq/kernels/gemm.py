"""Mixed-bit integer GEMM: int8 activations x 4/6/8-bit packed weights on int8 tensor cores.

One kernel family; the weight bit-width is a compile-time constant. Each K tile's packed bytes
are loaded once (see :mod:`.layout`), unpacked to int8 sub-tiles in registers with shifts and
masks, and fed to ``tl.dot`` with an int32 accumulator. The epilogue applies the per-token (or
per-tensor) activation scale, the per-output-channel weight scale and the bias in fp32:
``out = (float(acc) * a_scale[m]) * w_scale[n] + bias[n]``. For small M, K is split across
programs (``split_k``) and a second small kernel sums the int32 partials exactly and applies
the epilogue, so the result does not depend on the split.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from mixq import formats

from .layout import K_TILE, SUB_K, check_gpu_layout
from .tuning import GemmConfig, pick_config

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _sign_extend(u, BITS: tl.constexpr):
    """Two's complement code of BITS bits (int32 in [0, 2**BITS)) -> int8 value."""
    return ((u ^ (1 << (BITS - 1))) - (1 << (BITS - 1))).to(tl.int8)


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
def _load_act(a_ptr, offs_m, ks, M, K, stride_am, stride_ak):
    ptrs = a_ptr + offs_m[:, None] * stride_am + ks[None, :] * stride_ak
    return tl.load(ptrs, mask=(offs_m[:, None] < M) & (ks[None, :] < K), other=0)


@triton.jit
def _epilogue_store(acc, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, offs_m, offs_n, M, N,
                    stride_om, stride_on, stride_as, SCALED: tl.constexpr, HAS_BIAS: tl.constexpr):
    mask_m = offs_m < M
    mask_n = offs_n < N
    ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    mask = mask_m[:, None] & mask_n[None, :]
    if SCALED:
        a_s = tl.load(a_scale_ptr + offs_m * stride_as, mask=mask_m, other=0.0)
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
    a_ptr, w_ptr, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr,
    M, N, K, tiles_per_split,
    stride_am, stride_ak, stride_wn, stride_os, stride_om, stride_on, stride_as,
    W_BITS: tl.constexpr, K_TILE: tl.constexpr, SUB_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    SCALED: tl.constexpr, HAS_BIAS: tl.constexpr,
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

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_s = tl.arange(0, SUB_K)
    mask_w = (offs_n < N)[None, :]
    # [SUB_K, BLOCK_N] byte tile of one plane; the tile's planes follow each other by SUB_K bytes.
    w_cols = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_s[:, None]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    t_lo = pid_k * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, tl.cdiv(K, K_TILE))
    for t in range(t_lo, t_hi):
        k0 = t * K_TILE
        w_tile = w_cols + t * (K_TILE * W_BITS // 8)
        if W_BITS == 8:
            w = tl.load(w_tile, mask=mask_w, other=0).to(tl.int8, bitcast=True)
            a = _load_act(a_ptr, offs_m, k0 + offs_s, M, K, stride_am, stride_ak)
            acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        elif W_BITS == 4:
            b = tl.load(w_tile, mask=mask_w, other=0).to(tl.int32)
            a0 = _load_act(a_ptr, offs_m, k0 + offs_s, M, K, stride_am, stride_ak)
            acc = tl.dot(a0, _sign_extend(b & 0xF, 4), acc, out_dtype=tl.int32)
            a1 = _load_act(a_ptr, offs_m, k0 + SUB_K + offs_s, M, K, stride_am, stride_ak)
            acc = tl.dot(a1, _sign_extend(b >> 4, 4), acc, out_dtype=tl.int32)
        else:
            p01 = tl.load(w_tile, mask=mask_w, other=0).to(tl.int32)
            p23 = tl.load(w_tile + SUB_K, mask=mask_w, other=0).to(tl.int32)
            ph = tl.load(w_tile + 2 * SUB_K, mask=mask_w, other=0).to(tl.int32)
            a0 = _load_act(a_ptr, offs_m, k0 + offs_s, M, K, stride_am, stride_ak)
            w0 = _sign_extend((p01 & 0xF) | ((ph & 0x3) << 4), 6)
            acc = tl.dot(a0, w0, acc, out_dtype=tl.int32)
            a1 = _load_act(a_ptr, offs_m, k0 + SUB_K + offs_s, M, K, stride_am, stride_ak)
            w1 = _sign_extend((p01 >> 4) | (((ph >> 2) & 0x3) << 4), 6)
            acc = tl.dot(a1, w1, acc, out_dtype=tl.int32)
            a2 = _load_act(a_ptr, offs_m, k0 + 2 * SUB_K + offs_s, M, K, stride_am, stride_ak)
            w2 = _sign_extend((p23 & 0xF) | (((ph >> 4) & 0x3) << 4), 6)
            acc = tl.dot(a2, w2, acc, out_dtype=tl.int32)
            a3 = _load_act(a_ptr, offs_m, k0 + 3 * SUB_K + offs_s, M, K, stride_am, stride_ak)
            w3 = _sign_extend((p23 >> 4) | ((ph >> 6) << 4), 6)
            acc = tl.dot(a3, w3, acc, out_dtype=tl.int32)

    _epilogue_store(acc, out_ptr + pid_k * stride_os, a_scale_ptr, w_scale_ptr, bias_ptr, offs_m, offs_n,
                    M, N, stride_om, stride_on, stride_as, SCALED, HAS_BIAS)


@triton.jit
def _splitk_reduce_kernel(
    part_ptr, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr,
    M, N, SPLIT_K,
    stride_ps, stride_pm, stride_pn, stride_om, stride_on, stride_as,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SCALED: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ptrs = part_ptr + offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for s in range(0, SPLIT_K):
        acc += tl.load(ptrs + s * stride_ps, mask=mask, other=0)
    _epilogue_store(acc, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, offs_m, offs_n, M, N,
                    stride_om, stride_on, stride_as, SCALED, HAS_BIAS)


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
    formats.check_bits(w_bits, "w_bits")
    if xq.dtype != torch.int8 or xq.dim() != 2 or xq.shape[1] != k:
        raise ValueError(f"activations must be int8 [M, {k}], got {xq.dtype} {tuple(xq.shape)}")
    check_gpu_layout(w, w_bits, k, n)
    if w.device != xq.device:
        raise ValueError(f"activations on {xq.device} but weights on {w.device}")
    w = w.contiguous()
    scaled = a_scale is not None or w_scale is not None
    m = xq.shape[0]
    if scaled:
        if a_scale is None or w_scale is None:
            raise ValueError("the scaled epilogue needs both a_scale and w_scale")
        if out_dtype not in OUT_DTYPES:
            raise ValueError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
        a_scale = a_scale.reshape(-1).to(torch.float32)
        if a_scale.numel() not in (1, m):
            raise ValueError(f"a_scale must have 1 (per tensor) or M={m} (per token) entries, got {a_scale.numel()}")
        w_scale = w_scale.reshape(-1).to(torch.float32).contiguous()
        if w_scale.numel() != n:
            raise ValueError(f"w_scale must have N={n} entries, got {w_scale.numel()}")
        if bias is not None:
            bias = bias.reshape(-1).contiguous()
            if bias.numel() != n:
                raise ValueError(f"bias must have N={n} entries, got {bias.numel()}")
        out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
        stride_as = a_scale.stride(0) if a_scale.numel() == m and m > 1 else 0
    else:
        if bias is not None:
            raise ValueError("bias needs the scaled epilogue (pass a_scale and w_scale)")
        out = torch.empty((m, n), dtype=torch.int32, device=xq.device)
        stride_as = 0
    if m == 0 or n == 0:
        return out
    cfg = config or pick_config(w_bits, m, n, k, xq.device)
    k_tiles = w.shape[1]
    tiles_per_split = triton.cdiv(k_tiles, cfg.split_k)
    split = triton.cdiv(k_tiles, tiles_per_split)
    dummy = out  # never read when the matching constexpr flag is off
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
    common = dict(W_BITS=w_bits, K_TILE=K_TILE, SUB_K=SUB_K[w_bits], BLOCK_M=cfg.block_m,
                  BLOCK_N=cfg.block_n, GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split == 1:
        _mixed_gemm_kernel[grid](
            xq, w, out, a_scale if scaled else dummy, w_scale if scaled else dummy,
            bias if bias is not None else dummy,
            m, n, k, tiles_per_split,
            xq.stride(0), xq.stride(1), w.stride(0), 0, out.stride(0), out.stride(1), stride_as,
            SCALED=scaled, HAS_BIAS=bias is not None, **common,
        )
        return out
    partial = torch.empty((split, m, n), dtype=torch.int32, device=xq.device)
    _mixed_gemm_kernel[grid](
        xq, w, partial, dummy, dummy, dummy,
        m, n, k, tiles_per_split,
        xq.stride(0), xq.stride(1), w.stride(0), partial.stride(0), partial.stride(1), partial.stride(2), 0,
        SCALED=False, HAS_BIAS=False, **common,
    )
    rb_m, rb_n = 32, 64
    _splitk_reduce_kernel[(triton.cdiv(m, rb_m), triton.cdiv(n, rb_n))](
        partial, out, a_scale if scaled else dummy, w_scale if scaled else dummy,
        bias if bias is not None else dummy,
        m, n, split,
        partial.stride(0), partial.stride(1), partial.stride(2), out.stride(0), out.stride(1), stride_as,
        BLOCK_M=rb_m, BLOCK_N=rb_n, SCALED=scaled, HAS_BIAS=bias is not None, num_warps=4,
    )
    return out
