"""Temporary one-layer perturbations (quantize or ablate a Linear), always restored."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

from ..data import run_model
from ..modules import set_module
from ..nn import QuantLinear


class _Zero(nn.Module):
    """A Linear's stand-in that outputs zeros of the right shape (the causal-MI ablation)."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


@torch.no_grad()
def input_amax(model: nn.Module, batches: list, names: list[str]) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| of each named Linear over the batches: what smooth mode calibrates on."""
    amax: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(mod: nn.Module, args: tuple) -> None:
            m = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float().cpu()
            amax[name] = m if name not in amax else torch.maximum(amax[name], m)
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        for b in batches:
            run_model(model, b)
    finally:
        for h in handles:
            h.remove()
    return amax


@contextlib.contextmanager
def perturbed(model: nn.Module, name: str, w_bits: int = 4, a_bits: int = 4, mode: str = "quantize",
              act_amax: Optional[torch.Tensor] = None) -> Iterator[None]:
    """Within the block, layer ``name`` is fake-quantized to (w_bits, a_bits) ("quantize"), or outputs
    zeros ("ablate"); the float layer comes back after. Activations use smooth mode (mixq's default)
    when the layer's input ``act_amax`` is given, else dynamic per-token scales."""
    original = model.get_submodule(name)
    if mode == "quantize":
        act = "dynamic" if act_amax is None else "smooth"
        samples = None if act_amax is None else act_amax.reshape(1, -1)
        replacement: nn.Module = QuantLinear.from_float(original, w_bits, a_bits, act_quant=act, act_samples=samples,
                                                        simulate=True)
    elif mode == "ablate":
        replacement = _Zero(original.out_features)
    else:
        raise ValueError(f"unknown perturbation mode {mode!r}; allowed: 'quantize', 'ablate'")
    set_module(model, name, replacement)
    try:
        yield
    finally:
        set_module(model, name, original)
