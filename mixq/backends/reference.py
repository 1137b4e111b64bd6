"""The reference backend: pure PyTorch on any device, the ground truth of every kernel.

Integer products are exact: the GEMM runs in float64 when every partial sum fits in the
53-bit mantissa (always, for K < 2**38 at 8 bits), which works on every device including
CUDA, where int64 matmul is not implemented.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import formats
from . import PackedWeight, register_backend


class ReferenceBackend:
    """Pure PyTorch on any device, and the base class of every backend: each method here is the
    default a faster backend overrides (the fusion policy of the dynamic Linear included)."""

    name = "reference"
    priority = 0

    def available(self, device: torch.device) -> bool:
        """True when this backend can run on ``device`` here (hardware, build, libraries)."""
        return True

    # ------------------------------------------------------------------ weights

    def prepack(self, canonical: torch.Tensor, bits: int, k: int) -> torch.Tensor:
        """Canonical packed rows [N, row_bytes] (what checkpoints hold) -> this backend's layout."""
        return canonical

    def pack(self, canonical: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor], bits: int, k: int,
             n: int, smooth_inv: Optional[torch.Tensor] = None) -> PackedWeight:
        """The runtime weights of one Linear on this backend (prepacked once, when a layer is built or moved)."""
        return PackedWeight(self.prepack(canonical, bits, k), scale, bias, bits, k, n, self.name, smooth_inv)

    def _check_layout(self, w: PackedWeight) -> None:
        if w.layout != self.name:
            raise ValueError(f"mixq backend {self.name!r} got weights prepacked for {w.layout!r}; pack them with "
                             f"get_backend({self.name!r}).pack(...)")

    # ------------------------------------------------------------------ activations

    def quantize_dynamic(self, x: torch.Tensor, a_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x [M, K] float -> (codes int8 [M, K], per-token step fp32 [M]) by the dynamic rule."""
        return formats.quantize_act_dynamic(x, a_bits)

    def quantize_static(self, x: torch.Tensor, inv_scale: torch.Tensor, a_bits: int) -> torch.Tensor:
        """x [M, K] float, inverse steps fp32 [K] or [1] -> codes int8 [M, K]."""
        return formats.quantize_with_inv_scale(x, inv_scale, a_bits)

    def layernorm_quantize(self, x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float,
                           inv_scale: torch.Tensor, a_bits: int) -> torch.Tensor:
        """formats.layer_norm_fp32 of x [M, K] (float64 statistics) then the static rule -> int8 [M, K]."""
        return formats.quantize_with_inv_scale(formats.layer_norm_fp32(x, norm_weight, norm_bias, eps), inv_scale,
                                               a_bits)

    # ------------------------------------------------------------------ GEMM

    def int_gemm(self, xq: torch.Tensor, w: PackedWeight) -> torch.Tensor:
        """Exact int32 [M, N] = xq [M, K] @ W^T."""
        self._check_layout(w)
        wq = formats.unpack_weight(w.codes, w.bits, w.in_features)
        return (xq.to(torch.float64) @ wq.to(torch.float64).T).to(torch.int32)

    def linear(self, xq: torch.Tensor, a_scale: torch.Tensor, w: PackedWeight, out_dtype: torch.dtype) -> torch.Tensor:
        """out[m, n] = (fp32(acc[m, n]) * a_scale[m]) * scale[n] + bias[n] in ``out_dtype``; a_scale [M] or [1]."""
        acc = self.int_gemm(xq, w).to(torch.float32)
        out = acc * a_scale.to(torch.float32).reshape(-1, 1) * w.scale.to(torch.float32).reshape(1, -1)
        if w.bias is not None:
            out = out + w.bias.to(torch.float32)
        return out.to(out_dtype)

    def linear_dynamic(self, x: torch.Tensor, w: PackedWeight, a_bits: int, out_dtype: torch.dtype) -> torch.Tensor:
        """QuantLinear's dynamic forward: x * smooth_inv (fp32, when set), per-token quantize, linear.

        A data-derived step can be huge, so the epilogue keeps power-of-two headroom
        f = formats.epilogue_headroom(steps) (1 below ~1e21 inputs): steps * f and bias * f, then
        out / f. Every backend's override returns these numbers bit for bit; this composition is the
        definition, and where fusing pays is each backend's own decision.
        """
        if w.smooth_inv is not None:
            x = (x.to(torch.float32) * w.smooth_inv).contiguous()
        xq, step = self.quantize_dynamic(x, a_bits)
        f = formats.epilogue_headroom(step)
        bias = w.bias * f if w.bias is not None else None
        return self.linear(xq, step * f, w.with_bias(bias), out_dtype).div_(f)

    # ------------------------------------------------------------------ attention matmuls

    def quantized_qk(
        self, q: torch.Tensor, q_scale: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor, out_dtype: torch.dtype
    ) -> torch.Tensor:
        """int8 Q [..., N, D] times int8 K [..., M, D]^T with per-token steps -> [..., N, M]."""
        return attention_qk(q, q_scale, k, k_scale, out_dtype)

    def quantized_pv(
        self, p: torch.Tensor, v: torch.Tensor, v_scale: torch.Tensor, p_bits: int, p_grid: str, out_dtype: torch.dtype
    ) -> torch.Tensor:
        """uint8 probability codes [..., N, M] times int8 V [..., M, D] with per-channel steps [..., D]."""
        return attention_pv(p, v, v_scale, p_bits, p_grid, out_dtype)

    def quantize_probs(self, p: torch.Tensor, p_bits: int, p_grid: str) -> torch.Tensor:
        """Post-softmax probabilities -> uint8 codes of p's shape (formats.quantize_probs)."""
        return formats.quantize_probs(p, p_bits, p_grid)


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
    p: torch.Tensor, v: torch.Tensor, v_scale: torch.Tensor, p_bits: int, p_grid: str, out_dtype: torch.dtype
) -> torch.Tensor:
    """Probability codes [..., N, M] (uint8, formats.quantize_probs) x V codes [..., M, D] (int8, one step per
    channel, v_scale [..., D]) -> [..., N, D].

    acc = sum_j w_ij v_jd exactly, with (w, s) = formats.prob_integer_weights (log2: w = 2^(cmax - c),
    V's integers shifted); out = (fp32(acc) * s) * v_scale[d] in fp32, cast to out_dtype.
    """
    w, step = formats.prob_integer_weights(p, p_bits, p_grid)
    top = float(2 ** formats.log2_max_code(p_bits)) if p_grid == "log2" else float(2**p_bits - 1)
    acc = _exact_matmul(w, v, top * 128.0 * p.shape[-1])
    out = (acc.to(torch.float32) * step) * v_scale.to(torch.float32)[..., None, :]
    return out.to(out_dtype)


register_backend(ReferenceBackend())


def _hadamard_transform(self: ReferenceBackend, x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """Randomized block Walsh-Hadamard transform x [M, K] -> fp32 [M, K] (mixq.rotation's contract)."""
    from .. import rotation

    return rotation.hadamard_fp32(x, signs, block)


ReferenceBackend.hadamard_transform = _hadamard_transform  # type: ignore[attr-defined]
