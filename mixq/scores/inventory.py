"""Layer inventory: every quantizable Linear with its size, measured MACs and execution order.

MACs come from forward hooks on the calibration data, so token counts are the real ones (SAM's
windowed blocks, pruned tokens). Execution order gives the chain of neighbours for synergy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..data import iter_batches, run_model, tensors_in
from ..modules import find_linears


@dataclass
class LayerInfo:
    name: str
    in_features: int
    out_features: int
    bias: bool
    weight_params: int
    macs: int  # multiply-accumulates per input sample, measured
    order: int  # position in execution order (first call)


def _batch_size(batch: Any) -> int:
    """Samples in a batch: the leading dim of its first tensor that has one."""
    return next((int(t.shape[0]) for t in tensors_in(batch) if t.dim() > 0), 1)


def build_inventory(model: nn.Module, calib_data: Any, filter_fn: Optional[Callable[[str, nn.Module], bool]] = None,
                    batch_size: int = 8) -> list[LayerInfo]:
    """Run the calibration data once and list the Linears that ran, in execution order."""

    linears = find_linears(model, filter_fn)
    if not linears:
        raise ValueError("the model has no nn.Linear layers to allocate bits to (after filter_fn)")
    rows = {name: 0 for name in linears}
    order: dict[str, int] = {}

    def hook(name: str):
        def fn(mod: nn.Module, args: tuple) -> None:
            x = args[0]
            rows[name] += x.numel() // x.shape[-1]
            order.setdefault(name, len(order))
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    samples = 0
    try:
        with torch.no_grad():
            for batch in iter_batches(calib_data, batch_size):
                samples += _batch_size(batch)
                run_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    ran = sorted(order, key=order.get)
    return [
        LayerInfo(n, linears[n].in_features, linears[n].out_features, linears[n].bias is not None,
                  linears[n].in_features * linears[n].out_features,
                  round(rows[n] * linears[n].in_features * linears[n].out_features / max(samples, 1)), order[n])
        for n in ran
    ]


def adjacent_pairs(layers: list[LayerInfo]) -> list[tuple[int, int]]:
    """Neighbours in execution order: (0, 1), (1, 2), ... (indices into ``layers``)."""
    return [(i, i + 1) for i in range(len(layers) - 1)]
