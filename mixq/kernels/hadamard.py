"""Randomized block Walsh-Hadamard transform of activation rows (mixq.rotation's contract).

One program owns ``BLOCK_M`` whole rows. The signs are applied on the first load; each butterfly
stage h then reads the pair (j with bit h cleared, j with bit h set) from the output buffer, which
serves as the stage-to-stage scratch (a CTA barrier between stages, loads past L1 with ``.cg``), and
writes a + b or a - b back; the last stage multiplies by fp32(1/sqrt(block)). The operations are
rotation.hadamard_fp32's, in its order, so the result is bit-identical to it (and to the C++ kernel).
Rows up to ``MAX_ROW`` channels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixq import rotation

MAX_ROW: int = 16384
FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _hadamard_kernel(x_ptr, sign_ptr, out_ptr, M, K, stride_xm, stride_xk, SCALE: tl.constexpr,
                     LOG_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0)
    sign = tl.load(sign_ptr + cols, mask=cols < K, other=0.0)
    y = x.to(tl.float32) * sign[None, :]
    out_rows = out_ptr + rows[:, None] * K
    tl.store(out_rows + cols[None, :], y, mask=mask)
    for s in tl.static_range(LOG_B):
        h = 1 << s
        lo = cols - (cols & h)
        tl.debug_barrier()
        a = tl.load(out_rows + lo[None, :], mask=mask, other=0.0, cache_modifier=".cg")
        b = tl.load(out_rows + (lo + h)[None, :], mask=mask, other=0.0, cache_modifier=".cg")
        y = tl.where(((cols & h) != 0)[None, :], a - b, a + b)
        tl.debug_barrier()
        tl.store(out_rows + cols[None, :], y, mask=mask)
    tl.debug_barrier()
    tl.store(out_rows + cols[None, :], y * SCALE, mask=mask)


def hadamard_transform(x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """x [M, K] (fp32/bf16/fp16) -> fp32 [M, K]: rotation.hadamard_fp32, bit for bit."""
    rotation.check_transform_args(x, signs, block)
    if x.dtype not in FLOAT_INPUTS:
        raise ValueError(f"triton hadamard_transform takes float32/bfloat16/float16, got {x.dtype}")
    m, k = x.shape
    if k > MAX_ROW:
        raise ValueError(f"triton hadamard_transform supports rows up to {MAX_ROW} channels, got K={k}")
    out = torch.empty((m, k), dtype=torch.float32, device=x.device)
    if m == 0 or k == 0:
        return out
    block_k = triton.next_power_of_2(k)
    block_m = max(1, min(16, 4096 // block_k))
    grid = (triton.cdiv(m, block_m),)
    _hadamard_kernel[grid](x, signs.contiguous(), out, m, k, x.stride(0), x.stride(1),
                           SCALE=rotation.hadamard_scale(block), LOG_B=block.bit_length() - 1, BLOCK_M=block_m,
                           BLOCK_K=block_k, num_warps=4)
    return out
