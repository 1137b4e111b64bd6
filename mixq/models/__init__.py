"""Model adapters: how mixq builds, quantizes, scores and calibrates each model family.

``get_adapter(spec)`` takes a built-in name (``dinov2-s``, the default) or a ``family:...`` form:

* ``sam-vit-b:/path/sam_vit_b.pth`` (also ``sam-vit-l``, ``sam-vit-h``)
* ``timm:<arch>:/path/checkpoint`` (.pth, .pt or .safetensors)
* ``toy-vit``: a tiny random-weight ViT for smoke tests

Weights always come from a local file the user names, never from a model hub.
"""

from __future__ import annotations

from typing import Any

from .base import ModelAdapter, ModelDescription

DEFAULT_MODEL = "dinov2-s"
TOY_MODEL = "toy-vit"  # tiny random-weight ViT for smoke tests
_SAM_PREFIXES = {"sam-vit-b": "vit_b", "sam-vit-l": "vit_l", "sam-vit-h": "vit_h"}


def list_models() -> list[str]:
    """The spec forms :func:`get_adapter` accepts."""
    return [DEFAULT_MODEL, TOY_MODEL] + [f"{p}:/path/{v.replace('vit', 'sam_vit')}.pth" for p, v in _SAM_PREFIXES.items()] + [
        "timm:<arch>:/path/checkpoint.(pth|pt|safetensors)"
    ]


def get_adapter(spec: str = DEFAULT_MODEL, **kwargs: Any) -> ModelAdapter:
    """The adapter for ``spec``; ``kwargs`` go to its constructor (e.g. ``calib_dir=``)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"model spec must be a non-empty string, got {spec!r}; known: {list_models()}")
    if spec == DEFAULT_MODEL:
        from .dinov2_adapter import Dinov2SaliencyAdapter

        return Dinov2SaliencyAdapter(**kwargs)
    if spec == TOY_MODEL:
        from .toy import ToyVitAdapter

        return ToyVitAdapter(**kwargs)
    family, sep, rest = spec.partition(":")
    if family in _SAM_PREFIXES:
        if not sep or not rest:
            raise ValueError(f"{family} needs a checkpoint path: '{family}:/path/sam_{_SAM_PREFIXES[family]}.pth'")
        from .sam import SamAdapter

        return SamAdapter(_SAM_PREFIXES[family], rest, **kwargs)
    if family == "timm":
        arch, sep2, path = rest.partition(":")
        if not arch or not sep2 or not path:
            raise ValueError(f"timm spec must be 'timm:<arch>:/path/checkpoint', got {spec!r}")
        from .timm_models import TimmAdapter

        return TimmAdapter(arch, path, **kwargs)
    raise ValueError(f"unknown model spec {spec!r}; known: {list_models()}")


__all__ = ["DEFAULT_MODEL", "ModelAdapter", "ModelDescription", "get_adapter", "list_models"]
