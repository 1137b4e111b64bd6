"""Backend registry: every backend implements the same integer contract (mixq.formats).

A backend is an object with the methods of :class:`Backend`. Backends register themselves
with a priority; :func:`select_backend` picks the highest-priority backend that is available
for a device. ``MIXQ_BACKEND=<name>`` forces one. Callers never import a backend directly:
they go through the ``mixq::*`` custom ops in :mod:`mixq.ops`, passing the backend's name.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Protocol

import torch

log = logging.getLogger("mixq")


class Backend(Protocol):
    name: str
    priority: int

    def available(self, device: torch.device) -> bool:
        """True when this backend can run on ``device`` here (hardware, build, libraries)."""

    def prepack(self, packed: torch.Tensor, w_bits: int, k: int) -> torch.Tensor:
        """Re-layout canonical packed weights [N, row_bytes] into this backend's layout."""

    def quantize_dynamic(self, x: torch.Tensor, a_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x [M, K] float -> (q int8 [M, K], scale fp32 [M]) per the contract."""

    def quantize_static(self, x: torch.Tensor, inv_scale: torch.Tensor, a_bits: int) -> torch.Tensor:
        """x [M, K] float, inv_scale fp32 [K] or [1] -> q int8 [M, K]."""

    def layernorm_quantize(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, inv_scale: torch.Tensor, a_bits: int
    ) -> torch.Tensor:
        """formats.layer_norm_fp32 of x [M, K] (float64 statistics) fused with static quantization -> int8 [M, K].

        Optional: a backend without it falls back to the reference implementation.
        """

    def int_gemm(self, xq: torch.Tensor, w: torch.Tensor, w_bits: int, k: int, n: int) -> torch.Tensor:
        """Exact int32 [M, N] = xq [M, K] @ unpack(w)^T; ``w`` is what this backend's prepack returned."""

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
        """(xq @ W^T) * a_scale[m] * w_scale[n] + bias[n], a_scale [M] or [1]; ``w`` is prepacked."""

    # Optional, probed with getattr by mixq.ops.quantized_qk / quantized_pv (the reference backend's
    # methods run when absent; cpu and triton have both):
    # quantized_qk(q, q_scale, k, k_scale, out_dtype) -> [..., N, M]: int8 Q [..., N, D] times int8
    #     K [..., M, D]^T, exact integer sums, (fp32(acc) * q_scale[i]) * k_scale[j].
    # quantized_pv(p, v, v_scale, p_bits, p_kind, out_dtype) -> [..., N, D]: uint8 probability codes
    #     (formats.quantize_probs) times int8 V [..., M, D] with per-channel steps [..., D].
    # quantize_probs(p, bits, kind) -> uint8 codes of p's shape: formats.quantize_probs (probed by
    #     mixq.ops.quantize_probs; formats runs when absent).
    #
    # Optional, probed with getattr by mixq.ops.quantized_linear_dynamic (composed from the two
    # calls above when absent):
    # quantized_linear_dynamic(x, w, w_scale, bias, w_bits, a_bits, k, n, out_dtype, a_scale_mul=None
    #     [, smooth_inv=None, headroom=False]) -> (out [M, n], a_scale [M]): quantize_dynamic +
    #     packed_linear in one kernel, bit-identical. Optional class attributes: ``fused_headroom``
    #     (the method takes smooth_inv and headroom=True, so mixq.ops hands it the whole layer) and
    #     ``fused_dynamic_any_m`` (QuantLinear calls the op at every M, not only M <= FUSED_DYNAMIC_MAX_M).


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    return backend


def get_backend(name: str) -> Backend:
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown mixq backend {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def available_backends(device: torch.device | str) -> list[str]:
    _load_builtin()
    device = torch.device(device)
    ranked = sorted(_REGISTRY.values(), key=lambda b: -b.priority)
    return [b.name for b in ranked if b.available(device)]


def select_backend(device: torch.device | str) -> str:
    """Fastest available backend for ``device`` (or $MIXQ_BACKEND when set)."""
    forced = os.environ.get("MIXQ_BACKEND")
    if forced:
        b = get_backend(forced)
        if not b.available(torch.device(device)):
            raise RuntimeError(f"MIXQ_BACKEND={forced} is not available on device {device}")
        return forced
    names = available_backends(device)
    return names[0] if names else "reference"


_LOADED = False


def _load_builtin() -> None:
    """Import the built-in backends; each registers itself if its module imports."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from . import reference  # noqa: F401

    for mod in ("cpu", "triton"):
        try:
            __import__(f"{__name__}.{mod}")
        except ImportError as e:  # a backend whose module is absent simply does not register
            log.debug("mixq backend %s not loaded: %s", mod, e)
