"""Size, BOPs and latency budgets: what a user writes ("6.0", "12MB", "0.5x", "45ms") to exact integer
knapsack rows."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional, Union

import numpy as np

from .problem import BITS_PER_WEIGHT_MAX, AllocationProblem, Budget, KnapsackRow, LayerLatency


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_BOPS_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


@dataclass(frozen=True)
class SizeBudget:
    """A size budget: ``kind`` is "bits_per_weight" (weight bits only, averaged over weights: the
    field's "average bit-width") or "bytes" (everything stored: weights, scales, biases)."""

    kind: str
    value: float

    def row(self, problem: AllocationProblem) -> KnapsackRow:
        if self.kind == "bits_per_weight":
            total = sum(problem.weight_params)
            return KnapsackRow("size", problem.weight_bits(), math.floor(Fraction(self.value) * total))
        return KnapsackRow("size", problem.size_bits(), math.floor(Fraction(self.value) * 8))

    def describe(self) -> str:
        return f"{self.value:g} bits/weight" if self.kind == "bits_per_weight" else f"{self.value:,.0f} bytes"


def parse_size_budget(budget: Budget) -> SizeBudget:
    """``6.0`` (a number <= 32) is average bits per weight; a larger number is bytes; a string takes
    a unit: ``"12MB"``, ``"1.5 GiB"``, ``"300kB"``, ``"5e6B"`` (kB/MB/GB decimal, KiB/MiB/GiB binary)."""
    if isinstance(budget, bool):
        raise TypeError("budget must be a number or a string like '12MB', got a bool")
    if isinstance(budget, (int, float)):
        if not (budget > 0 and math.isfinite(budget)):
            raise ValueError(f"budget must be a positive number, got {budget}")
        if budget <= BITS_PER_WEIGHT_MAX:
            return SizeBudget("bits_per_weight", float(budget))
        return SizeBudget("bytes", float(budget))
    if isinstance(budget, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]+)\s*", budget)
        if m and m.group(2).lower() in _UNITS:
            value = float(m.group(1)) * _UNITS[m.group(2).lower()]
            if 0 < value < math.inf:
                return SizeBudget("bytes", value)
        raise ValueError(
            f"cannot read size budget {budget!r}; use bits per weight (e.g. 6.0) or a finite, positive size "
            f"with a unit (e.g. '12MB', '1.5GiB'; units: {sorted(_UNITS)})"
        )
    raise TypeError(f"budget must be a number or a string like '12MB', got {type(budget).__name__}")


def _bops_spec(bops_budget: Union[float, int, str]) -> tuple[Fraction, bool]:
    """(value, is_fraction_of_w8a8) of a BOPs budget, or ValueError naming the allowed forms."""
    if isinstance(bops_budget, (int, float)) and not isinstance(bops_budget, bool):
        if not (bops_budget > 0 and math.isfinite(bops_budget)):
            raise ValueError(f"bops_budget must be a finite, positive number, got {bops_budget}")
        return Fraction(bops_budget), False
    if isinstance(bops_budget, str):
        s = bops_budget.strip().lower()
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(x|[kmgt]?(?:bops)?)", s)
        if m and math.isfinite(float(m.group(1))) and float(m.group(1)) > 0:
            unit = m.group(2)
            if unit == "x":
                return Fraction(m.group(1)), True
            return Fraction(m.group(1)) * _BOPS_UNITS[unit.removesuffix("bops")], False
    raise ValueError(
        f"cannot read bops_budget {bops_budget!r}; use a finite, positive number of BOPs per input (3.2e12, "
        "'800G', '3.2T') or a fraction of uniform W8A8 ('0.5x')"
    )


def check_bops_budget(bops_budget: Union[float, int, str, None]) -> None:
    """Raise ValueError now, before any scoring, if ``bops_budget`` cannot be read."""
    if bops_budget is not None:
        _bops_spec(bops_budget)


def parse_bops_budget(bops_budget: Union[float, int, str, None], problem: AllocationProblem) -> Optional[int]:
    """Absolute BOPs per input (``3.2e12``, ``"3.2T"``, ``"800G"``), or a fraction of uniform W8A8 as
    ``"0.5x"``: of every layer of the problem at 8 x 8 bits, so with attention matmuls among the layers
    (``allocate(attention=True)``) the reference is the Linears at W8A8 plus the matmuls at Q8K8 and
    P8V8. Returns the integer right-hand side, or None."""
    if bops_budget is None:
        return None
    value, relative = _bops_spec(bops_budget)
    if relative:
        value *= int(np.asarray(problem.macs, dtype=np.int64).sum()) * 64
    return math.floor(value)


_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}
_LATENCY_RELATIVE = {"x": "fp32", "xfp32": "fp32", "xw8a8": "w8a8"}


@dataclass(frozen=True)
class LatencyBudget:
    """A latency budget. ``kind`` "seconds": the predicted end-to-end time of one inference call
    (``value`` seconds: the planned layers plus the measured constant); "fp32" / "w8a8": the planned
    layers' summed time at most ``value`` times their fp32 / uniform-W8A8 sum (the constant adds
    nothing a plan can change, so a fraction is of the layers alone)."""

    kind: str
    value: float
    text: str

    def layer_seconds(self, latency: LayerLatency) -> float:
        """The planned layers' allowed total in seconds (negative: not even zero-time layers fit)."""
        if self.kind == "fp32":
            return self.value * float(latency.fp32.sum())
        if self.kind == "w8a8":
            return self.value * float(latency.w8a8.sum())
        return self.value - latency.other_s

    def end_to_end_seconds(self, latency: LayerLatency) -> float:
        return self.layer_seconds(latency) + latency.other_s

    def row(self, latency: LayerLatency) -> KnapsackRow:
        return KnapsackRow("latency", latency.nanoseconds(), math.floor(self.layer_seconds(latency) * 1e9))

    def describe(self) -> str:
        if self.kind == "seconds":
            return f"{self.value * 1e3:g} ms end to end"
        return f"{self.value:g}x the {'fp32' if self.kind == 'fp32' else 'uniform W8A8'} Linears' time"


def parse_latency_budget(budget: Union[str, float, None]) -> Optional[LatencyBudget]:
    """``"45ms"`` / ``"0.045s"`` / ``"45000us"``: predicted end-to-end time of one inference call;
    ``"0.6x"``: the planned Linears at most 0.6 x their fp32 time; ``"0.8xw8a8"``: at most 0.8 x their
    uniform-W8A8 time. None: no latency budget."""
    if budget is None:
        return None
    if isinstance(budget, str):
        s = budget.strip().lower().replace(" ", "").replace("x-", "x")
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)(x|xfp32|xw8a8|s|ms|us|µs)", s)
        if m and math.isfinite(float(m.group(1))) and float(m.group(1)) > 0:
            value, unit = float(m.group(1)), m.group(2)
            if unit in _LATENCY_RELATIVE:
                return LatencyBudget(_LATENCY_RELATIVE[unit], value, budget.strip())
            return LatencyBudget("seconds", value * _TIME_UNITS[unit], budget.strip())
    raise ValueError(
        f"cannot read latency budget {budget!r}; use a time with a unit ('45ms', '0.05s', '800us': predicted "
        "end-to-end time of one inference call) or a fraction of the Linears' measured time: '0.6x' (of fp32) "
        "or '0.8xw8a8' (of uniform W8A8)"
    )
