"""Wall-clock latency of float, mixq and PyTorch-int8 models on the current device."""

from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from . import timing
from .data import run_model


@dataclass
class Latency:
    name: str
    median_ms: float
    min_ms: float
    iters: int
    device: str
    threads: int

    def as_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def measure(
    name: str, fn: Callable[[], Any], device: torch.device | str = "cpu", warmup: int = 2, iters: int = 10,
    min_seconds: float = 0.0,
) -> Latency:
    """``mixq.timing``'s median over ``iters`` rounds (each >= ``min_seconds / iters`` long)."""
    t = timing.time_callable(fn, rounds=iters, min_round_s=min_seconds / max(iters, 1), device=device,
                             warmup=warmup)
    return Latency(name, t.median_ms, t.min_s * 1e3, t.rounds * t.calls_per_round, str(torch.device(device)),
                   torch.get_num_threads())


def torch_int8_dynamic(model: nn.Module, layer_names: list[str]) -> nn.Module:
    """PyTorch's int8 dynamic quantized Linear (fbgemm/x86 on CPU) on the same layers mixq quantizes."""
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(copy.deepcopy(model), {n: default_dynamic_qconfig for n in layer_names},
                                dtype=torch.qint8)


def compare(
    models: dict[str, nn.Module], batch: Any, device: torch.device | str = "cpu", iters: int = 10,
    reference: Optional[str] = None,
) -> list[dict]:
    """Time each model on ``batch``; rows carry the speedup over ``reference`` (default: the first)."""
    rows = []
    for name, model in models.items():
        rows.append(measure(name, lambda m=model: run_model(m, batch), device, iters=iters).as_dict())
    ref_name = reference or next(iter(models))
    ref = next(r["median_ms"] for r in rows if r["name"] == ref_name)
    for r in rows:
        r["speedup"] = ref / r["median_ms"]
    return rows
