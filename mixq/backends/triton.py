"""The ``triton`` backend: mixq.kernels on NVIDIA GPUs (Ampere and newer, Hopper first).

It is chosen automatically for CUDA tensors (priority 20, above the reference). CPU tensors
never route here in normal use; under ``TRITON_INTERPRET=1`` the methods also accept CPU tensors
so the tests can check the kernels bit-exactly without a GPU.

Weights: :meth:`prepack` turns canonical packed rows (what checkpoints hold, 2-D) into the
GPU layout of :mod:`mixq.kernels.layout` (3-D). The GEMM methods take either form; canonical
weights are re-laid out on the fly (an allocation per call: fine for tests, slow in a model,
which is why QuantLinear prepacks once).

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

from . import register_backend

MIN_CAPABILITY = (8, 0)  # int8 tensor-core tl.dot


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


class TritonBackend:
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

    def _gpu_weights(self, w: torch.Tensor, w_bits: int, k: int) -> torch.Tensor:
        return kernels.prepack_gpu(w, w_bits, k) if w.dim() == 2 else w

    # ------------------------------------------------------------------ Backend protocol

    def prepack(self, packed: torch.Tensor, w_bits: int, k: int) -> torch.Tensor:
        """Canonical uint8 [N, row_bytes] -> GPU layout uint8 [N, k_tiles, tile_bytes] (any device)."""
        return kernels.prepack_gpu(packed, w_bits, k)

    def quantize_dynamic(self, x: torch.Tensor, a_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        formats.check_bits(a_bits, "a_bits")
        with self._device_scope(x):
            return kernels.quantize_dynamic(x, a_bits)

    def quantize_static(self, x: torch.Tensor, inv_scale: torch.Tensor, a_bits: int) -> torch.Tensor:
        formats.check_bits(a_bits, "a_bits")
        with self._device_scope(x, inv_scale):
            return kernels.quantize_static(x, inv_scale, a_bits)

    def layernorm_quantize(
        self,
        x: torch.Tensor,
        gamma: Optional[torch.Tensor],
        beta: Optional[torch.Tensor],
        eps: float,
        inv_scale: torch.Tensor,
        a_bits: int,
    ) -> torch.Tensor:
        """LayerNorm(x) (gamma/beta with the channel factors folded in) quantized to int8 in one pass."""
        formats.check_bits(a_bits, "a_bits")
        extra = [t for t in (gamma, beta) if t is not None]
        with self._device_scope(x, inv_scale, *extra):
            return kernels.layernorm_quantize(x, gamma, beta, eps, inv_scale, a_bits)

    def int_gemm(self, xq: torch.Tensor, w: torch.Tensor, w_bits: int, k: int, n: int) -> torch.Tensor:
        with self._device_scope(xq, w):
            return kernels.mixed_gemm(xq, self._gpu_weights(w, w_bits, k), w_bits, k, n)

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
        extra = [bias] if bias is not None else []
        with self._device_scope(xq, a_scale, w, w_scale, *extra):
            return kernels.mixed_gemm(
                xq, self._gpu_weights(w, w_bits, k), w_bits, k, n, a_scale, w_scale, bias, out_dtype
            )

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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dynamic per-token quantize + packed_linear in one launch: (out [M, n], a_scale [M]).

        Same scales and bits as ``quantize_dynamic`` then ``packed_linear`` (with the steps times
        ``a_scale_mul`` in the epilogue when given); one kernel instead of two, which is what
        small-M layers pay for. Optional in the Backend protocol.
        """
        formats.check_bits(a_bits, "a_bits")
        extra = [t for t in (bias, a_scale_mul) if t is not None]
        with self._device_scope(x, w, w_scale, *extra):
            return kernels.quantized_linear_dynamic(x, self._gpu_weights(w, w_bits, k), w_bits, a_bits, k, n,
                                                    w_scale, bias, out_dtype, a_scale_mul=a_scale_mul)

    def quantized_qk(
        self, q: torch.Tensor, q_scale: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor, out_dtype: torch.dtype
    ) -> torch.Tensor:
        """Q K^T on int8 tensor cores (mixq.kernels.attention): bit-identical to the reference's attention_qk.

        Optional in the Backend protocol (mixq.ops.quantized_qk probes for it). Checks dtypes, shapes
        (equal leading dims, head dim <= attention.MAX_HEAD_DIM) and devices, raising ValueError.
        """
        with self._device_scope(q, q_scale, k, k_scale):
            return attention_kernels.quantized_qk(q, q_scale, k, k_scale, out_dtype)

    def quantized_pv(
        self, p: torch.Tensor, v: torch.Tensor, v_scale: torch.Tensor, p_bits: int, p_kind: str, out_dtype: torch.dtype
    ) -> torch.Tensor:
        """softmax(.) V from uint8 probability codes on int8 tensor cores (the codes split into int8 buckets,
        combined exactly in int64): bit-identical to the reference's attention_pv. At most
        attention.MAX_PV_TOKENS tokens and a head dim <= attention.MAX_HEAD_DIM; ValueError beyond.
        """
        with self._device_scope(p, v, v_scale):
            return attention_kernels.quantized_pv(p, v, v_scale, p_bits, p_kind, out_dtype)

    def quantize_probs(self, p: torch.Tensor, bits: int, kind: str) -> torch.Tensor:
        """Post-softmax probabilities -> uint8 codes in one elementwise launch (mixq.kernels.attention),
        bit-identical to ``formats.quantize_probs``. Optional in the Backend protocol."""
        with self._device_scope(p):
            return attention_kernels.quantize_probs(p, bits, kind)


register_backend(TritonBackend())
