"""Bit allocation: choose (w_bits, a_bits) for every Linear by solving a MILP with HiGHS.

The problem (DESIGN.md, "Scores and allocation"): binary ``x[i,c]`` picks candidate ``c`` for layer
``i``; minimize ``sum cost[i,c] x[i,c] + lam * sum_{(l,m) adjacent} S[l,m] * D(c_l, c_m)`` with
``D = (w_l - w_m)^2 + (a_l - a_m)^2`` (the Mix-QSAM synergy term, on both bit-widths), subject to one
choice per layer, a model-size budget, an optional BOPs budget and pinned layers.

Formulation (exact, and tight enough that 200 layers x 9 candidates solve to proven optimality in
well under a second on 2 CPU cores):

* The synergy term depends on a pair of layers only through their weight bits and, separately,
  their activation bits. Per adjacent pair and per bit dimension we aggregate the choices into
  level indicators ``u_l[k] = sum_{c: bits(c) = k} x[l,c]`` (three levels, not nine candidates) and
  add a 3x3 block of continuous "transport" variables ``y[k,k'] >= 0`` with the marginal
  constraints ``sum_k' y[k,k'] = u_l[k]`` and ``sum_k y[k,k'] = u_m[k']`` (the last one is implied
  by one-choice-per-layer and dropped). At integral ``x`` the marginals force ``y`` to be the
  product ``u_l[k] * u_m[k']``, so the linearization is exact; its LP relaxation is the local
  marginal polytope, which is the convex hull of each pair's (choice, penalty) set and is integral
  on a chain without side constraints. That is why HiGHS closes the knapsack-coupled problem in a
  handful of nodes instead of branching over the products. Compared with per-candidate products
  (9x9 = 81 variables per pair) this is 2 x 9 = 18 variables and 10 rows per pair.
* Budget rows are integral: the size row counts bits (``params * w_bits`` plus 32-bit scales and
  fp32 biases where the budget is in bytes), the BOPs row counts ``MACs * w_bits * a_bits``; we
  subtract each layer's cheapest candidate from the row (so coefficients are small and the row is
  well scaled), divide by the common gcd, and verify the returned plan in exact integer arithmetic.
* Pinned layers are fixed through column bounds (presolve removes them).

An infeasible budget raises :class:`InfeasibleBudgetError`, whose message names the smallest
feasible budget (found by a minimum-size or minimum-BOPs solve under the remaining constraints).
"""

from __future__ import annotations

import json
import os
import math
import re
import time
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

BITS = (4, 6, 8)
DEFAULT_CANDIDATES: tuple[tuple[int, int], ...] = tuple((w, a) for w in BITS for a in BITS)
SCALE_BITS = 32  # one fp32 scale per output channel
BIAS_BITS = 32  # biases stay fp32
BITS_PER_WEIGHT_MAX = 32.0  # a number budget above this is read as bytes

Budget = Union[float, int, str]


class InfeasibleBudgetError(ValueError):
    """No allocation meets the budgets; ``smallest`` holds the smallest feasible one (user units)."""

    def __init__(self, message: str, smallest: Optional[float] = None, kind: str = "") -> None:
        super().__init__(message)
        self.smallest = smallest
        self.kind = kind


# ---------------------------------------------------------------------------------------- problem


