"""Layer inventory: every quantizable Linear with its size, measured MACs and execution order.

MACs come from forward hooks on the calibration data, so token counts are the real ones (SAM's
windowed blocks, pruned tokens). Execution order gives the chain of neighbours for synergy.

With ``attention=True`` the two matmuls of every supported attention module are layers too, named
``<module>.qk`` (QK^T) and ``<module>.pv`` (softmax.V): no weights, MACs = heads * N * M * D per
image (counted inside the module on the same pass, :func:`mixq.scores.attention.counting_attention`),
placed in the chain between the module's input projection and its output projection (the last
Linear it runs).
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
    op: str = "linear"  # or "qk" / "pv": an attention matmul (weight_params 0)


def _batch_size(batch: Any) -> int:
    """Samples in a batch: the leading dim of its first tensor that has one."""
    return next((int(t.shape[0]) for t in tensors_in(batch) if t.dim() > 0), 1)


def build_inventory(model: nn.Module, calib_data: Any, filter_fn: Optional[Callable[[str, nn.Module], bool]] = None,
                    batch_size: int = 8, attention: bool = False) -> list[LayerInfo]:
    """Run the calibration data once and list the Linears that ran, in execution order; with
    ``attention=True`` also the QK^T and softmax.V matmuls of the supported attention modules
    (:func:`mixq.scores.attention.attention_modules`: those with a Linear ``filter_fn`` accepts)."""
    from .attention import attention_modules, counting_attention

    linears = find_linears(model, filter_fn)
    if not linears:
        raise ValueError("the model has no nn.Linear layers to allocate bits to (after filter_fn)")
    attn = attention_modules(model, filter_fn) if attention else {}
    rows = {name: 0 for name in linears}
    order: dict[str, int] = {}
    events: list[tuple[str, str]] = []  # first calls: ("linear" | "enter" | "exit", name)

    def hook(name: str):
        def fn(mod: nn.Module, args: tuple) -> None:
            x = args[0]
            rows[name] += x.numel() // x.shape[-1]
            if name not in order:
                order[name] = len(order)
                events.append(("linear", name))
        return fn

    def mark(kind: str, name: str):
        def fn(mod: nn.Module, *args: Any) -> None:
            if (kind, name) not in events:
                events.append((kind, name))
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    samples = 0
    try:
        with counting_attention(model, attn) as (wrappers, attn_macs), torch.no_grad():
            for n, w in wrappers.items():
                handles += [w.register_forward_pre_hook(mark("enter", n)), w.register_forward_hook(mark("exit", n))]
            for batch in iter_batches(calib_data, batch_size):
                samples += _batch_size(batch)
                run_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    per = max(samples, 1)
    info = {
        n: LayerInfo(n, linears[n].in_features, linears[n].out_features, linears[n].bias is not None,
                     linears[n].in_features * linears[n].out_features,
                     round(rows[n] * linears[n].in_features * linears[n].out_features / per), 0)
        for n in order
    }
    for n in attn:
        for op in ("qk", "pv"):
            info[f"{n}.{op}"] = LayerInfo(f"{n}.{op}", 0, 0, False, 0, round(attn_macs[f"{n}.{op}"] / per), 0, op)
    sequence = _execution_order(events)
    for k, name in enumerate(sequence):
        info[name].order = k
    return [info[n] for n in sequence]


def _execution_order(events: list[tuple[str, str]]) -> list[str]:
    """Layer names in execution order from first-call events: an attention module's two matmuls go
    before the last Linear it runs (its output projection), or at its end when it runs fewer than two."""
    sequence: list[str] = []
    open_spans: list[tuple[str, int]] = []  # (attention module, position of its first inner layer)
    for kind, name in events:
        if kind == "linear":
            sequence.append(name)
        elif kind == "enter":
            open_spans.append((name, len(sequence)))
        elif open_spans and open_spans[-1][0] == name:
            _, start = open_spans.pop()
            inner = len(sequence) - start
            at = len(sequence) - 1 if inner >= 2 else len(sequence)
            sequence[at:at] = [f"{name}.qk", f"{name}.pv"]
    for name, start in open_spans:  # never returned (an exception inside): still listed, at the end
        sequence += [f"{name}.qk", f"{name}.pv"]
    return sequence


def adjacent_pairs(layers: list[LayerInfo]) -> list[tuple[int, int]]:
    """Neighbours in execution order: (0, 1), (1, 2), ... (indices into ``layers``)."""
    return [(i, i + 1) for i in range(len(layers) - 1)]
