"""mixq: mixed-precision post-training quantization for ViT and SAM with packed integer kernels."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names resolved lazily so `import mixq` stays light (no model libraries, no kernels).
_LAZY = {
    "QuantConfig": "mixq.quantize",
    "quantize_": "mixq.quantize",
    "QuantLinear": "mixq.nn",
    "save": "mixq.checkpoint",
    "load": "mixq.checkpoint",
    "allocate": "mixq.alloc",
    "Plan": "mixq.alloc",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mixq' has no attribute {name!r}")


__all__ = sorted(_LAZY)