@dataclass
class AllocationProblem:
    """Numbers in: per-layer sizes, MACs, per-choice costs, adjacent pairs with synergy weights."""

    names: list[str]
    candidates: list[tuple[int, int]]
    costs: np.ndarray  # [L, C] float
    weight_params: list[int]  # weights per layer (out * in)
    out_features: list[int]
    has_bias: list[bool]
    macs: list[int]  # multiply-accumulates per input
    pairs: list[tuple[int, int]] = field(default_factory=list)
    synergy: list[float] = field(default_factory=list)  # S[l, m] >= 0, one per pair
    lam: float = 0.0
    pinned: dict[int, int] = field(default_factory=dict)  # layer index -> candidate index

    def __post_init__(self) -> None:
        L, C = len(self.names), len(self.candidates)
        if L == 0:
            raise ValueError("allocation needs at least one layer")
        if C == 0:
            raise ValueError("allocation needs at least one candidate (w_bits, a_bits)")
        if len(set(self.candidates)) != C:
            raise ValueError(f"candidates must be distinct, got {self.candidates}")
        for w, a in self.candidates:
            if w not in BITS or a not in BITS:
                raise ValueError(f"candidate {(w, a)} not allowed; bits must be in {BITS}")
        self.costs = np.asarray(self.costs, dtype=np.float64)
        if self.costs.shape != (L, C):
            raise ValueError(f"costs must have shape [layers, candidates] = {(L, C)}, got {self.costs.shape}")
        if not np.isfinite(self.costs).all():
            raise ValueError("costs contain NaN or Inf")
        for attr in ("weight_params", "out_features", "has_bias", "macs"):
            if len(getattr(self, attr)) != L:
                raise ValueError(f"{attr} has {len(getattr(self, attr))} entries, expected one per layer ({L})")
        if len(self.synergy) != len(self.pairs):
            raise ValueError(f"synergy needs one weight per pair: {len(self.synergy)} weights, {len(self.pairs)} pairs")
        for (i, j), s in zip(self.pairs, self.synergy):
            if not (0 <= i < L and 0 <= j < L and i != j):
                raise ValueError(f"pair {(i, j)} does not name two distinct layers in 0..{L - 1}")
            if not (s >= 0 and math.isfinite(s)):
                raise ValueError(f"synergy weights must be finite and >= 0, got {s} for pair {(i, j)}")
        if not (self.lam >= 0 and math.isfinite(self.lam)):
            raise ValueError(f"lam must be finite and >= 0, got {self.lam}")
        for i, c in self.pinned.items():
            if not (0 <= i < L and 0 <= c < C):
                raise ValueError(f"pinned entry {i}: {c} is out of range ({L} layers, {C} candidates)")

    # Integer cost tables [L, C] (Python ints inside object arrays would be slow; int64 is ample).
    def weight_bits(self) -> np.ndarray:
        w = np.array([c[0] for c in self.candidates], dtype=np.int64)
        return np.asarray(self.weight_params, dtype=np.int64)[:, None] * w[None, :]

    def size_bits(self) -> np.ndarray:
        extra = np.array(
            [o * SCALE_BITS + (o * BIAS_BITS if b else 0) for o, b in zip(self.out_features, self.has_bias)],
            dtype=np.int64,
        )
        return self.weight_bits() + extra[:, None]

    def bops(self) -> np.ndarray:
        wa = np.array([w * a for w, a in self.candidates], dtype=np.int64)
        return np.asarray(self.macs, dtype=np.int64)[:, None] * wa[None, :]

    def objective(self, choice: Sequence[int]) -> float:
        """The objective of a full assignment, evaluated directly (for checks and brute force)."""
        total = float(sum(self.costs[i, c] for i, c in enumerate(choice)))
        for (l, m), s in zip(self.pairs, self.synergy):
            (wl, al), (wm, am) = self.candidates[choice[l]], self.candidates[choice[m]]
            total += self.lam * s * ((wl - wm) ** 2 + (al - am) ** 2)
        return total


@dataclass
class KnapsackRow:
    """``sum_i table[i, choice_i] <= rhs`` in exact integers; ``label`` names it in messages."""

    label: str
    table: np.ndarray  # [L, C] int64
    rhs: int


@dataclass
class Solution:
    choice: list[int]
    objective: float
    status: str  # "optimal" | "time_limit"
    gap: float
    bound: float
    solve_time_s: float
    nodes: int


