"""mixq: mixed-precision post-training quantization for ViT and SAM with packed integer kernels."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names resolved lazily so `import mixq` stays light (no model libraries, no kernels).
_LAZY = {
    "QuantConfig": "mixq.config",
    "LinearConfig": "mixq.config",
    "AttentionConfig": "mixq.config",
    "CalibrationConfig": "mixq.config",
    "RotationConfig": "mixq.config",
    "quantize_": "mixq.quantize",
    "QuantLinear": "mixq.nn",
    "save": "mixq.checkpoint",
    "load": "mixq.checkpoint",
    "allocate": "mixq.alloc",
    "Plan": "mixq.alloc",
}


# Submodules reachable as attributes after a bare `import mixq` (mixq.nn.QuantLinear), loaded on first use.
_SUBMODULES = ("alloc", "checkpoint", "config", "formats", "nn", "ops", "quantize", "scores", "models", "eval", "report")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"mixq.{name}")
    raise AttributeError(f"module 'mixq' has no attribute {name!r}")


__all__ = sorted(_LAZY)
