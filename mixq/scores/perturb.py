"""Temporary one-layer perturbations (quantize or ablate a Linear), always restored."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class _Zero(nn.Module):
    """A Linear's stand-in that outputs zeros of the right shape (the causal-MI ablation)."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


@contextlib.contextmanager
def perturbed(model: nn.Module, name: str, w_bits: int = 4, a_bits: int = 4, mode: str = "quantize") -> Iterator[None]:
    """Within the block, layer ``name`` is fake-quantized to (w_bits, a_bits) with dynamic per-token
    activation scales ("quantize"), or outputs zeros ("ablate"); the float layer comes back after."""
    from ..nn import QuantLinear

    original = model.get_submodule(name)
    if mode == "quantize":
        replacement: nn.Module = QuantLinear.from_float(original, w_bits, a_bits, act_quant="dynamic", simulate=True)
    elif mode == "ablate":
        replacement = _Zero(original.out_features)
    else:
        raise ValueError(f"unknown perturbation mode {mode!r}; allowed: 'quantize', 'ablate'")
    _set(model, name, replacement)
    try:
        yield
    finally:
        _set(model, name, original)
