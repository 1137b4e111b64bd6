"""The allocation MILP: integer budget rows, the exact linearization of the synergy products, and the
HiGHS run (step 5 of the package docstring), after the chain presolve where the pairs form a chain."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from .chain import _is_chain, _pair_penalty
from .chain import chain_presolve as _chain_presolve
from .problem import AllocationProblem, KnapsackRow, Solution


def _quiet_highs(highspy: Any) -> Any:
    """A ``Highs`` instance without the banner its constructor prints to stdout (fd 1)."""

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            return highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _csc(rows: list[int], cols: list[int], vals: list[float], n_cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r, c, v = np.asarray(rows, np.int32), np.asarray(cols, np.int32), np.asarray(vals, np.float64)
    order = np.lexsort((r, c))
    r, c, v = r[order], c[order], v[order]
    start = np.zeros(n_cols + 1, dtype=np.int64)
    np.add.at(start, c.astype(np.int64) + 1, 1)
    return np.cumsum(start).astype(np.int32), r, v


@dataclass
class _Model:
    """The reduced MILP handed to HiGHS, and how its columns map back to (layer, candidate)."""

    lp: Any
    cols: list[np.ndarray]  # per layer, the candidates left after fixing
    col_of: dict[tuple[int, int], int]  # (layer, candidate) -> x column
    n_x: int  # x columns first, then the product columns y
    y_blocks: list[tuple[int, int, int, list[tuple[int, int]]]]  # (l, m, first column, (a, b) per column)


def solve_milp(
    problem: AllocationProblem,
    rows: Sequence[KnapsackRow],
    objective: Optional[np.ndarray] = None,
    synergy: bool = True,
    time_limit: Optional[float] = None,
    n_starts: int = 2,
    rounds: int = 1,
    chain_presolve: bool = True,
) -> Optional[Solution]:
    """Solve the allocation MILP to proven optimality; ``None`` when infeasible.

    ``objective`` overrides the cost table (the min-size solves that name the smallest feasible
    budget). On a chain, the dynamic-programming presolve of the package docstring (bounds,
    incumbent, fixing by min-marginals) runs first; ``chain_presolve=False`` hands the full model
    to HiGHS (the reference the tests compare against). ``n_starts`` incumbents are improved by
    local search; ``rounds`` > 1 searches again after fixing.
    """
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be > 0 seconds, got {time_limit}")
    t0 = time.perf_counter()
    L, C = len(problem.names), len(problem.candidates)
    unary = problem.costs if objective is None else np.asarray(objective, dtype=np.float64)
    allowed = problem.allowed_mask()
    for i, c in problem.pinned.items():
        allowed[i] = False
        allowed[i, c] = True
    int_rows = _integer_rows(rows, allowed)
    if int_rows is None:
        return None
    res = np.stack([r.astype(np.float64) / max(b, 1) for r, b in int_rows]) if int_rows else np.zeros((0, L, C))
    pen = _pair_penalty(problem)
    weights: dict[tuple[int, int], float] = {}
    if synergy and problem.lam > 0:
        for (l, m), s in zip(problem.pairs, problem.synergy):
            if s > 0:
                weights[(l, m)] = weights.get((l, m), 0.0) + problem.lam * s

    def feasible(choice: np.ndarray) -> bool:
        return all(int(r[np.arange(L), choice].sum()) <= b for r, b in int_rows)

    def objective_of(choice: np.ndarray) -> float:
        total = float(unary[np.arange(L), choice].sum())
        for (l, m), w in weights.items():
            total += w * pen[choice[l], choice[m]]
        return total

    incumbent: Optional[np.ndarray] = None
    if chain_presolve and (_is_chain(problem) or not weights):
        incumbent = _chain_presolve(problem, unary, res, int_rows, allowed, weights, pen, feasible, objective_of,
                                    n_starts, rounds)
    model = _build_model(unary, allowed, int_rows, weights, pen)
    remaining = None if time_limit is None else max(float(time_limit) - (time.perf_counter() - t0), 1e-3)
    found = _run_highs(model, incumbent, remaining, time_limit)
    if found is None:
        return None
    choice, label, gap, bound, nodes = found
    for row in rows:  # exact check; the solver works to a tolerance
        used = int(np.asarray(row.table, dtype=np.int64)[np.arange(L), choice].sum())
        if used > row.rhs:
            raise RuntimeError(f"solver returned a plan over the {row.label} budget ({used} > {row.rhs}); please report")
    return Solution(choice=choice, objective=objective_of(np.asarray(choice)), status=label, gap=gap, bound=bound,
                    solve_time_s=time.perf_counter() - t0, nodes=nodes)


def _integer_rows(rows: Sequence[KnapsackRow], allowed: np.ndarray) -> Optional[list[tuple[np.ndarray, int]]]:
    """Budget rows as exact integers, each reduced by every layer's cheapest allowed choice; rows that
    cannot bind are dropped and choices that alone exceed a row are disallowed (``allowed`` shrinks in
    place). None when a row cannot be met at all."""
    int_rows: list[tuple[np.ndarray, int]] = []
    for row in rows:
        table = np.asarray(row.table, dtype=np.int64)
        base = np.where(allowed, table, np.iinfo(np.int64).max).min(axis=1)
        reduced = table - base[:, None]
        rhs = int(row.rhs) - int(base.sum())
        if rhs < 0:
            return None
        allowed &= reduced <= rhs
        if (np.where(allowed, reduced, 0) == 0).all():
            continue  # cannot bind
        int_rows.append((reduced, rhs))
    return int_rows


def _build_model(unary: np.ndarray, allowed: np.ndarray, int_rows: list[tuple[np.ndarray, int]],
                 weights: dict[tuple[int, int], float], pen: np.ndarray) -> _Model:
    """The linearized MILP over the choices still allowed: one-hot rows, budget rows divided by their
    gcd, and product variables with both marginals for each synergy pair."""
    import highspy

    L = unary.shape[0]
    cols = [np.flatnonzero(allowed[i]) for i in range(L)]
    col_of = {}
    col_cost: list[float] = []
    for i in range(L):
        for c in cols[i]:
            col_of[(i, int(c))] = len(col_cost)
            col_cost.append(float(unary[i, c]))
    nx = len(col_cost)
    col_upper = [1.0] * nx
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

    for i in range(L):
        add_row([(col_of[(i, int(c))], 1.0) for c in cols[i]], 1.0, 1.0)
    for reduced, rhs in int_rows:
        g = int(np.gcd.reduce(reduced[allowed])) or 1
        entries = [(col_of[(i, int(c))], float(reduced[i, c] // g)) for i in range(L) for c in cols[i] if reduced[i, c]]
        if entries:
            add_row(entries, -highspy.kHighsInf, float(rhs // g))
    y_blocks = []
    for (l, m), w in weights.items():
        # product variables y[a, b] = x[l, a] * x[m, b] with both marginals (the last one implied)
        pairs_ab = [(a, b) for a in cols[l] for b in cols[m]]
        y0 = len(col_cost)
        for a, b in pairs_ab:
            col_cost.append(w * pen[a, b])
            col_upper.append(highspy.kHighsInf)
        y_blocks.append((l, m, y0, pairs_ab))
        nb = len(cols[m])
        for ia, a in enumerate(cols[l]):
            add_row([(y0 + ia * nb + ib, 1.0) for ib in range(nb)] + [(col_of[(l, int(a))], -1.0)], 0.0, 0.0)
        for ib, b in enumerate(cols[m][:-1]):
            add_row([(y0 + ia * nb + ib, 1.0) for ia in range(len(cols[l]))] + [(col_of[(m, int(b))], -1.0)], 0.0, 0.0)

    n_cols = len(col_cost)
    lp = highspy.HighsLp()
    lp.num_col_ = n_cols
    lp.num_row_ = len(row_lower)
    lp.col_cost_ = np.asarray(col_cost, dtype=np.float64)
    lp.col_lower_ = np.zeros(n_cols)
    lp.col_upper_ = np.asarray(col_upper, dtype=np.float64)
    lp.row_lower_ = np.asarray(row_lower, dtype=np.float64)
    lp.row_upper_ = np.asarray(row_upper, dtype=np.float64)
    start, index, value = _csc(ri, ci, vv, n_cols)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = start
    lp.a_matrix_.index_ = index
    lp.a_matrix_.value_ = value
    lp.integrality_ = [highspy.HighsVarType.kInteger] * nx + [highspy.HighsVarType.kContinuous] * (n_cols - nx)
    return _Model(lp, cols, col_of, nx, y_blocks)


def _run_highs(model: _Model, incumbent: Optional[np.ndarray], time_limit: Optional[float],
               asked_limit: Optional[float]) -> Optional[tuple[list[int], str, float, float, int]]:
    """Run HiGHS to a zero gap, warm-started from ``incumbent``: (choice, status, gap, bound, nodes),
    or None when infeasible."""
    import highspy

    lp, cols, col_of = model.lp, model.cols, model.col_of
    L, n_cols = len(cols), lp.num_col_
    h = _quiet_highs(highspy)
    h.setOptionValue("output_flag", False)
    h.setOptionValue("mip_rel_gap", 0.0)
    h.setOptionValue("mip_abs_gap", 1e-9)
    h.setOptionValue("random_seed", 0)
    h.setOptionValue("threads", 1)
    if time_limit is not None:
        h.setOptionValue("time_limit", time_limit)
    h.passModel(lp)
    if incumbent is not None:
        start_x = np.zeros(n_cols)
        for i in range(L):
            start_x[col_of[(i, int(incumbent[i]))]] = 1.0
        for l, m, y0, pairs_ab in model.y_blocks:
            for k, (a, b) in enumerate(pairs_ab):
                if a == incumbent[l] and b == incumbent[m]:
                    start_x[y0 + k] = 1.0
        sol = highspy.HighsSolution()
        sol.col_value = list(start_x)
        sol.value_valid = True
        h.setSolution(sol)
    h.run()
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
        raise TimeoutError(f"HiGHS found no feasible allocation within time_limit={asked_limit} s; raise it")
    else:
        raise RuntimeError(f"HiGHS stopped with status {h.modelStatusToString(status)}")
    x = np.asarray(h.getSolution().col_value[: model.n_x])
    choice = [int(cols[i][np.argmax([x[col_of[(i, int(c))]] for c in cols[i]])]) for i in range(L)]
    gap = float(info.mip_gap) if label != "optimal" else 0.0
    return choice, label, gap, float(info.mip_dual_bound), int(info.mip_node_count)
