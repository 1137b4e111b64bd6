"""The ``triton`` backend: mixq.kernels on NVIDIA GPUs (Ampere and newer, Hopper first).

It is chosen automatically for CUDA tensors (priority 20, above the reference). CPU tensors
never route here in normal use; under ``TRITON_INTERPRET=1`` the methods also accept CPU tensors
so the tests can check the kernels bit-exactly without a GPU.

Weights: :meth:`prepack` turns canonical packed rows (what checkpoints hold, 2-D) into the
GPU layout of :mod:`mixq.kernels.layout` (3-D), once, when a QuantLinear is built or moved.

Everything in the launch path is shape-driven Python and asynchronous kernel launches (no
``.item()``, no host syncs), so it is capturable in CUDA graphs; the ``mixq::*`` custom ops are
opaque to ``torch.compile``, which calls them as they are.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional

import torch

try:
    import triton  # noqa: F401
except ImportError as e:  # the registry skips this backend when triton is absent
    raise ImportError(f"the mixq triton backend needs the 'triton' package ({e}); pip install 'mixq[triton]'") from e

from mixq import formats, kernels
from mixq.kernels import attention as attention_kernels

from . import PackedWeight, register_backend
from .reference import ReferenceBackend

MIN_CAPABILITY = (8, 0)  # int8 tensor-core tl.dot
# Dynamic Linears with at most this many tokens run as one fused quantize+GEMM launch. Each program
# of the fused kernel re-reads its rows in float over all of K for the amax before its main loop
# (cdiv(N, BLOCK_N) * split_k extra passes, not overlapped with the MMAs): cheaper than a second
# launch and the int8 round trip while M is a few row tiles, pure extra traffic once M is compute-
# bound. 64 is the largest M the heuristic still gives BLOCK_M <= 64; to be re-tuned on a GPU.
FUSED_DYNAMIC_MAX_M: int = 64


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


class TritonBackend(ReferenceBackend):
    name = "triton"
    priority = 20

    def available(self, device: torch.device) -> bool:
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            return False
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _capability(index) >= MIN_CAPABILITY

    # ------------------------------------------------------------------ helpers

    def _device_scope(self, *tensors: torch.Tensor) -> contextlib.AbstractContextManager:
        """Launch on the tensors' GPU; reject CPU tensors unless the interpreter is on."""
        device = tensors[0].device
        for t in tensors:
            if t.device != device:
                raise ValueError(f"triton backend: tensors on different devices ({device} and {t.device})")
        if device.type == "cuda":
            return torch.cuda.device(device)
        if device.type == "cpu" and _interpreting():
            return contextlib.nullcontext()
        raise RuntimeError(
            f"the triton backend runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1); got {device}"
        )

    # ------------------------------------------------------------------ overrides of the reference

    def prepack(self, canonical: torch.Tensor, bits: int, k: int) -> torch.Tensor:
        """Canonical uint8 [N, row_bytes] -> GPU layout uint8 [N, k_tiles, tile_bytes] (any device)."""
        return kernels.prepack_gpu(canonical, bits, k)

    def quantize_dynamic(self, x: torch.Tensor, a_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        formats.check_bits(a_bits, "a_bits")
        with self._device_scope(x):
            return kernels.quantize_dynamic(x, a_bits)

    def quantize_static(self, x: torch.Tensor, inv_scale: torch.Tensor, a_bits: int) -> torch.Tensor:
        formats.check_bits(a_bits, "a_bits")
        with self._device_scope(x, inv_scale):
            return kernels.quantize_static(x, inv_scale, a_bits)

    def layernorm_quantize(self, x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float,
                           inv_scale: torch.Tensor, a_bits: int) -> torch.Tensor:
        """LayerNorm(x) (affine with the channel factors folded in) quantized to int8 in one pass."""
        formats.check_bits(a_bits, "a_bits")
        extra = [t for t in (norm_weight, norm_bias) if t is not None]
        with self._device_scope(x, inv_scale, *extra):
            return kernels.layernorm_quantize(x, norm_weight, norm_bias, eps, inv_scale, a_bits)

    def int_gemm(self, xq: torch.Tensor, w: PackedWeight) -> torch.Tensor:
        self._check_layout(w)
        with self._device_scope(xq, w.codes):
            return kernels.mixed_gemm(xq, w.codes, w.bits, w.in_features, w.out_features)

    def linear(self, xq: torch.Tensor, a_scale: torch.Tensor, w: PackedWeight, out_dtype: torch.dtype) -> torch.Tensor:
        self._check_layout(w)
        extra = [w.bias] if w.bias is not None else []
        with self._device_scope(xq, a_scale, w.codes, w.scale, *extra):
            return kernels.mixed_gemm(xq, w.codes, w.bits, w.in_features, w.out_features, a_scale, w.scale, w.bias,
                                      out_dtype)

    def linear_dynamic(self, x: torch.Tensor, w: PackedWeight, a_bits: int, out_dtype: torch.dtype) -> torch.Tensor:
        """At most FUSED_DYNAMIC_MAX_M tokens: one launch that quantizes and multiplies, the overflow
        headroom read off the steps beforehand (abs and max are exact in any dtype); more tokens:
        the quantize kernel, then the GEMM (the base class's composition)."""
        if x.shape[0] > FUSED_DYNAMIC_MAX_M or w.in_features == 0:
            return super().linear_dynamic(x, w, a_bits, out_dtype)
        self._check_layout(w)
        formats.check_bits(a_bits, "a_bits")
        if w.smooth_inv is not None:
            x = (x.to(torch.float32) * w.smooth_inv).contiguous()
        steps = x.abs().amax(dim=-1).to(torch.float32).clamp_min(formats.SCALE_EPS) / formats.qmax(a_bits)
        f = formats.epilogue_headroom(steps)
        bias = w.bias * f if w.bias is not None else None
        extra = [bias] if bias is not None else []
        with self._device_scope(x, w.codes, w.scale, f, *extra):
            out, _ = kernels.quantized_linear_dynamic(x, w.codes, w.bits, a_bits, w.in_features, w.out_features,
                                                      w.scale, bias, out_dtype, a_scale_mul=f)
        return out.div_(f)

    def quantized_qk(
        self, q: torch.Tensor, q_scale: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor, out_dtype: torch.dtype
    ) -> torch.Tensor:
        """Q K^T on int8 tensor cores (mixq.kernels.attention): bit-identical to the reference's attention_qk.
        Checks dtypes, shapes (equal leading dims, head dim <= attention.MAX_HEAD_DIM) and devices."""
        with self._device_scope(q, q_scale, k, k_scale):
            return attention_kernels.quantized_qk(q, q_scale, k, k_scale, out_dtype)

    def quantized_pv(
        self, p: torch.Tensor, v: torch.Tensor, v_scale: torch.Tensor, p_bits: int, p_grid: str, out_dtype: torch.dtype
    ) -> torch.Tensor:
        """softmax(.) V from uint8 probability codes on int8 tensor cores (the codes split into int8 buckets,
        combined exactly in int64): bit-identical to the reference's attention_pv. At most
        attention.MAX_PV_TOKENS tokens and a head dim <= attention.MAX_HEAD_DIM; ValueError beyond.
        """
        with self._device_scope(p, v, v_scale):
            return attention_kernels.quantized_pv(p, v, v_scale, p_bits, p_grid, out_dtype)

    def quantize_probs(self, p: torch.Tensor, p_bits: int, p_grid: str) -> torch.Tensor:
        """Post-softmax probabilities -> uint8 codes in one elementwise launch (mixq.kernels.attention),
        bit-identical to ``formats.quantize_probs``."""
        with self._device_scope(p):
            return attention_kernels.quantize_probs(p, p_bits, p_grid)


register_backend(TritonBackend())


def _triton_hadamard_transform(self: TritonBackend, x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """The randomized block Walsh-Hadamard transform in one launch (mixq.kernels.hadamard), bit-exact with
    rotation.hadamard_fp32 (a method attached here, after the class, to keep this file's edits appends)."""
    from mixq.kernels import hadamard as hadamard_kernels

    with self._device_scope(x, signs):
        return hadamard_kernels.hadamard_transform(x, signs, block)


TritonBackend.hadamard_transform = _triton_hadamard_transform  # type: ignore[attr-defined]
