"""``torch.library`` custom ops behind which every backend sits.

Each op takes the backend's name as a string argument, so the choice is made once (when a
QuantLinear is built or moved) and is visible in traced graphs; the fake implementations
give ``torch.compile`` and ``torch.export`` shapes without running a kernel.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import formats
from .backends import get_backend


@torch.library.custom_op("mixq::quantize_act_dynamic", mutates_args=())
def quantize_act_dynamic(x: torch.Tensor, a_bits: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic quantization of x [M, K] -> (int8 [M, K], fp32 scale [M])."""
    return get_backend(backend).quantize_dynamic(x, a_bits)


@quantize_act_dynamic.register_fake
def _(x, a_bits, backend):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("mixq::quantize_act_static", mutates_args=())
def quantize_act_static(x: torch.Tensor, inv_scale: torch.Tensor, a_bits: int, backend: str) -> torch.Tensor:
    """Static quantization of x [M, K] with fp32 inverse scales [K] (channel-wise) or [1]."""
    return get_backend(backend).quantize_static(x, inv_scale, a_bits)


@quantize_act_static.register_fake
def _(x, inv_scale, a_bits, backend):
    return x.new_empty(x.shape, dtype=torch.int8)


@torch.library.custom_op("mixq::layernorm_quantize", mutates_args=())
def layernorm_quantize(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, inv_scale: torch.Tensor, a_bits: int,
    backend: str,
) -> torch.Tensor:
    """LayerNorm (channel factors folded into weight/bias) fused with static quantization -> int8."""
    impl = getattr(get_backend(backend), "layernorm_quantize", None) or get_backend("reference").layernorm_quantize
    return impl(x, weight, bias, eps, inv_scale, a_bits)


@layernorm_quantize.register_fake
def _(x, weight, bias, eps, inv_scale, a_bits, backend):
    return x.new_empty(x.shape, dtype=torch.int8)


@torch.library.custom_op("mixq::int_gemm", mutates_args=())
def int_gemm(xq: torch.Tensor, w: torch.Tensor, w_bits: int, k: int, n: int, backend: str) -> torch.Tensor:
    """Exact int32 [M, N] product of int8 activations and packed weights (for tests)."""
    return get_backend(backend).int_gemm(xq, w, w_bits, k, n)


@int_gemm.register_fake
def _(xq, w, w_bits, k, n, backend):
    return xq.new_empty((xq.shape[0], n), dtype=torch.int32)


@torch.library.custom_op("mixq::packed_linear", mutates_args=())
def packed_linear(
    xq: torch.Tensor,
    a_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    w_bits: int,
    k: int,
    n: int,
    out_dtype: torch.dtype,
    backend: str,
) -> torch.Tensor:
    """out[m, n] = acc[m, n] * a_scale[m] * w_scale[n] + bias[n], in ``out_dtype``."""
    return get_backend(backend).packed_linear(xq, a_scale, w, w_scale, bias, w_bits, k, n, out_dtype)


@packed_linear.register_fake
def _(xq, a_scale, w, w_scale, bias, w_bits, k, n, out_dtype, backend):
    return xq.new_empty((xq.shape[0], n), dtype=out_dtype)


