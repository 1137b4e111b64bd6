"""Module surgery shared by quantize, load, scoring and the model adapters: find a model's Linears,
replace a submodule by its qualified name, list the quantized layers."""

from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from .nn import QuantLinear

FilterFn = Callable[[str, nn.Module], bool]


def find_linears(model: nn.Module, filter_fn: Optional[FilterFn] = None) -> dict[str, nn.Linear]:
    """The model's float ``nn.Linear`` modules (by qualified name) that ``filter_fn`` accepts."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and (filter_fn is None or filter_fn(name, m))
    }


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the qualified ``name`` ("blocks.0.mlp.fc1") of ``model``."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """The model's QuantLinear modules by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
