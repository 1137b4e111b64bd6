"""Backend registry: every backend implements the same integer contract (mixq.formats).

The reference backend (:class:`mixq.backends.reference.ReferenceBackend`) is the base class of every
backend, so each operation has a default and a backend overrides only what it runs faster.
Backends register themselves with a priority; :func:`select_backend` picks the highest-priority one
available for a device. ``MIXQ_BACKEND=<name>`` forces one. Callers go through the ``mixq::*`` custom
ops in :mod:`mixq.ops`, passing the backend's name.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from .reference import ReferenceBackend as Backend

log = logging.getLogger("mixq")


@dataclass(frozen=True)
class PackedWeight:
    """A quantized Linear's weights as one backend runs them.

    ``codes`` is what ``layout``'s ``prepack`` returned for the canonical packed rows (the reference
    layout is the canonical one); ``scale`` holds one fp32 step per output channel; ``smooth_inv``
    (fp32 [in_features], smooth mode only) multiplies the input before the dynamic per-token rule.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    bias: Optional[torch.Tensor]
    bits: int
    in_features: int
    out_features: int
    layout: str
    smooth_inv: Optional[torch.Tensor] = None

    def with_bias(self, bias: Optional[torch.Tensor]) -> "PackedWeight":
        return dataclasses.replace(self, bias=bias)


_REGISTRY: dict[str, "Backend"] = {}


def register_backend(backend: "Backend") -> "Backend":
    _REGISTRY[backend.name] = backend
    return backend


def get_backend(name: str) -> "Backend":
    _load_builtin()
    b = _REGISTRY.get(name)
    if b is None:
        raise ValueError(f"unknown mixq backend {name!r}; registered: {sorted(_REGISTRY)}")
    return b


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
