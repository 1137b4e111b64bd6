"""The ``cpu`` backend: the C++ AVX2 + OpenMP kernels of ``mixq._C`` (built from csrc/).

Weights are prepacked once at load time into tiles of 8 output channels whose codes are
the unsigned operand of AVX2 ``maddubs`` (see csrc/gemm.cpp); the canonical packed form
stays what checkpoints hold. When the extension is not built this module still imports,
registers a backend that reports itself unavailable, and warns once, so CPU tensors fall
back to the reference backend.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from .. import formats
from . import register_backend

try:
    from .. import _C  # type: ignore[attr-defined]
except ImportError as _err:  # extension not built (MIXQ_NO_EXT=1, or a failed compile)
    _C = None
    _IMPORT_ERROR: Optional[ImportError] = _err
    warnings.warn(
        "mixq: the C++ CPU kernels (mixq._C) are not built, so the slow reference backend serves "
        f"CPU tensors ({_err}). Reinstall with `pip install --no-build-isolation -e .` to build them.",
        RuntimeWarning,
        stacklevel=2,
    )
else:
    _IMPORT_ERROR = None

_FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16)
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def extension_available() -> bool:
    """True when ``mixq._C`` imported."""
    return _C is not None


def _require_ext() -> None:
    if _C is None:
        raise RuntimeError(f"mixq cpu backend: the C++ extension mixq._C is not built ({_IMPORT_ERROR})")


def _check_cpu(t: torch.Tensor, what: str) -> None:
    if t.device.type != "cpu":
        raise ValueError(f"mixq cpu backend: {what} must be on the CPU, got {t.device}")


def _check_float_2d(x: torch.Tensor, what: str) -> None:
    _check_cpu(x, what)
    if x.dim() != 2 or x.dtype not in _FLOAT_INPUTS:
        raise ValueError(
            f"mixq cpu backend: {what} must be a 2-D float32/bfloat16/float16 tensor [M, K], "
            f"got {x.dtype} {tuple(x.shape)}"
        )


class CpuBackend:
    """Backend protocol (mixq.backends.Backend) over the C++ kernels."""

    name = "cpu"
    priority = 10

    def available(self, device: torch.device) -> bool:
        return _C is not None and torch.device(device).type == "cpu"

    def prepack(self, packed: torch.Tensor, w_bits: int, k: int) -> torch.Tensor:
        """Canonical [N, row_bytes] uint8 -> flat uint8 prepacked tiles (a plain tensor, usable as a buffer)."""
        _require_ext()
        formats.check_bits(w_bits, "w_bits")
        _check_cpu(packed, "packed weights")
        return _C.prepack_weight(packed, w_bits, k)

    def quantize_dynamic(self, x: torch.Tensor, a_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        _require_ext()
        formats.check_bits(a_bits, "a_bits")
        _check_float_2d(x, "x")
        return _C.quantize_dynamic(x, a_bits)

    def quantize_static(self, x: torch.Tensor, inv_scale: torch.Tensor, a_bits: int) -> torch.Tensor:
        _require_ext()
        formats.check_bits(a_bits, "a_bits")
        _check_float_2d(x, "x")
        _check_cpu(inv_scale, "inv_scale")
        return _C.quantize_static(x, inv_scale, a_bits)

    def layernorm_quantize(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        eps: float,
        inv_scale: torch.Tensor,
        a_bits: int,
    ) -> torch.Tensor:
        """LayerNorm over the last dim fused with static quantization (one pass over x, no float copy)."""
        _require_ext()
        formats.check_bits(a_bits, "a_bits")
        _check_float_2d(x, "x")
        return _C.layernorm_quantize(x, weight, bias, float(eps), inv_scale, a_bits)

    def int_gemm(self, xq: torch.Tensor, w: torch.Tensor, w_bits: int, k: int, n: int) -> torch.Tensor:
        _require_ext()
        formats.check_bits(w_bits, "w_bits")
        return _C.int_gemm(xq, w, w_bits, k, n)

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
        _require_ext()
        formats.check_bits(w_bits, "w_bits")
        if out_dtype not in _OUT_DTYPES:
            raise ValueError(f"mixq cpu backend: out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
        if out_dtype == torch.float16:  # the kernel writes fp32 or bf16; fp16 rounds from fp32 like the reference
            return _C.packed_linear(xq, a_scale, w, w_scale, bias, w_bits, k, n, torch.float32).to(torch.float16)
        return _C.packed_linear(xq, a_scale, w, w_scale, bias, w_bits, k, n, out_dtype)

    def linear_dynamic(
        self,
        x: torch.Tensor,
        smooth_inv: Optional[torch.Tensor],
        w: torch.Tensor,
        w_scale: torch.Tensor,
        bias: Optional[torch.Tensor],
        w_bits: int,
        a_bits: int,
        k: int,
        n: int,
        out_dtype: torch.dtype,
        a_scale_mul: Optional[torch.Tensor] = None,
        headroom: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``packed_linear(*quantize_dynamic(x * smooth_inv))`` in one call and one parallel region:
        (out [M, n], a_scale [M]).

        Same numbers bit for bit as the two ops (the smooth multiply is the same fp32 product); the
        activation codes never become a tensor. ``a_scale_mul`` (one value) multiplies each step in
        the epilogue only, as ``packed_linear(xq, a_scale * a_scale_mul, ...)`` would. ``headroom``
        instead applies QuantLinear's overflow headroom f (``formats.epilogue_headroom`` of the
        steps; 1 for any input below ~1e21): steps * f and bias * f in the epilogue, output / f.
        The returned ``a_scale`` is the plain step.
        """
        _require_ext()
        formats.check_bits(w_bits, "w_bits")
        formats.check_bits(a_bits, "a_bits")
        _check_float_2d(x, "x")
        if out_dtype not in _OUT_DTYPES:
            raise ValueError(f"mixq cpu backend: out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
        return _C.linear_dynamic(x, smooth_inv, w, w_scale, bias, w_bits, a_bits, k, n, out_dtype, a_scale_mul,
                                 headroom)

    # mixq.ops.quantized_linear_dynamic hands this backend the headroom (a_scale_mul=None) and the
    # smooth multiply: all of QuantLinear's dynamic forward is one C++ call here, so QuantLinear
    # uses it at every M (FUSED_DYNAMIC_MAX_M bounds the Triton kernel only).
    fused_headroom = True
    fused_dynamic_any_m = True

    def quantized_linear_dynamic(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        w_scale: torch.Tensor,
        bias: Optional[torch.Tensor],
        w_bits: int,
        a_bits: int,
        k: int,
        n: int,
        out_dtype: torch.dtype,
        a_scale_mul: Optional[torch.Tensor] = None,
        smooth_inv: Optional[torch.Tensor] = None,
        headroom: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused entry point of mixq.ops (the triton backend's signature, plus ``smooth_inv`` and
        ``headroom`` as in :meth:`linear_dynamic`) -> (out [M, n], a_scale [M]). QuantLinear's hot
        path: no Python checks here, the C++ call checks every argument itself (RuntimeError)."""
        if _C is None:
            _require_ext()
        return _C.linear_dynamic(x, smooth_inv, w, w_scale, bias, w_bits, a_bits, k, n, out_dtype, a_scale_mul,
                                 headroom)


    # ------------------------------------------------------------------ attention matmuls (issue 15)

    def quantized_qk(
        self, q: torch.Tensor, q_scale: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor, out_dtype: torch.dtype
    ) -> torch.Tensor:
        """Q K^T on int8 codes (csrc/attention.cpp), bit-exact with ``reference.attention_qk``:
        q [..., N, D], k [..., M, D], per-token steps [..., N] / [..., M] -> [..., N, M] in out_dtype."""
        _require_attention_ext()
        lead, n, m, d = formats.check_qk_operands(q, q_scale, k, k_scale, out_dtype)
        _check_all_cpu(q=q, q_scale=q_scale, k=k, k_scale=k_scale)
        if d > _C.attention_max_head_dim:
            raise ValueError(f"mixq cpu quantized_qk: head dim {d} above {_C.attention_max_head_dim} (the exact "
                             "int32 sum's bound); use the reference backend")
        bh = math.prod(lead)  # not -1: a zero-size dim would leave it undetermined
        out = _C.attention_qk(q.reshape(bh, n, d), q_scale.to(torch.float32).reshape(bh, n), k.reshape(bh, m, d),
                              k_scale.to(torch.float32).reshape(bh, m))
        return out.reshape(*lead, n, m).to(out_dtype)

    def quantized_pv(
        self, p: torch.Tensor, v: torch.Tensor, v_scale: torch.Tensor, p_bits: int, p_kind: str, out_dtype: torch.dtype
    ) -> torch.Tensor:
        """softmax(.) V on codes (csrc/attention.cpp), bit-exact with ``reference.attention_pv``: uint8
        probability codes p [..., N, M] on grid ``p_kind`` x int8 V [..., M, D], per-channel steps
        v_scale [..., D] -> [..., N, D] in out_dtype."""
        _require_attention_ext()
        lead, n, m, d = formats.check_pv_operands(p, v, v_scale, p_bits, p_kind, out_dtype)
        _check_all_cpu(p=p, v=v, v_scale=v_scale)
        if m > _C.attention_max_keys:
            raise ValueError(f"mixq cpu quantized_pv: {m} keys above {_C.attention_max_keys} (the exact integer "
                             "sum's bound); use the reference backend")
        bh = math.prod(lead)
        p3, v3, vs2 = p.reshape(bh, n, m), v.reshape(bh, m, d), v_scale.to(torch.float32).reshape(bh, d)
        if p_kind == "uniform":
            out = _C.attention_pv_uniform(p3, v3, vs2, p_bits)
        else:
            out = _C.attention_pv_log2(p3, v3, vs2, formats.log2_max_code(p_bits), formats.prob_zero_code(p_bits))
        return out.reshape(*lead, n, d).to(out_dtype)

    def quantize_probs(self, p: torch.Tensor, bits: int, kind: str) -> torch.Tensor:
        """Post-softmax probabilities (any shape) -> uint8 codes (csrc/probs.cpp): one vectorized pass,
        bit-exact with ``formats.quantize_probs``. fp32/bf16/fp16 are read as they are (widened in the
        kernel); any other dtype is converted to fp32 first, as formats does."""
        formats.check_bits(bits, "softmax_bits")
        formats.check_softmax_quant(kind)
        _check_cpu(p, "p (probabilities)")
        if _C is None or not hasattr(_C, "quantize_probs"):  # extension absent or built before probs.cpp
            return formats.quantize_probs(p, bits, kind)
        if p.dtype not in _FLOAT_INPUTS:
            p = p.to(torch.float32)
        return _C.quantize_probs(p, bits, kind == "log2")


def _require_attention_ext() -> None:
    _require_ext()
    if not hasattr(_C, "attention_qk"):  # a mixq._C built before csrc/attention.cpp existed
        raise RuntimeError("mixq cpu backend: mixq._C has no attention kernels (built from older sources); "
                           "rebuild it: `python setup.py build_ext --inplace` or `pip install --no-build-isolation -e .`")


def _check_all_cpu(**tensors: torch.Tensor) -> None:
    for what, t in tensors.items():
        _check_cpu(t, what)


register_backend(CpuBackend())
