"""Make the quantized variants an evaluation compares with FP, and say what each one quantized.

Every eval reports FP and quantized side by side; this module builds the quantized copies the same
way for all of them (``mixq.quantize_`` with the adapter's filter and calibration images) and
summarizes each as text ("48 Linears: 48xW8A8").
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

from torch import nn

from mixq.formats import parse_bit_pair
from mixq.models.base import ModelAdapter


@dataclass(frozen=True)
class QuantSpec:
    """A uniform configuration: all of the adapter's Linears at (w_bits, a_bits)."""

    w_bits: int
    a_bits: int

    @property
    def label(self) -> str:
        return f"W{self.w_bits}A{self.a_bits}"


def parse_bits(text: str) -> list[QuantSpec]:
    """'w8a8,w4a8' or '8/8,4/8' -> [QuantSpec(8, 8), QuantSpec(4, 8)]."""
    specs = [QuantSpec(*parse_bit_pair(t)) for t in text.split(",") if t.strip()]
    if not specs:
        raise ValueError("no bit configurations given")
    return specs


def bits_summary(model: nn.Module) -> str:
    """Which Linears run quantized at which bits, e.g. '48 Linears: 24xW4A8, 24xW8A8'."""
    from mixq.modules import quantized_layers
    from mixq.report import choice_counts

    layers = quantized_layers(model)
    counts = choice_counts((m.w_bits, m.a_bits) for m in layers.values())
    return f"{len(layers)} Linears: " + ", ".join(f"{v}x{k}" for k, v in counts.items())


def quantized_copy(adapter: ModelAdapter, fp_model: nn.Module, config: Any, calib_data: Any,
                   simulate: bool = False, backend: Optional[str] = None) -> nn.Module:
    """A deep copy of ``fp_model`` quantized by ``mixq.quantize_`` with the adapter's filter
    (``config``: QuantSpec, QuantConfig or Plan; ``simulate``, ``backend``: for a QuantSpec)."""
    from mixq.config import LinearConfig, QuantConfig
    from mixq.quantize import quantize_

    if isinstance(config, QuantSpec):
        config = QuantConfig(LinearConfig(config.w_bits, config.a_bits), simulate=simulate, backend=backend)
    model = copy.deepcopy(fp_model)
    quantize_(model, config, calib_data, filter_fn=adapter.quant_filter, progress=False)
    return model.eval()
