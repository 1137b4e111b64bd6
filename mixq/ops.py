"""``torch.library`` custom ops behind which every backend sits.

Each op names its backend (an argument, or the layout a PackedWeight was prepacked for), so the
choice is made once, when a QuantLinear is built or moved, and is visible in traced graphs; the
fake implementations give ``torch.compile`` and ``torch.export`` shapes without running a kernel.
Every op is one line: what runs, fused or not, is the backend's decision (mixq.backends).
The weight ops take a :class:`~mixq.backends.PackedWeight`; their custom ops carry its fields.
"""

from __future__ import annotations

from typing import Optional

import torch

from .backends import PackedWeight, get_backend

__all__ = ["PackedWeight", "hadamard_transform", "int_gemm", "layernorm_quantize", "linear", "linear_dynamic",
           "quantize_act_dynamic", "quantize_act_static", "quantize_probs", "quantized_pv", "quantized_qk"]


@torch.library.custom_op("mixq::quantize_act_dynamic", mutates_args=())
def quantize_act_dynamic(x: torch.Tensor, a_bits: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic quantization of x [M, K] -> (int8 [M, K], fp32 step [M])."""
    return get_backend(backend).quantize_dynamic(x, a_bits)


@quantize_act_dynamic.register_fake
def _(x, a_bits, backend):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("mixq::quantize_act_static", mutates_args=())
def quantize_act_static(x: torch.Tensor, inv_scale: torch.Tensor, a_bits: int, backend: str) -> torch.Tensor:
    """Static quantization of x [M, K] with fp32 inverse steps [K] (channel-wise) or [1]."""
    return get_backend(backend).quantize_static(x, inv_scale, a_bits)


@quantize_act_static.register_fake
def _(x, inv_scale, a_bits, backend):
    return x.new_empty(x.shape, dtype=torch.int8)


@torch.library.custom_op("mixq::layernorm_quantize", mutates_args=())
def layernorm_quantize(x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float,
                       inv_scale: torch.Tensor, a_bits: int, backend: str) -> torch.Tensor:
    """LayerNorm (channel factors folded into its affine) fused with static quantization -> int8."""
    return get_backend(backend).layernorm_quantize(x, norm_weight, norm_bias, eps, inv_scale, a_bits)


@layernorm_quantize.register_fake
def _(x, norm_weight, norm_bias, eps, inv_scale, a_bits, backend):
    return x.new_empty(x.shape, dtype=torch.int8)


def _weight(codes: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor], smooth_inv: Optional[torch.Tensor],
            bits: int, k: int, n: int, layout: str) -> PackedWeight:
    return PackedWeight(codes, scale, bias, bits, k, n, layout, smooth_inv)


@torch.library.custom_op("mixq::int_gemm", mutates_args=())
def _int_gemm(xq: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
              smooth_inv: Optional[torch.Tensor], bits: int, k: int, n: int, layout: str) -> torch.Tensor:
    return get_backend(layout).int_gemm(xq, _weight(codes, scale, bias, smooth_inv, bits, k, n, layout))


@_int_gemm.register_fake
def _(xq, codes, scale, bias, smooth_inv, bits, k, n, layout):
    return xq.new_empty((xq.shape[0], n), dtype=torch.int32)


@torch.library.custom_op("mixq::linear", mutates_args=())
def _linear(xq: torch.Tensor, a_scale: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
            bias: Optional[torch.Tensor], smooth_inv: Optional[torch.Tensor], bits: int, k: int, n: int, layout: str,
            out_dtype: torch.dtype) -> torch.Tensor:
    return get_backend(layout).linear(xq, a_scale, _weight(codes, scale, bias, smooth_inv, bits, k, n, layout),
                                      out_dtype)


@_linear.register_fake
def _(xq, a_scale, codes, scale, bias, smooth_inv, bits, k, n, layout, out_dtype):
    return xq.new_empty((xq.shape[0], n), dtype=out_dtype)


@torch.library.custom_op("mixq::linear_dynamic", mutates_args=())
def _linear_dynamic(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                    smooth_inv: Optional[torch.Tensor], bits: int, k: int, n: int, layout: str, a_bits: int,
                    out_dtype: torch.dtype) -> torch.Tensor:
    return get_backend(layout).linear_dynamic(x, _weight(codes, scale, bias, smooth_inv, bits, k, n, layout), a_bits,
                                              out_dtype)


@_linear_dynamic.register_fake
def _(x, codes, scale, bias, smooth_inv, bits, k, n, layout, a_bits, out_dtype):
    return x.new_empty((x.shape[0], n), dtype=out_dtype)


def int_gemm(xq: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """Exact int32 [M, N] product of int8 activations and the packed weights (tests, GPTQ checks)."""
    return _int_gemm(xq, w.codes, w.scale, w.bias, w.smooth_inv, w.bits, w.in_features, w.out_features, w.layout)


def linear(xq: torch.Tensor, a_scale: torch.Tensor, w: PackedWeight, out_dtype: torch.dtype) -> torch.Tensor:
    """out[m, n] = (fp32(acc[m, n]) * a_scale[m]) * w.scale[n] + w.bias[n] of int8 codes xq [M, K]."""
    return _linear(xq, a_scale, w.codes, w.scale, w.bias, w.smooth_inv, w.bits, w.in_features, w.out_features,
                   w.layout, out_dtype)


def linear_dynamic(x: torch.Tensor, w: PackedWeight, a_bits: int, out_dtype: torch.dtype) -> torch.Tensor:
    """QuantLinear's dynamic forward on float x [M, K] (ReferenceBackend.linear_dynamic defines it)."""
    return _linear_dynamic(x, w.codes, w.scale, w.bias, w.smooth_inv, w.bits, w.in_features, w.out_features,
                           w.layout, a_bits, out_dtype)


@torch.library.custom_op("mixq::quantized_qk", mutates_args=())
def quantized_qk(q: torch.Tensor, q_scale: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor,
                 out_dtype: torch.dtype, backend: str) -> torch.Tensor:
    """Q K^T of int8 codes q [..., N, D], k [..., M, D] with per-token steps [..., N], [..., M] -> [..., N, M]:
    (fp32(exact acc) * q_scale[i]) * k_scale[j], batched over the leading dims (batch, heads)."""
    return get_backend(backend).quantized_qk(q, q_scale, k, k_scale, out_dtype)


@quantized_qk.register_fake
def _(q, q_scale, k, k_scale, out_dtype, backend):
    return q.new_empty((*q.shape[:-1], k.shape[-2]), dtype=out_dtype)


@torch.library.custom_op("mixq::quantized_pv", mutates_args=())
def quantized_pv(p: torch.Tensor, v: torch.Tensor, v_scale: torch.Tensor, p_bits: int, p_grid: str,
                 out_dtype: torch.dtype, backend: str) -> torch.Tensor:
    """softmax(.) V: uint8 probability codes p [..., N, M] (``formats.quantize_probs`` on grid ``p_grid``) times
    int8 V codes [..., M, D] with per-channel steps v_scale [..., D] -> [..., N, D], exact integer sums."""
    return get_backend(backend).quantized_pv(p, v, v_scale, p_bits, p_grid, out_dtype)


@quantized_pv.register_fake
def _(p, v, v_scale, p_bits, p_grid, out_dtype, backend):
    return p.new_empty((*p.shape[:-1], v.shape[-1]), dtype=out_dtype)


@torch.library.custom_op("mixq::quantize_probs", mutates_args=())
def quantize_probs(p: torch.Tensor, p_bits: int, p_grid: str, backend: str) -> torch.Tensor:
    """Post-softmax probabilities p (any shape, any float dtype) -> uint8 codes of the same shape on grid
    ``p_grid`` ("log2" or "uniform"): ``formats.quantize_probs``, the contract."""
    return get_backend(backend).quantize_probs(p, p_bits, p_grid)


@quantize_probs.register_fake
def _(p, p_bits, p_grid, backend):
    return p.new_empty(p.shape, dtype=torch.uint8)


@torch.library.custom_op("mixq::hadamard_transform", mutates_args=())
def hadamard_transform(x: torch.Tensor, signs: torch.Tensor, block: int, backend: str) -> torch.Tensor:
    """Randomized block Walsh-Hadamard transform of x [M, K] -> fp32 [M, K] (mixq.rotation's contract)."""
    return get_backend(backend).hadamard_transform(x, signs, block)


@hadamard_transform.register_fake
def _(x, signs, block, backend):
    return x.new_empty(x.shape, dtype=torch.float32)
