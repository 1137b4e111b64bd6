"""Activation quantize kernels: per-token dynamic, static, and LayerNorm fused with quantize.

All follow the rounding rule of mixq.formats bit-exactly: q = rne(clamp(x * inv_scale, -qmax,
qmax)) in fp32. Round-half-even uses the fp32 magic-number trick, exact for |y| < 2**22 (the clamp
guarantees |y| <= 127) and identical on the GPU, under the interpreter and on every Triton
version; the dynamic scale and its reciprocal use IEEE division (``tl.math.div_rn``), not the
approximate ``/`` of GPU code.

The dynamic and the LayerNorm kernels keep whole rows in registers, so the input is read from
memory once: the row's amax (or mean and variance) and the quantized values come from the same
load. Rows up to ``MAX_ROW`` elements are supported (ViT-H's widest Linear input is 5120).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from mixq import formats

MAX_ROW: int = 16384
FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def round_half_even(y):
    """rne(y) for fp32 |y| < 2**22 via (y + 1.5*2**23) - 1.5*2**23."""
    return (y + 12582912.0) - 12582912.0


@triton.jit
def quantize_values(y, QMAX: tl.constexpr):
    """fp32 y (already x * inv_scale) -> int8 rne(clamp(y, -QMAX, QMAX))."""
    y = tl.minimum(tl.maximum(y, -QMAX * 1.0), QMAX * 1.0)
    return round_half_even(y).to(tl.int8)


@triton.jit
def _dynamic_quant_kernel(x_ptr, q_ptr, scale_ptr, M, K, stride_xm, stride_xk, stride_qm,
                          QMAX: tl.constexpr, EPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0)
    x = x.to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    scale = tl.math.div_rn(tl.maximum(amax, EPS), tl.zeros_like(amax) + QMAX * 1.0)
    inv = tl.math.div_rn(tl.zeros_like(scale) + 1.0, scale)
    q = quantize_values(x * inv[:, None], QMAX)
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q, mask=mask)
    tl.store(scale_ptr + rows, scale, mask=rows < M)


@triton.jit
def _static_quant_kernel(x_ptr, inv_ptr, q_ptr, M, K, stride_xm, stride_xk, stride_qm, stride_inv,
                         QMAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = cols < K
    mask = (rows < M)[:, None] & mask_k[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0)
    inv = tl.load(inv_ptr + cols * stride_inv, mask=mask_k, other=0.0)
    q = quantize_values(x.to(tl.float32) * inv[None, :], QMAX)
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q, mask=mask)


@triton.jit
def _layernorm_quant_kernel(x_ptr, norm_weight_ptr, norm_bias_ptr, inv_ptr, q_ptr, M, K, stride_xm, stride_xk,
                            stride_qm, stride_inv, EPS: tl.constexpr, QMAX: tl.constexpr, HAS_NORM_WEIGHT: tl.constexpr,
                            HAS_NORM_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """``formats.layer_norm_fp32`` then quantize: float64 mean and variance (two passes over the
    row in registers), rstd = fp32(1 / sqrt(var + eps)) in float64, the affine part in fp32.

    float64 keeps rows with |x| up to ~1e154 finite (fp32 squares overflow at ~1e19) and gives
    the reference's statistics; the row kernel is memory-bound, so the DADDs are free. ``EPS``
    is a constexpr so it stays a double (a float argument would arrive as fp32).
    """
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    mask_k = cols < K
    mask = (rows < M)[:, None] & mask_k[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0)
    x = x.to(tl.float32)
    x64 = x.to(tl.float64)
    mean = tl.sum(x64, axis=1) / K
    xc = tl.where(mask, x64 - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / K
    one = tl.full((BLOCK_M,), 1.0, tl.float64)
    rstd = (one / tl.sqrt(var + tl.full((BLOCK_M,), EPS, tl.float64))).to(tl.float32)
    y = (x - mean.to(tl.float32)[:, None]) * rstd[:, None]
    if HAS_NORM_WEIGHT:
        y = y * tl.load(norm_weight_ptr + cols, mask=mask_k, other=0.0).to(tl.float32)[None, :]
    if HAS_NORM_BIAS:
        y = y + tl.load(norm_bias_ptr + cols, mask=mask_k, other=0.0).to(tl.float32)[None, :]
    inv = tl.load(inv_ptr + cols * stride_inv, mask=mask_k, other=0.0)
    q = quantize_values(y * inv[None, :], QMAX)
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q, mask=mask)


# ----------------------------------------------------------------------------- launchers


def _check_input(x: torch.Tensor, what: str) -> tuple[int, int]:
    if x.dim() != 2:
        raise ValueError(f"{what} expects a 2-D [M, K] tensor, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_INPUTS:
        raise ValueError(f"{what} expects a float tensor in {FLOAT_INPUTS}, got {x.dtype}")
    m, k = x.shape
    return m, k


def _row_tile(k: int, what: str) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, num_warps) for kernels that hold whole rows in registers."""
    if k > MAX_ROW:
        raise ValueError(f"{what} holds whole rows in registers: K={k} exceeds the limit {MAX_ROW}")
    block_k = triton.next_power_of_2(max(k, 1))
    block_m = max(1, min(16, 4096 // block_k))
    elems = block_m * block_k
    return block_m, block_k, max(1, min(16, elems // 512))


def _inv_scale_vector(inv_scale: torch.Tensor, k: int, what: str) -> tuple[torch.Tensor, int]:
    """fp32 inverse scales [K] or a single one, and the stride that broadcasts the single one."""
    inv = inv_scale.reshape(-1).to(torch.float32)
    if inv.numel() not in (1, k):
        raise ValueError(f"{what}: inv_scale must have 1 or K={k} entries, got shape {tuple(inv_scale.shape)}")
    return inv, (inv.stride(0) if inv.numel() == k and k > 1 else 0)


def quantize_dynamic(x: torch.Tensor, a_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic quantization, one read of x: (int8 [M, K], fp32 scale [M])."""
    m, k = _check_input(x, "quantize_dynamic")
    qmax = formats.qmax(a_bits)
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    if k == 0:
        scale.copy_(torch.full_like(scale, formats.SCALE_EPS) / qmax)  # same fp32 division as the reference
        return q, scale
    block_m, block_k, warps = _row_tile(k, "quantize_dynamic")
    _dynamic_quant_kernel[(triton.cdiv(m, block_m),)](
        x, q, scale, m, k, x.stride(0), x.stride(1), q.stride(0),
        QMAX=qmax, EPS=formats.SCALE_EPS, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=warps, enable_fp_fusion=False,
    )
    return q, scale


def quantize_static(x: torch.Tensor, inv_scale: torch.Tensor, a_bits: int) -> torch.Tensor:
    """Static quantization with fp32 inverse scales [K] (channel-wise) or [1] (per tensor)."""
    m, k = _check_input(x, "quantize_static")
    qmax = formats.qmax(a_bits)
    inv, stride_inv = _inv_scale_vector(inv_scale, k, "quantize_static")
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    if m == 0 or k == 0:
        return q
    block_k = min(1024, triton.next_power_of_2(k))
    block_m = max(1, min(64, 4096 // block_k))
    _static_quant_kernel[(triton.cdiv(m, block_m), triton.cdiv(k, block_k))](
        x, inv, q, m, k, x.stride(0), x.stride(1), q.stride(0), stride_inv,
        QMAX=qmax, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4, enable_fp_fusion=False,
    )
    return q


def layernorm_quantize(
    x: torch.Tensor,
    norm_weight: Optional[torch.Tensor],
    norm_bias: Optional[torch.Tensor],
    eps: float,
    inv_scale: torch.Tensor,
    a_bits: int,
) -> torch.Tensor:
    """LayerNorm over the last dim fused with static quantization: int8 [M, K] in one pass.

    ``norm_weight``/``norm_bias`` are the LayerNorm affine parameters with the channel factors 1/s_k already
    folded in (or None); ``inv_scale`` is the per-tensor inverse step (1 entry) or [K] vector.
    """
    m, k = _check_input(x, "layernorm_quantize")
    qmax = formats.qmax(a_bits)
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    for name, p in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if p is not None and (p.dim() != 1 or p.shape[0] != k):
            raise ValueError(f"{name} must be a [K={k}] vector, got shape {tuple(p.shape)}")
    inv, stride_inv = _inv_scale_vector(inv_scale, k, "layernorm_quantize")
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    if m == 0 or k == 0:
        return q
    block_m, block_k, warps = _row_tile(k, "layernorm_quantize")
    has_norm_weight, has_norm_bias = norm_weight is not None, norm_bias is not None
    norm_weight = norm_weight.contiguous() if has_norm_weight else inv  # placeholders are never read
    norm_bias = norm_bias.contiguous() if has_norm_bias else inv
    _layernorm_quant_kernel[(triton.cdiv(m, block_m),)](
        x, norm_weight, norm_bias, inv, q, m, k, x.stride(0), x.stride(1), q.stride(0), stride_inv,
        EPS=float(eps), QMAX=qmax, HAS_NORM_WEIGHT=has_norm_weight, HAS_NORM_BIAS=has_norm_bias,
        BLOCK_M=block_m, BLOCK_K=block_k, num_warps=warps,
        enable_fp_fusion=False,  # the contract rounds every multiply and add (no FMA), as the reference does
    )
    return q
