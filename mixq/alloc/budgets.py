"""Size and BOPs budgets: what a user writes ("6.0", "12MB", "0.5x") to exact integer knapsack rows."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional, Union

import numpy as np

from .problem import BITS_PER_WEIGHT_MAX, AllocationProblem, Budget, KnapsackRow


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