def _csc(rows: list[int], cols: list[int], vals: list[float], n_cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r, c, v = np.asarray(rows, np.int32), np.asarray(cols, np.int32), np.asarray(vals, np.float64)
    order = np.lexsort((r, c))
    r, c, v = r[order], c[order], v[order]
    start = np.zeros(n_cols + 1, dtype=np.int32)
    np.add.at(start, c + 1, 1)
    return np.cumsum(start).astype(np.int32), r, v


def solve_milp(
    problem: AllocationProblem,
    rows: Sequence[KnapsackRow],
    objective: Optional[np.ndarray] = None,
    synergy: bool = True,
    time_limit: Optional[float] = None,
) -> Optional[Solution]:
    """Solve the allocation MILP; ``None`` when infeasible. ``objective`` overrides the cost table
    (used for the min-size solves that name the smallest feasible budget)."""
    import highspy

    L, C = len(problem.names), len(problem.candidates)
    costs = problem.costs if objective is None else np.asarray(objective, dtype=np.float64)
    nx = L * C
    col_cost: list[float] = list(costs.reshape(-1))
    col_lower = [0.0] * nx
    col_upper = [1.0] * nx
    for i, c in problem.pinned.items():
        for cc in range(C):
            col_lower[i * C + cc] = col_upper[i * C + cc] = 1.0 if cc == c else 0.0
    ri: list[int] = []
    ci: list[int] = []
    vv: list[float] = []
    row_lower: list[float] = []
    row_upper: list[float] = []

    def add_row(entries: list[tuple[int, float]], lo: float, hi: float) -> None:
        r = len(row_lower)
        for col, val in entries:
            ri.append(r)
            ci.append(col)
            vv.append(val)
        row_lower.append(lo)
        row_upper.append(hi)

    for i in range(L):  # one choice per layer
        add_row([(i * C + c, 1.0) for c in range(C)], 1.0, 1.0)

    offsets: list[int] = []
    for row in rows:
        table = np.asarray(row.table, dtype=np.int64)
        base = table.min(axis=1)
        reduced = table - base[:, None]
        rhs = int(row.rhs) - int(base.sum())
        offsets.append(int(base.sum()))
        if rhs < 0:
            return None
        g = int(np.gcd.reduce(reduced.reshape(-1))) if reduced.any() else 1
        if g == 0:
            g = 1
        if reduced.max() == 0:
            continue  # every choice costs the same here: the row can't bind
        entries = [(i * C + c, float(reduced[i, c] // g)) for i in range(L) for c in range(C) if reduced[i, c]]
        add_row(entries, -highspy.kHighsInf, float(rhs // g))

    n_cols = nx
    import os
    mode = os.environ.get("PAIRMODE", "agg")
    if synergy and problem.lam > 0 and mode == "full":
        for (l, m), s in zip(problem.pairs, problem.synergy):
            weight = problem.lam * s
            if weight <= 0:
                continue
            y0 = n_cols
            n_cols += C * C
            for a, ca in enumerate(problem.candidates):
                for b, cb in enumerate(problem.candidates):
                    col_cost.append(weight * ((ca[0] - cb[0]) ** 2 + (ca[1] - cb[1]) ** 2))
                    col_lower.append(0.0)
                    col_upper.append(highspy.kHighsInf)
            for a in range(C):
                add_row([(y0 + a * C + b, 1.0) for b in range(C)] + [(l * C + a, -1.0)], 0.0, 0.0)
            for b in range(C - 1):
                add_row([(y0 + a * C + b, 1.0) for a in range(C)] + [(m * C + b, -1.0)], 0.0, 0.0)
    elif synergy and problem.lam > 0:
        for dim in (0, 1):
            levels = sorted({cand[dim] for cand in problem.candidates})
            if len(levels) < 2:
                continue
            members = {k: [c for c, cand in enumerate(problem.candidates) if cand[dim] == k] for k in levels}
            K = len(levels)
            for (l, m), s in zip(problem.pairs, problem.synergy):
                weight = problem.lam * s
                if weight <= 0:
                    continue
                y0 = n_cols
                n_cols += K * K
                for a, ka in enumerate(levels):
                    for b, kb in enumerate(levels):
                        col_cost.append(weight * (ka - kb) ** 2)
                        col_lower.append(0.0)
                        col_upper.append(highspy.kHighsInf)
                for a, ka in enumerate(levels):  # sum_b y[a, b] = u_l[a]
                    add_row([(y0 + a * K + b, 1.0) for b in range(K)] + [(l * C + c, -1.0) for c in members[ka]], 0.0, 0.0)
                for b, kb in enumerate(levels[:-1]):  # sum_a y[a, b] = u_m[b] (last one implied)
                    add_row([(y0 + a * K + b, 1.0) for a in range(K)] + [(m * C + c, -1.0) for c in members[kb]], 0.0, 0.0)

    lp = highspy.HighsLp()
    lp.num_col_ = n_cols
    lp.num_row_ = len(row_lower)
    lp.col_cost_ = np.asarray(col_cost, dtype=np.float64)
    lp.col_lower_ = np.asarray(col_lower, dtype=np.float64)
    lp.col_upper_ = np.asarray(col_upper, dtype=np.float64)
    lp.row_lower_ = np.asarray(row_lower, dtype=np.float64)
    lp.row_upper_ = np.asarray(row_upper, dtype=np.float64)
    start, index, value = _csc(ri, ci, vv, n_cols)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = start
    lp.a_matrix_.index_ = index
    lp.a_matrix_.value_ = value
    lp.integrality_ = [highspy.HighsVarType.kInteger] * nx + [highspy.HighsVarType.kContinuous] * (n_cols - nx)

    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("mip_rel_gap", 0.0)
    h.setOptionValue("mip_abs_gap", 1e-9)
    h.setOptionValue("random_seed", 0)
    h.setOptionValue("threads", 1)
    for kv in os.environ.get("HOPTS", "").split(","):
        if kv:
            k, v = kv.split("=")
            h.setOptionValue(k, type(h.getOptionValue(k))(float(v)) if not isinstance(h.getOptionValue(k), str) else v)
    if time_limit is not None:
        if not time_limit > 0:
            raise ValueError(f"time_limit must be > 0 seconds, got {time_limit}")
        h.setOptionValue("time_limit", float(time_limit))
    t0 = time.perf_counter()
    h.passModel(lp)
    h.run()
    elapsed = time.perf_counter() - t0
    status = h.getModelStatus()
    info = h.getInfo()
    MS = highspy.HighsModelStatus
    if status == MS.kInfeasible:
        return None
    if status == MS.kOptimal:
        label = "optimal"
    elif status in (MS.kTimeLimit, MS.kInterrupt) and info.primal_solution_status == highspy.kSolutionStatusFeasible:
        label = "time_limit"
    elif status == MS.kTimeLimit:
        raise TimeoutError(f"HiGHS found no feasible allocation within time_limit={time_limit} s; raise it")
    else:
        raise RuntimeError(f"HiGHS stopped with status {h.modelStatusToString(status)}")
    x = np.asarray(h.getSolution().col_value[:nx]).reshape(L, C)
    choice = [int(v) for v in x.argmax(axis=1)]
    for row in rows:  # exact check; the solver works to a tolerance
        used = int(np.asarray(row.table, dtype=np.int64)[np.arange(L), choice].sum())
        if used > row.rhs:
            raise RuntimeError(f"solver returned a plan over the {row.label} budget ({used} > {row.rhs}); please report")
    return Solution(
        choice=choice,
        objective=problem.objective(choice) if objective is None else float(costs[np.arange(L), choice].sum()),
        status=label,
        gap=float(info.mip_gap) if label != "optimal" else 0.0,
        bound=float(info.mip_dual_bound),
        solve_time_s=elapsed,
        nodes=int(info.mip_node_count),
    )


# ---------------------------------------------------------------------------------------- budgets

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
            if value > 0:
                return SizeBudget("bytes", value)
        raise ValueError(
            f"cannot read size budget {budget!r}; use bits per weight (e.g. 6.0) or bytes with a unit "
            f"(e.g. '12MB', '1.5GiB'; units: {sorted(_UNITS)})"
        )
    raise TypeError(f"budget must be a number or a string like '12MB', got {type(budget).__name__}")


def parse_bops_budget(bops_budget: Union[float, int, str, None], problem: AllocationProblem) -> Optional[int]:
    """Absolute BOPs per input (``3.2e12``, ``"3.2T"``, ``"800G"``), or a fraction of uniform W8A8 as
    ``"0.5x"``. Returns the integer right-hand side, or None."""
    if bops_budget is None:
        return None
    w8a8 = int(np.asarray(problem.macs, dtype=np.int64).sum()) * 64
    if isinstance(bops_budget, (int, float)) and not isinstance(bops_budget, bool):
        if not (bops_budget > 0 and math.isfinite(bops_budget)):
            raise ValueError(f"bops_budget must be positive, got {bops_budget}")
        return math.floor(Fraction(bops_budget))
    if isinstance(bops_budget, str):
        s = bops_budget.strip().lower()
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*x", s)
        if m:
            return math.floor(Fraction(m.group(1)) * w8a8)
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmgt]?)(?:bops)?", s)
        if m:
            return math.floor(Fraction(m.group(1)) * _BOPS_UNITS[m.group(2)])
    raise ValueError(
        f"cannot read bops_budget {bops_budget!r}; use BOPs per input (3.2e12, '800G', '3.2T') "
        "or a fraction of uniform W8A8 ('0.5x')"
    )