@torch.library.custom_op("mixq::quantized_linear_dynamic", mutates_args=())
def quantized_linear_dynamic(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    a_scale_mul: Optional[torch.Tensor],
    w_bits: int,
    a_bits: int,
    k: int,
    n: int,
    out_dtype: torch.dtype,
    backend: str,
    smooth_inv: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-token dynamic quantize of float x [M, k] (smooth mode: of ``x * smooth_inv`` in fp32 first),
    then packed_linear, as one call where the backend fuses them.

    ``a_scale_mul`` None: QuantLinear's dynamic forward. The power-of-two overflow headroom
    ``f = formats.epilogue_headroom(steps)`` comes from this call's own steps; the epilogue uses
    steps * f and bias * f, and the output is divided by f (exactly 1 below ~1e21 inputs).
    ``a_scale_mul`` a tensor (one fp32 value): the raw epilogue, steps * a_scale_mul, bias and output
    as given, i.e. ``packed_linear(xq, a_scale * a_scale_mul, ...)``.

    Equal bit for bit, on every backend, to the composition: ``x * smooth_inv`` (fp32), then
    ``quantize_act_dynamic``, then ``packed_linear`` with the steps above. The cpu backend does all
    of it, headroom included, in one C++ call; triton fuses quantize and GEMM in one launch (the
    headroom read off the steps computed beforehand); the others run their own two calls.
    """
    b = get_backend(backend)
    fused = getattr(b, "quantized_linear_dynamic", None)
    headroom = a_scale_mul is None
    if headroom and getattr(b, "fused_headroom", False):  # cpu: smooth multiply and headroom in its one call
        return fused(x, w, w_scale, bias, w_bits, a_bits, k, n, out_dtype, smooth_inv=smooth_inv, headroom=True)[0]
    if smooth_inv is not None:
        x = (x.to(torch.float32) * smooth_inv).contiguous()
    if fused is not None and not headroom:
        return fused(x, w, w_scale, bias, w_bits, a_bits, k, n, out_dtype, a_scale_mul=a_scale_mul)[0]
    if fused is not None:  # one launch: f from the steps it will compute (abs and max are exact in any dtype)
        steps = x.abs().amax(dim=-1).to(torch.float32).clamp_min(formats.SCALE_EPS) / formats.qmax(a_bits)
        f = formats.epilogue_headroom(steps)
        bias = bias * f if bias is not None else None
        return fused(x, w, w_scale, bias, w_bits, a_bits, k, n, out_dtype, a_scale_mul=f)[0].div_(f)
    xq, a_scale = b.quantize_dynamic(x, a_bits)
    if not headroom:
        return b.packed_linear(xq, a_scale * a_scale_mul.reshape(()).to(torch.float32), w, w_scale, bias, w_bits, k,
                               n, out_dtype)
    f = formats.epilogue_headroom(a_scale)
    bias = bias * f if bias is not None else None
    return b.packed_linear(xq, a_scale * f, w, w_scale, bias, w_bits, k, n, out_dtype).div_(f)


@quantized_linear_dynamic.register_fake
def _(x, w, w_scale, bias, a_scale_mul, w_bits, a_bits, k, n, out_dtype, backend, smooth_inv=None):
    return x.new_empty((x.shape[0], n), dtype=out_dtype)


def _attention_impl(backend: str, method: str):
    """The backend's attention method, or the reference one when it has none: cpu runs its C++ kernels
    (csrc/attention.cpp), triton its int8 tensor-core kernels (mixq/kernels/attention.py)."""
    return getattr(get_backend(backend), method, None) or getattr(get_backend("reference"), method)


@torch.library.custom_op("mixq::quantized_qk", mutates_args=())
def quantized_qk(
    q: torch.Tensor, q_scale: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor, out_dtype: torch.dtype,
    backend: str,
) -> torch.Tensor:
    """Q K^T of int8 codes q [..., N, D], k [..., M, D] with per-token steps [..., N], [..., M] -> [..., N, M]:
    (fp32(exact acc) * q_scale[i]) * k_scale[j], batched over the leading dims (batch, heads).
    cpu and triton run their own kernels, bit-identical to the reference."""
    return _attention_impl(backend, "quantized_qk")(q, q_scale, k, k_scale, out_dtype)


@quantized_qk.register_fake
def _(q, q_scale, k, k_scale, out_dtype, backend):
    return q.new_empty((*q.shape[:-1], k.shape[-2]), dtype=out_dtype)


@torch.library.custom_op("mixq::quantized_pv", mutates_args=())
def quantized_pv(
    p: torch.Tensor, v: torch.Tensor, v_scale: torch.Tensor, p_bits: int, p_kind: str, out_dtype: torch.dtype,
    backend: str,
) -> torch.Tensor:
    """softmax(.) V: uint8 probability codes p [..., N, M] (``formats.quantize_probs``, grid ``p_kind``)
    times int8 V codes [..., M, D] with per-channel steps v_scale [..., D] -> [..., N, D], exact integer
    sums (log2: shifts of V's integers). cpu and triton run their own kernels,
    bit-identical to the reference."""
    return _attention_impl(backend, "quantized_pv")(p, v, v_scale, p_bits, p_kind, out_dtype)


@quantized_pv.register_fake
def _(p, v, v_scale, p_bits, p_kind, out_dtype, backend):
    return p.new_empty((*p.shape[:-1], v.shape[-1]), dtype=out_dtype)


@torch.library.custom_op("mixq::quantize_probs", mutates_args=())
def quantize_probs(p: torch.Tensor, bits: int, kind: str, backend: str) -> torch.Tensor:
    """Post-softmax probabilities p (any shape, any float dtype) -> uint8 codes of the same shape on grid
    ``kind`` ("log2" or "uniform"): ``formats.quantize_probs``, the contract. cpu and triton run their
    own elementwise kernels (bit-identical); a backend without ``quantize_probs`` falls back to formats."""
    impl = getattr(get_backend(backend), "quantize_probs", None)
    if impl is None:
        return formats.quantize_probs(p, bits, kind)
    return impl(p, bits, kind)


@quantize_probs.register_fake
def _(p, bits, kind, backend):
    return p.new_empty(p.shape, dtype=torch.uint8)
