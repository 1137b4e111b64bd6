"""The ``cpu`` backend: the C++ kernels of ``mixq._C`` (built from csrc/; the ISA family is chosen at run time).

Weights are prepacked once at load time into the kernels' tile layout (csrc/gemm.cpp); the
canonical packed form stays what checkpoints hold. When the extension is not built this module
still imports, registers a backend that reports itself unavailable, and warns once, so CPU tensors
fall back to the reference backend.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from .. import formats
from . import PackedWeight, register_backend
from .reference import ReferenceBackend

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


class CpuBackend(ReferenceBackend):
    """The C++ kernels: every GEMM, the dynamic Linear as one call, the attention matmuls."""

    name = "cpu"
    priority = 10

    def available(self, device: torch.device) -> bool:
        return _C is not None and torch.device(device).type == "cpu"

    def prepack(self, canonical: torch.Tensor, bits: int, k: int) -> torch.Tensor:
        """Canonical [N, row_bytes] uint8 -> flat uint8 prepacked tiles (a plain tensor, usable as a buffer)."""
        _require_ext()
        formats.check_bits(bits, "w_bits")
        _check_cpu(canonical, "packed weights")
        return _C.prepack_weight(canonical, bits, k)

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

    def layernorm_quantize(self, x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float,
                           inv_scale: torch.Tensor, a_bits: int) -> torch.Tensor:
        """LayerNorm over the last dim fused with static quantization (one pass over x, no float copy)."""
        _require_ext()
        formats.check_bits(a_bits, "a_bits")
        _check_float_2d(x, "x")
        return _C.layernorm_quantize(x, norm_weight, norm_bias, float(eps), inv_scale, a_bits)

    def int_gemm(self, xq: torch.Tensor, w: PackedWeight) -> torch.Tensor:
        _require_ext()
        self._check_layout(w)
        return _C.int_gemm(xq, w.codes, w.bits, w.in_features, w.out_features)

    def linear(self, xq: torch.Tensor, a_scale: torch.Tensor, w: PackedWeight, out_dtype: torch.dtype) -> torch.Tensor:
        _require_ext()
        self._check_layout(w)
        _check_out_dtype(out_dtype)
        # the kernel writes fp32 or bf16; fp16 rounds from fp32, as the reference rounds it
        kernel_dtype = torch.float32 if out_dtype == torch.float16 else out_dtype
        out = _C.packed_linear(xq, a_scale, w.codes, w.scale, w.bias, w.bits, w.in_features, w.out_features,
                               kernel_dtype)
        return out if kernel_dtype == out_dtype else out.to(out_dtype)

    def linear_dynamic(self, x: torch.Tensor, w: PackedWeight, a_bits: int, out_dtype: torch.dtype) -> torch.Tensor:
        """The whole dynamic Linear in one C++ call and one parallel region, at every M: the smooth
        multiply, the per-token quantize (codes never become a tensor), the GEMM and the epilogue with
        its overflow headroom. The C++ call checks every argument itself (RuntimeError); QuantLinear's
        hot path pays no Python checks here."""
        if _C is None or w.layout != self.name:
            _require_ext()
            self._check_layout(w)
        return _C.linear_dynamic(x, w.smooth_inv, w.codes, w.scale, w.bias, w.bits, a_bits, w.in_features,
                                 w.out_features, out_dtype, None, True)[0]

    # ------------------------------------------------------------------ attention matmuls

    def quantized_qk(
        self, q: torch.Tensor, q_scale: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor, out_dtype: torch.dtype
    ) -> torch.Tensor:
        """Q K^T on int8 codes (csrc/attention.cpp), bit-exact with ``reference.attention_qk``."""
        _require_ext()
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
        self, p: torch.Tensor, v: torch.Tensor, v_scale: torch.Tensor, p_bits: int, p_grid: str, out_dtype: torch.dtype
    ) -> torch.Tensor:
        """softmax(.) V on codes (csrc/attention.cpp), bit-exact with ``reference.attention_pv``."""
        _require_ext()
        lead, n, m, d = formats.check_pv_operands(p, v, v_scale, p_bits, p_grid, out_dtype)
        _check_all_cpu(p=p, v=v, v_scale=v_scale)
        if m > _C.attention_max_keys:
            raise ValueError(f"mixq cpu quantized_pv: {m} keys above {_C.attention_max_keys} (the exact integer "
                             "sum's bound); use the reference backend")
        bh = math.prod(lead)
        p3, v3, vs2 = p.reshape(bh, n, m), v.reshape(bh, m, d), v_scale.to(torch.float32).reshape(bh, d)
        if p_grid == "uniform":
            out = _C.attention_pv_uniform(p3, v3, vs2, p_bits)
        else:
            out = _C.attention_pv_log2(p3, v3, vs2, formats.log2_max_code(p_bits), formats.prob_zero_code(p_bits))
        return out.reshape(*lead, n, d).to(out_dtype)

    def quantize_probs(self, p: torch.Tensor, p_bits: int, p_grid: str) -> torch.Tensor:
        """Post-softmax probabilities (any shape) -> uint8 codes (csrc/probs.cpp), one vectorized pass.
        fp32/bf16/fp16 are read as they are (widened in the kernel); other dtypes convert to fp32 first."""
        _require_ext()
        formats.check_bits(p_bits, "p_bits")
        formats.check_p_grid(p_grid)
        _check_cpu(p, "p (probabilities)")
        if p.dtype not in _FLOAT_INPUTS:
            p = p.to(torch.float32)
        return _C.quantize_probs(p, p_bits, p_grid == "log2")


def _check_out_dtype(out_dtype: torch.dtype) -> None:
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"mixq cpu backend: out_dtype must be float32, bfloat16 or float16, got {out_dtype}")


def _check_all_cpu(**tensors: torch.Tensor) -> None:
    for what, t in tensors.items():
        _check_cpu(t, what)


register_backend(CpuBackend())


def _cpu_hadamard_transform(self: CpuBackend, x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """The randomized block Walsh-Hadamard transform in C++ (csrc/hadamard.cpp), bit-exact with
    rotation.hadamard_fp32 (a method attached here, after the class, to keep this file's edits appends)."""
    from .. import rotation

    _require_ext()
    _check_float_2d(x, "x")
    rotation.check_transform_args(x, signs, block)
    _check_cpu(signs, "signs")
    return _C.hadamard_transform(x, signs, block, rotation.hadamard_scale(block))


CpuBackend.hadamard_transform = _cpu_hadamard_transform  # type: ignore[attr-defined]
