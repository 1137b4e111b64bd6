"""The reference backend: pure PyTorch on any device, the ground truth of every kernel.

Integer products are exact: the GEMM runs in float64 when every partial sum fits in the
53-bit mantissa (always, for K < 2**38 at 8 bits), which works on every device including
CUDA, where int64 matmul is not implemented.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import formats
from . import register_backend


class ReferenceBackend:
    name = "reference"
    priority = 0

    def available(self, device: torch.device) -> bool:
        return True

    def prepack(self, packed: torch.Tensor, w_bits: int, k: int) -> torch.Tensor:
        return packed

    def quantize_dynamic(self, x: torch.Tensor, a_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        return formats.quantize_act_dynamic(x, a_bits)

    def quantize_static(self, x: torch.Tensor, inv_scale: torch.Tensor, a_bits: int) -> torch.Tensor:
        return formats.quantize_with_inv_scale(x, inv_scale, a_bits)

    def layernorm_quantize(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, inv_scale: torch.Tensor, a_bits: int
    ) -> torch.Tensor:
        return formats.quantize_with_inv_scale(formats.layer_norm_fp32(x, weight, bias, eps), inv_scale, a_bits)

    def int_gemm(self, xq: torch.Tensor, w: torch.Tensor, w_bits: int, k: int, n: int) -> torch.Tensor:
        wq = formats.unpack_weight(w, w_bits, k)
        acc = xq.to(torch.float64) @ wq.to(torch.float64).T
        return acc.to(torch.int32)

    def packed_linear(
        self,
        xq: torch.Tensor,
        a_scale: torch.Tensor,
        w: torch.Tensor,
        w_scale: torch.Tensor,
        bias: Optional[torch.Tensor],
        w_bits: int,
        k: int,
        n: int,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        acc = self.int_gemm(xq, w, w_bits, k, n).to(torch.float32)
        out = acc * a_scale.to(torch.float32).reshape(-1, 1) * w_scale.to(torch.float32).reshape(1, -1)
        if bias is not None:
            out = out + bias.to(torch.float32)
        return out.to(out_dtype)

    def quantized_qk(
        self, q: torch.Tensor, q_scale: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor, out_dtype: torch.dtype
    ) -> torch.Tensor:
        return attention_qk(q, q_scale, k, k_scale, out_dtype)

    def quantized_pv(
        self, p: torch.Tensor, v: torch.Tensor, v_scale: torch.Tensor, p_bits: int, p_kind: str, out_dtype: torch.dtype
    ) -> torch.Tensor:
        return attention_pv(p, v, v_scale, p_bits, p_kind, out_dtype)

    def quantize_probs(self, p: torch.Tensor, bits: int, kind: str) -> torch.Tensor:
        """Post-softmax probabilities -> uint8 codes: formats.quantize_probs itself."""
        return formats.quantize_probs(p, bits, kind)


def _exact_matmul(a: torch.Tensor, b: torch.Tensor, bound: float) -> torch.Tensor:
    """a @ b of integer-valued tensors, exact: float64 when every partial sum is below 2**53 (``bound``
    bounds them), else int64 on the CPU. Returns float64 holding the exact integers."""
    if bound < 2.0**53:
        return a.to(torch.float64) @ b.to(torch.float64)
    if bound >= 2.0**63:
        raise ValueError(f"integer attention product would overflow int64 (bound {bound:.3g}); too many tokens")
    return (a.cpu().to(torch.int64) @ b.cpu().to(torch.int64)).to(a.device, torch.float64)


def attention_qk(
    q: torch.Tensor, q_scale: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """Q codes [..., N, D] x K codes [..., M, D] (int8, per-token steps [..., N] / [..., M]) -> [..., N, M].

    acc = exact integer sum over D; out = (fp32(acc) * q_scale[i]) * k_scale[j] in fp32, cast to out_dtype.
    Differentiable in the steps and, through integer-valued float tensors, in q and k (the simulation
    calls it with straight-through values).
    """
    d = q.shape[-1]
    acc = _exact_matmul(q, k.transpose(-2, -1), 128.0 * 128.0 * d)
    out = (acc.to(torch.float32) * q_scale.to(torch.float32)[..., :, None]) * k_scale.to(torch.float32)[..., None, :]
    return out.to(out_dtype)


def attention_pv(
    p: torch.Tensor, v: torch.Tensor, v_scale: torch.Tensor, p_bits: int, p_kind: str, out_dtype: torch.dtype
) -> torch.Tensor:
    """Probability codes [..., N, M] (uint8, formats.quantize_probs) x V codes [..., M, D] (int8, one step per
    channel, v_scale [..., D]) -> [..., N, D].

    acc = sum_j w_ij v_jd exactly, with (w, s) = formats.prob_integer_weights (log2: w = 2^(cmax - c),
    V's integers shifted); out = (fp32(acc) * s) * v_scale[d] in fp32, cast to out_dtype.
    """
    w, step = formats.prob_integer_weights(p, p_bits, p_kind)
    top = float(2 ** formats.log2_max_code(p_bits)) if p_kind == "log2" else float(2**p_bits - 1)
    acc = _exact_matmul(w, v, top * 128.0 * p.shape[-1])
    out = (acc.to(torch.float32) * step) * v_scale.to(torch.float32)[..., None, :]
    return out.to(out_dtype)


register_backend(ReferenceBackend())
