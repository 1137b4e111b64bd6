"""Bit allocation: choose (w_bits, a_bits) for every Linear by solving a MILP with HiGHS.

The problem (DESIGN.md, "Scores and allocation"): binary ``x[i,c]`` picks candidate ``c`` for layer
``i``; minimize ``sum cost[i,c] x[i,c] + lam * sum_{(l,m) adjacent} S[l,m] * D(c_l, c_m)`` with
``D = (w_l - w_m)^2 + (a_l - a_m)^2`` (the Mix-QSAM synergy term, on both bit-widths), subject to one
choice per layer, a model-size budget, an optional BOPs budget and pinned layers.

Formulation (exact). ``x[i,c]`` binary, one-hot per layer (pinned layers fixed by bounds). For each
adjacent pair with S > 0, continuous product variables ``y[a,b] = x[l,a] x[m,b]`` with both
marginal constraints (``sum_b y[a,b] = x[l,a]``, ``sum_a y[a,b] = x[m,b]``, the last one implied and
dropped) and cost ``lam S D(a,b)``. At integral x the marginals force y to the product, so the
linearization is exact; its LP relaxation is the local marginal polytope, which on a chain is the
flow polytope of a layered shortest-path graph (integral without the budget rows), so the only
LP gap comes from the two knapsack rows. Budget rows are exact integers (``params * w_bits``, plus
32-bit scales and fp32 biases for a byte budget; ``MACs * w_bits * a_bits``), reduced by each
layer's cheapest choice and divided by their gcd; the plan is re-verified in integer arithmetic.

Exploiting the chain (what makes 200 layers x 9 candidates solve in well under a second):

1. Lagrangian dual by dynamic programming: with the budget rows priced by multipliers ``mu``, the
   problem is a shortest path through the layers, solved exactly by a forward/backward pass
   (batched over many ``mu`` at once). A coarse grid plus coordinate ascent finds ``mu``; the
   bound equals the LP bound.
2. A stronger bound: the most binding budget kept exactly as a DP state (integer units after the
   gcd; rounded *down* when large, which relaxes it, so the bound stays valid), the other priced.
   Its best path is usually optimal, and its forward/backward min-marginals bound every
   (layer, candidate) choice.
3. Incumbent: the DP paths, repaired to feasibility and improved by local search over runs of
   layers (synergy glues neighbours, so moves rewrite whole runs: "become c", "set w to k",
   "set a to k"; pairs of runs, one spending and one freeing budget).
4. Variable fixing: every (layer, candidate) whose min-marginal bound exceeds the incumbent is
   removed (weak duality, so the optimum is kept; checked against the plain MILP in tests).
5. HiGHS solves the reduced MILP to a zero gap (``mip_rel_gap = 0``), warm-started from the
   incumbent; it is the certificate of optimality, and the whole solve when the pairs are not a
   chain.

An infeasible budget raises :class:`InfeasibleBudgetError`, whose message names the smallest
feasible budget (found by a minimum-size or minimum-BOPs solve under the remaining constraints).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import sys
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


class _Chain:
    """Lagrangian dynamic programming over the layer chain (knapsack rows priced by multipliers).

    With the budget rows moved into the objective, the problem is a shortest path through the
    layers (states = candidates, edge costs = synergy), solved exactly by a forward/backward pass.
    That gives, for any multipliers ``mu >= 0``: a lower bound on the MILP optimum, a path (a
    primal guess) and min-marginals ``M[i, c]`` = the bound with layer ``i`` forced to ``c``.
    Batched over many multiplier pairs at once so a grid search costs a few numpy passes.
    """

    def __init__(self, unary: np.ndarray, pair: list[Optional[np.ndarray]], res: np.ndarray, allowed: np.ndarray) -> None:
        self.unary = unary  # [L, C] objective costs
        self.pair = pair  # pair[i]: [C, C] penalty between layer i and i+1, or None
        self.res = res  # [R, L, C] resource use, each row normalized to rhs = 1
        self.big = np.where(allowed, 0.0, np.inf)  # [L, C]

    def _unary(self, mu: np.ndarray) -> np.ndarray:  # mu [K, R] -> [K, L, C]
        return self.unary[None] + np.einsum("kr,rlc->klc", mu, self.res) + self.big[None]

    def solve(self, mu: np.ndarray, marginals: bool = False) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """Bounds [K], paths [K, L], and (optionally) min-marginal bounds [K, L, C]."""
        K, L = mu.shape[0], self.unary.shape[0]
        u = self._unary(mu)
        fwd = np.empty_like(u)
        arg = np.zeros(u.shape, dtype=np.int64)
        fwd[:, 0] = u[:, 0]
        for i in range(1, L):
            p = self.pair[i - 1]
            if p is None:
                best = fwd[:, i - 1].min(axis=1)
                arg[:, i] = fwd[:, i - 1].argmin(axis=1)[:, None]
                fwd[:, i] = u[:, i] + best[:, None]
            else:
                t = fwd[:, i - 1, :, None] + p[None]
                arg[:, i] = t.argmin(axis=1)
                fwd[:, i] = u[:, i] + t.min(axis=1)
        offset = mu.sum(axis=1)  # each normalized row has rhs 1
        bound = fwd[:, -1].min(axis=1) - offset
        path = np.zeros((K, L), dtype=np.int64)
        path[:, -1] = fwd[:, -1].argmin(axis=1)
        for i in range(L - 1, 0, -1):
            path[:, i - 1] = arg[np.arange(K), i, path[:, i]]
        if not marginals:
            return bound, path, None
        bwd = np.zeros_like(u)
        for i in range(L - 2, -1, -1):
            nxt = u[:, i + 1] + bwd[:, i + 1]
            p = self.pair[i]
            bwd[:, i] = (nxt.min(axis=1)[:, None] if p is None else (p[None] + nxt[:, None, :]).min(axis=2))
        return bound, path, fwd + bwd - offset[:, None, None]


def _is_chain(problem: AllocationProblem) -> bool:
    return all(j == i + 1 for i, j in problem.pairs) and len(set(problem.pairs)) == len(problem.pairs)


def _pair_penalty(problem: AllocationProblem) -> np.ndarray:
    cand = np.asarray(problem.candidates, dtype=np.float64)
    return ((cand[:, None, :] - cand[None, :, :]) ** 2).sum(axis=2)  # [C, C]


def _move_maps(candidates: Sequence[tuple[int, int]]) -> np.ndarray:
    """Candidate rewrites a move may apply to a run of layers: "become c" for every candidate, and
    "set weight bits to k" / "set activation bits to k" (keeping the other). [maps, C], -1 = none."""
    C = len(candidates)
    index = {c: i for i, c in enumerate(candidates)}
    maps = [np.full(C, c) for c in range(C)]
    for dim in (0, 1):
        for k in sorted({c[dim] for c in candidates}):
            maps.append(np.array([index.get((k, c[1]) if dim == 0 else (c[0], k), -1) for c in candidates]))
    return np.unique(np.stack(maps), axis=0)


def _segment_moves(choice: np.ndarray, unary: np.ndarray, pairs: np.ndarray, res: np.ndarray,
                   allowed: np.ndarray, maps: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All moves "rewrite layers s..e (e - s < max_len) with map m": gains [M], resource deltas
    [R, M] and the moves [M, 3] = (s, e, m). Prefix sums over layers make each one O(1).
    ``pairs`` [L-1, C, C] holds the synergy penalty between layer i and i+1 (zeros if none)."""
    L, C = unary.shape
    idx = np.arange(L)
    new = maps[:, choice]  # [Mp, L]
    valid = new >= 0
    newc = np.where(valid, new, 0)
    valid &= allowed[idx[None], newc]
    cur_u = unary[idx, choice]
    g_unary = np.where(valid, cur_u[None] - unary[idx[None], newc], 0.0)
    bad = np.concatenate([np.zeros((len(maps), 1)), np.cumsum(~valid, axis=1)], axis=1)
    cur_pair = pairs[idx[:-1], choice[:-1], choice[1:]]  # [L-1]
    inner = cur_pair[None] - pairs[idx[None, :-1], newc[:, :-1], newc[:, 1:]]  # [Mp, L-1]
    left = cur_pair[None] - pairs[idx[None, :-1], choice[None, :-1], newc[:, 1:]]  # segment starts at i+1
    right = cur_pair[None] - pairs[idx[None, :-1], newc[:, :-1], choice[None, 1:]]  # segment ends at i
    pu = np.concatenate([np.zeros((len(maps), 1)), np.cumsum(g_unary, axis=1)], axis=1)
    pi = np.concatenate([np.zeros((len(maps), 1)), np.cumsum(inner, axis=1)], axis=1)
    R = res.shape[0]
    d_res = np.where(valid[None], res[:, idx[None], newc] - res[:, idx, choice][:, None, :], 0.0)  # [R, Mp, L]
    pr = np.concatenate([np.zeros((R, len(maps), 1)), np.cumsum(d_res, axis=2)], axis=2)
    s, e = np.triu_indices(L)
    keep = e - s < max_len
    s, e = s[keep], e[keep]
    gain = pu[:, e + 1] - pu[:, s] + pi[:, e] - pi[:, s]
    left_full = np.concatenate([np.zeros((len(maps), 1)), left], axis=1)  # index by s (no pair before 0)
    right_full = np.concatenate([right, np.zeros((len(maps), 1))], axis=1)  # index by e (no pair after L-1)
    gain = gain + left_full[:, s] + right_full[:, e]
    gain = np.where(bad[:, e + 1] - bad[:, s] > 0, -np.inf, gain)
    delta = pr[:, :, e + 1] - pr[:, :, s]  # [R, Mp, M]
    Mp = len(maps)
    moves = np.stack([np.broadcast_to(s, (Mp, len(s))), np.broadcast_to(e, (Mp, len(s))),
                      np.broadcast_to(np.arange(Mp)[:, None], (Mp, len(s)))], axis=-1)
    return gain.reshape(-1), delta.reshape(R, gain.size), moves.reshape(-1, 3)


def _budget_dp(unary: np.ndarray, pair: list[Optional[np.ndarray]], units: np.ndarray, capacity: int,
               allowed: np.ndarray, marginals: bool = False) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """Shortest path through the chain with one budget kept exactly as a DP state: ``units`` [L, C]
    are non-negative integers, their sum along the path at most ``capacity``.

    Returns the path and, if asked, min-marginals [L, C]: the least cost of a path through (i, c)
    (forward cost with b units used + best completion within the remaining capacity)."""
    L, C = unary.shape
    cost = np.where(allowed, unary, np.inf)
    capacity = int(min(capacity, np.where(allowed, units, 0).max(axis=1).sum()))  # cannot use more
    width = capacity + 1
    F = np.full((C, width), np.inf)
    for c in range(C):
        if units[0, c] <= capacity:
            F[c, units[0, c]] = cost[0, c]
    forward = [F] if marginals else []
    back = np.zeros((L, C, width), dtype=np.int8)
    for i in range(1, L):
        p = pair[i - 1]
        if p is None:
            arg = np.broadcast_to(F.argmin(axis=0), (C, width))
            G = np.broadcast_to(F.min(axis=0), (C, width))
        else:
            T = F[:, None, :] + p[:, :, None]  # [c_prev, c, b]
            arg = T.argmin(axis=0)
            G = T.min(axis=0)
        F = np.full((C, width), np.inf)
        for c in np.flatnonzero(np.isfinite(cost[i])):
            u = int(units[i, c])
            if u <= capacity:
                F[c, u:] = G[c, : width - u] + cost[i, c]
                back[i, c, u:] = arg[c, : width - u]
        if marginals:
            forward.append(F)
    if not np.isfinite(F).any():
        return None, None
    c, b = np.unravel_index(int(np.argmin(F)), F.shape)
    path = np.zeros(L, dtype=np.int64)
    for i in range(L - 1, -1, -1):
        path[i] = c
        if i:
            prev = int(back[i, c, b])
            b -= int(units[i, c])
            c = prev
    if not marginals:
        return path, None
    marg = np.empty((L, C))
    after = np.zeros((C, width))  # best cost of layers > i given layer i at c and r units left
    for i in range(L - 1, -1, -1):
        marg[i] = (forward[i] + after[:, ::-1]).min(axis=1)
        if i == 0:
            break
        nxt = np.full((C, width), np.inf)
        for c in np.flatnonzero(np.isfinite(cost[i])):
            u = int(units[i, c])
            if u <= capacity:
                nxt[c, u:] = cost[i, c] + after[c, : width - u]
        p = pair[i - 1]
        after = (np.broadcast_to(nxt.min(axis=0), (C, width)) if p is None
                 else (p[:, :, None] + nxt[None, :, :]).min(axis=1))
    return path, marg


def _dp_units(reduced: np.ndarray, rhs: int, allowed: np.ndarray, max_states: int = 4096) -> tuple[np.ndarray, int]:
    """Integer units for :func:`_budget_dp`: exact (after the gcd) when the capacity is small, else
    scaled to ``max_states`` and rounded down. Rounding down relaxes the budget (every feasible
    plan stays feasible), so the DP's bounds stay valid; its path is re-checked exactly."""
    reduced = np.where(allowed, reduced, 0)  # disallowed choices may sit below the allowed minimum
    g = int(np.gcd.reduce(reduced[allowed])) or 1
    units, cap = reduced // g, rhs // g
    if cap <= max_states:
        return units, int(cap)
    return (units * max_states) // cap, max_states


def _repair(choice: np.ndarray, unary: np.ndarray, pairs: np.ndarray, res: np.ndarray, allowed: np.ndarray,
            maps: np.ndarray, max_rounds: int = 400, max_len: int = 64) -> Optional[np.ndarray]:
    """Greedy path to feasibility: repeatedly take the run-of-layers move that loses the least
    objective per unit of budget violation removed. None if it gets stuck."""
    choice = choice.copy()
    L = len(choice)
    for _ in range(max_rounds):
        used = res[:, np.arange(L), choice].sum(axis=1)
        over = np.maximum(used - 1.0, 0.0).sum()
        if over <= 1e-12:
            return choice
        gain, delta, moves = _segment_moves(choice, unary, pairs, res, allowed, maps, max_len)
        after = np.maximum(used[:, None] + delta - 1.0, 0.0).sum(axis=0)
        drop = over - after
        score = np.where(np.isfinite(gain) & (drop > 1e-12), gain / np.maximum(drop, 1e-30), -np.inf)
        k = int(np.argmax(score))
        if not np.isfinite(score[k]):
            return None
        s, e, m = moves[k]
        choice[s : e + 1] = maps[m][choice[s : e + 1]]
    return None


def _improve(choice: np.ndarray, objective_of: Callable[[np.ndarray], float], unary: np.ndarray,
             pairs: np.ndarray, res: np.ndarray, allowed: np.ndarray, maps: np.ndarray,
             max_rounds: int = 100, top: int = 64, max_len: int = 64) -> np.ndarray:
    """Local search on a feasible assignment for a good incumbent (optimality comes from the MILP).

    Moves set a contiguous run of layers to one candidate (synergy makes single-layer moves
    useless: it glues neighbours together); when no single move is both improving and within
    budget, the best pair of non-overlapping moves, one spending budget and one freeing it, is tried.
    """
    choice = choice.copy()
    R = res.shape[0]
    L = len(choice)
    for _ in range(max_rounds):
        gain, delta, moves = _segment_moves(choice, unary, pairs, res, allowed, maps, max_len)
        slack = 1.0 - res[:, np.arange(L), choice].sum(axis=1)
        finite = np.isfinite(gain)
        ok = finite & (delta <= slack[:, None] + 1e-12).all(axis=0)
        single = np.where(ok, gain, -np.inf)
        k = int(np.argmax(single))
        if single[k] > 1e-12:
            s, e, m = moves[k]
            choice[s : e + 1] = maps[m][choice[s : e + 1]]
            continue
        if R == 0:
            break
        spend = np.flatnonzero(finite & (gain > 1e-12))
        free = np.flatnonzero(finite & (delta < 0).any(axis=0))
        if len(spend) == 0 or len(free) == 0:
            break
        spend = spend[np.argsort(-gain[spend])[:top]]
        freed = -np.minimum(delta[:, free], 0).sum(axis=0)
        free = free[np.argsort(-(gain[free] / np.maximum(freed, 1e-30)))[:top]]
        tot_gain = gain[spend][:, None] + gain[free][None, :]
        tot_delta = delta[:, spend][:, :, None] + delta[:, free][:, None, :]
        okp = (tot_delta <= slack[:, None, None] + 1e-12).all(axis=0)
        ms, mf = moves[spend], moves[free]
        apart = (ms[:, None, 1] + 1 < mf[None, :, 0]) | (mf[None, :, 1] + 1 < ms[:, None, 0])
        tot_gain = np.where(okp & apart, tot_gain, -np.inf)
        k = int(np.argmax(tot_gain))
        if not tot_gain.reshape(-1)[k] > 1e-12:
            break
        a, b = divmod(k, len(free))
        for s, e, m in (ms[a], mf[b]):
            choice[s : e + 1] = maps[m][choice[s : e + 1]]
    return choice


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
    budget). On a chain, the dynamic-programming presolve of the module docstring (bounds,
    incumbent, fixing by min-marginals) runs first; ``chain_presolve=False`` hands the full model
    to HiGHS (the reference the tests compare against). ``n_starts`` incumbents are improved by
    local search; ``rounds`` > 1 searches again after fixing.
    """
    import highspy

    t0 = time.perf_counter()
    L, C = len(problem.names), len(problem.candidates)
    unary = problem.costs if objective is None else np.asarray(objective, dtype=np.float64)
    use_synergy = synergy and problem.lam > 0 and any(s > 0 for s in problem.synergy)
    allowed = np.ones((L, C), dtype=bool)
    for i, c in problem.pinned.items():
        allowed[i] = False
        allowed[i, c] = True

    # (1) budget rows as exact integers, then normalized floats for the DP
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
    res = np.stack([r.astype(np.float64) / max(b, 1) for r, b in int_rows]) if int_rows else np.zeros((0, L, C))

    def feasible(choice: np.ndarray) -> bool:
        return all(int(r[np.arange(L), choice].sum()) <= b for r, b in int_rows)

    pen = _pair_penalty(problem)
    pair: list[Optional[np.ndarray]] = [None] * max(L - 1, 0)
    weights: dict[tuple[int, int], float] = {}
    if use_synergy:
        for (l, m), s in zip(problem.pairs, problem.synergy):
            if s > 0:
                weights[(l, m)] = weights.get((l, m), 0.0) + problem.lam * s

    def objective_of(choice: np.ndarray) -> float:
        total = float(unary[np.arange(L), choice].sum())
        for (l, m), w in weights.items():
            total += w * pen[choice[l], choice[m]]
        return total

    # (2) chain presolve: bound, incumbent, and fixing by min-marginals
    incumbent: Optional[np.ndarray] = None
    ub = math.inf
    chain = chain_presolve and (_is_chain(problem) or not weights)
    if chain:
        for (l, m), w in weights.items():
            pair[l] = w * pen
        dp = _Chain(unary, pair, res, allowed)
        pairs = np.zeros((max(L - 1, 1), C, C))
        for i, p in enumerate(pair):
            if p is not None:
                pairs[i] = p
        maps = _move_maps(problem.candidates)
        R = res.shape[0]
        span = np.abs(np.where(allowed, unary, 0)).max() * L + 1e-12
        best_mu = np.zeros((1, R))
        lb = -math.inf
        if R:
            grid1 = np.concatenate([[0.0], span * np.logspace(-6, 0, 15)])
            mus = np.stack(np.meshgrid(*([grid1] * R), indexing="ij"), axis=-1).reshape(-1, R)
            bounds, _, _ = dp.solve(mus)
            k = int(np.argmax(bounds))
            lb, best_mu = float(bounds[k]), mus[k : k + 1].copy()
            width = np.maximum(best_mu[0], span * 1e-4)
            for _ in range(6):  # coordinate ascent on the concave dual, one batched line search each
                for r in range(R):
                    line = np.repeat(best_mu, 17, axis=0)
                    line[:, r] = np.clip(best_mu[0, r] + np.linspace(-1, 1, 17) * width[r], 0, None)
                    bounds, _, _ = dp.solve(line)
                    k = int(np.argmax(bounds))
                    if bounds[k] > lb:
                        lb, best_mu = float(bounds[k]), line[k : k + 1].copy()
                    width[r] *= 2.0 if k in (0, 16) and line[k, r] > 0 else 0.3
        marg = dp.solve(best_mu, marginals=True)[2][0]
        for _ in range(rounds):  # find incumbents, fix by min-marginals, search again in what is left
            paths: list[np.ndarray] = []
            if R:  # Lagrangian paths near the best multipliers, and paths with one budget exact
                scales = np.array([1.0, 1.01, 1.03, 1.1, 1.3])
                base = np.maximum(best_mu[0], span * 1e-6)
                paths += list(dp.solve(best_mu[0][None] + (scales[:, None] - 1.0) * base[None])[1])
                # one budget exact in the DP state, the others priced: every budget the dual finds
                # binding (mu > 0) takes a turn, the most binding first
                binding = [r for r in np.argsort(-best_mu[0]) if best_mu[0][r] > 0] or [int(np.argmax(best_mu[0]))]
                for keep in binding:
                    other = np.delete(np.arange(R), keep)
                    priced = unary + np.einsum("r,rlc->lc", best_mu[0][other], res[other])
                    units, capacity = _dp_units(int_rows[keep][0], int_rows[keep][1], allowed)
                    path, marg_exact = _budget_dp(priced, pair, units, capacity, allowed, marginals=True)
                    if path is not None:
                        paths.append(path)
                        # a stronger bound than the LP one (weak duality again)
                        marg = np.maximum(marg, marg_exact - best_mu[0][other].sum())
                        lb = max(lb, float(marg.min(axis=1).max()))
            else:
                paths.append(dp.solve(best_mu)[1][0])
            paths.append(np.where(allowed, res.sum(axis=0), np.inf).argmin(axis=1))  # least resources
            starts = {}
            for path in paths:
                fixed = path if feasible(path) else _repair(path, unary, pairs, res, allowed, maps)
                if fixed is not None and feasible(fixed):
                    starts.setdefault(objective_of(fixed), fixed)
            for val in sorted(starts)[:n_starts]:
                better = _improve(starts[val], objective_of, unary, pairs, res, allowed, maps)
                val = objective_of(better)
                if val < ub:
                    ub, incumbent = val, better
            if incumbent is None:
                break
            before = int(allowed.sum())
            allowed &= marg <= ub + 1e-9 * max(1.0, abs(ub)) + 1e-12
            allowed[np.arange(L), incumbent] = True
            dp.big = np.where(allowed, 0.0, np.inf)
            if int(allowed.sum()) == before:
                break

    # (3) the reduced MILP
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

    h = _quiet_highs(highspy)
    h.setOptionValue("output_flag", False)
    h.setOptionValue("mip_rel_gap", 0.0)
    h.setOptionValue("mip_abs_gap", 1e-9)
    h.setOptionValue("random_seed", 0)
    h.setOptionValue("threads", 1)
    if time_limit is not None:
        if not time_limit > 0:
            raise ValueError(f"time_limit must be > 0 seconds, got {time_limit}")
        h.setOptionValue("time_limit", max(float(time_limit) - (time.perf_counter() - t0), 1e-3))
    h.passModel(lp)
    if incumbent is not None:
        start_x = np.zeros(n_cols)
        for i in range(L):
            start_x[col_of[(i, int(incumbent[i]))]] = 1.0
        for l, m, y0, pairs_ab in y_blocks:
            for k, (a, b) in enumerate(pairs_ab):
                if a == incumbent[l] and b == incumbent[m]:
                    start_x[y0 + k] = 1.0
        sol = highspy.HighsSolution()
        sol.col_value = list(start_x)
        sol.value_valid = True
        h.setSolution(sol)
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
    x = np.asarray(h.getSolution().col_value[:nx])
    choice = [int(cols[i][np.argmax([x[col_of[(i, int(c))]] for c in cols[i]])]) for i in range(L)]
    for row in rows:  # exact check; the solver works to a tolerance
        used = int(np.asarray(row.table, dtype=np.int64)[np.arange(L), choice].sum())
        if used > row.rhs:
            raise RuntimeError(f"solver returned a plan over the {row.label} budget ({used} > {row.rhs}); please report")
    return Solution(
        choice=choice,
        objective=objective_of(np.asarray(choice)),
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
    ``"0.5x"``. Returns the integer right-hand side, or None."""
    if bops_budget is None:
        return None
    value, relative = _bops_spec(bops_budget)
    if relative:
        value *= int(np.asarray(problem.macs, dtype=np.int64).sum()) * 64
    return math.floor(value)


# ---------------------------------------------------------------------------------------- plan


@dataclass
class Plan:
    """The allocation: per-layer bits plus what it costs and how it was found.

    ``quantize_(model, plan, calib_data)`` accepts it directly (through :meth:`to_config`). It is
    JSON-serializable (:meth:`to_json`, :meth:`save`) and prints as a table.
    """

    layers: dict[str, tuple[int, int]]
    size_bits: int  # weights + scales + fp32 biases of the planned layers
    weight_bits: int  # weights only
    weight_params: int
    bops: int  # per input
    budget: Optional[dict] = None  # {"kind": "bits_per_weight"|"bytes", "value": float}
    bops_budget: Optional[int] = None
    objective: float = 0.0
    status: str = "optimal"
    gap: float = 0.0
    solve_time_s: float = 0.0
    scorer: str = ""
    lam: float = 0.0
    synergy: bool = False
    layer_info: dict[str, dict] = field(default_factory=dict)  # name -> params, macs, cost

    @property
    def size_bytes(self) -> float:
        return self.size_bits / 8

    @property
    def avg_bits_per_weight(self) -> float:
        return self.weight_bits / max(self.weight_params, 1)

    def to_config(self, **overrides: Any):
        """A :class:`mixq.quantize.QuantConfig` quantizing exactly the planned layers at their bits."""
        from .quantize import QuantConfig

        names = set(self.layers)
        kwargs: dict[str, Any] = {
            "layer_bits": {n: tuple(b) for n, b in self.layers.items()},
            "filter_fn": lambda name, module: name in names,
        }
        kwargs.update(overrides)
        return QuantConfig(**kwargs)

    @property
    def size_budget_bits(self) -> Optional[int]:
        """The size budget in bits of the measure it constrains (weight bits, or everything stored)."""
        if self.budget is None:
            return None
        if self.budget["kind"] == "bits_per_weight":
            return math.floor(Fraction(self.budget["value"]) * self.weight_params)
        return math.floor(Fraction(self.budget["value"]) * 8)

    def to_dict(self) -> dict:
        """JSON form: per-layer entries carry bits plus params, MACs, score and out_features (what
        ``mixq report`` reads); derived totals are included for readers and ignored on load."""
        d = asdict(self)
        info = d.pop("layer_info")
        d["layers"] = {n: {"w_bits": w, "a_bits": a, **{("score" if k == "cost" else k): v
                                                         for k, v in info.get(n, {}).items()}}
                       for n, (w, a) in self.layers.items()}
        d.update(size_bytes=self.size_bytes, avg_bits_per_weight=self.avg_bits_per_weight,
                 size_budget_bits=self.size_budget_bits)
        return d

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        d = {k: v for k, v in d.items() if k not in ("size_bytes", "avg_bits_per_weight", "size_budget_bits")}
        layers, info = {}, dict(d.pop("layer_info", {}) or {})
        for name, entry in d.pop("layers").items():
            if isinstance(entry, dict):
                layers[name] = (int(entry["w_bits"]), int(entry["a_bits"]))
                info[name] = {("cost" if k == "score" else k): v for k, v in entry.items() if k not in ("w_bits", "a_bits")}
            else:
                layers[name] = (int(entry[0]), int(entry[1]))
        return cls(layers=layers, layer_info=info, **d)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))

    def save(self, path: Union[str, Path]) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Plan":
        return cls.from_json(Path(path).read_text())

    def __str__(self) -> str:
        from rich.console import Console
        from rich.table import Table

        summary = (f"mixq plan ({self.scorer or 'custom'} scores, synergy {'on' if self.synergy else 'off'}): "
                   f"{self.avg_bits_per_weight:.3f} bits/weight, {self.size_bytes / 1e6:.3f} MB, "
                   f"{self.bops / 1e9:.3f} GBOPs/input, {self.status}"
                   + (f" (gap {self.gap:.2%})" if self.status != "optimal" else ""))
        table = Table()
        for col in ("layer", "W", "A", "params", "MACs/input", "cost"):
            table.add_column(col, justify="left" if col == "layer" else "right")
        for name, (w, a) in self.layers.items():
            info = self.layer_info.get(name, {})
            cost = info.get("cost")
            table.add_row(name, str(w), str(a), f"{info.get('params', 0):,}", f"{info.get('macs', 0):,}",
                          "" if cost is None else f"{cost:.4g}")
        console = Console(file=io.StringIO(), width=200, record=True)
        console.print(summary)
        console.print(table)
        return console.export_text()


def _smallest_feasible(problem: AllocationProblem, rows: list[KnapsackRow], which: int) -> Optional[int]:
    """The least value row ``which`` can take under the other rows (or alone if they conflict)."""
    target = rows[which].table.astype(np.float64)
    others = [r for k, r in enumerate(rows) if k != which]
    sol = solve_milp(problem, others, objective=target, synergy=False)
    if sol is None:
        sol = solve_milp(problem, [], objective=target, synergy=False)
    if sol is None:
        return None
    return int(np.asarray(rows[which].table)[np.arange(len(problem.names)), sol.choice].sum())


def solve_plan(
    problem: AllocationProblem,
    budget: Optional[Budget] = None,
    bops_budget: Union[float, int, str, None] = None,
    synergy: bool = True,
    time_limit: Optional[float] = None,
    scorer: str = "",
) -> Plan:
    """Solve ``problem`` under the budgets and wrap the answer as a :class:`Plan`.

    Raises :class:`InfeasibleBudgetError` naming the smallest feasible budget when none fits.
    """
    size = parse_size_budget(budget) if budget is not None else None
    bops_rhs = parse_bops_budget(bops_budget, problem)
    rows: list[KnapsackRow] = []
    if size is not None:
        rows.append(size.row(problem))
    if bops_rhs is not None:
        rows.append(KnapsackRow("bops", problem.bops(), bops_rhs))
    sol = solve_milp(problem, rows, synergy=synergy, time_limit=time_limit)
    if sol is None:
        parts = []
        smallest_value: Optional[float] = None
        kind = ""
        for k, row in enumerate(rows):
            least = _smallest_feasible(problem, rows, k)
            if least is None or least <= row.rhs:
                continue
            if row.label == "size" and size is not None and size.kind == "bits_per_weight":
                total = sum(problem.weight_params)
                value = math.ceil(least / total * 1e4) / 1e4
                parts.append(f"size budget {size.describe()} is below the smallest feasible {value:.4f} bits/weight")
            elif row.label == "size" and size is not None:
                value = float(math.ceil(least / 8))
                parts.append(f"size budget {size.describe()} is below the smallest feasible {value:,.0f} bytes "
                             f"({value / 1e6:.6f} MB)")
            else:
                value = float(least)
                parts.append(f"BOPs budget {row.rhs:,} is below the smallest feasible {least:,} BOPs")
            if smallest_value is None:
                smallest_value, kind = value, row.label
        pinned = f" with {len(problem.pinned)} pinned layer(s)" if problem.pinned else ""
        if not parts:
            parts.append("the budgets cannot be met together" + pinned)
        raise InfeasibleBudgetError("infeasible budget: " + "; ".join(parts) + pinned, smallest_value, kind)
    L = len(problem.names)
    idx = np.arange(L)
    choice = np.asarray(sol.choice)
    layers = {n: problem.candidates[c] for n, c in zip(problem.names, sol.choice)}
    info = {
        n: {"params": int(problem.weight_params[i]), "macs": int(problem.macs[i]),
            "out_features": int(problem.out_features[i]), "cost": float(problem.costs[i, sol.choice[i]])}
        for i, n in enumerate(problem.names)
    }
    return Plan(
        layers=layers,
        size_bits=int(problem.size_bits()[idx, choice].sum()),
        weight_bits=int(problem.weight_bits()[idx, choice].sum()),
        weight_params=int(sum(problem.weight_params)),
        bops=int(problem.bops()[idx, choice].sum()),
        budget=None if size is None else {"kind": size.kind, "value": size.value},
        bops_budget=bops_rhs,
        objective=sol.objective,
        status=sol.status,
        gap=sol.gap,
        solve_time_s=sol.solve_time_s,
        scorer=scorer,
        lam=problem.lam,
        synergy=bool(synergy and problem.lam > 0 and problem.pairs),
        layer_info=info,
    )


# ---------------------------------------------------------------------------------------- API

SCORERS = ("kl", "lrp", "sensitivity")
Scorer = Union[str, Sequence[str], dict]


def noise_factor(w_bits: int, a_bits: int) -> float:
    """Relative quantization noise of a candidate: uniform-quantizer noise power ~ 4^-bits, averaged
    over weights and activations, 1.0 at W4A4. Turns one importance per layer into per-choice costs."""
    return (4.0 ** (-(w_bits - 4)) + 4.0 ** (-(a_bits - 4))) / 2


def split_kl_costs(raw_w: np.ndarray, raw_a: np.ndarray, cands: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-choice costs [L, C] and per-image shares [L, N] from two KL probes per layer.

    ``raw_w`` [L, N]: KL per image with only the layer's weights at the lowest candidate bits;
    ``raw_a``: with only its activations there. Both are normalized by one per-image total, so
    weight and activation noise stay comparable, and cost(w, a) = I_w 4^-(w - w_min) + I_a 4^-(a - a_min):
    a layer whose activations are fragile (post-GELU, say) pays for low a_bits, not for low w_bits.
    """
    total = raw_w.sum(axis=0) + raw_a.sum(axis=0)
    total = np.where(total > 0, total, 1.0)
    share_w, share_a = raw_w / total, raw_a / total
    w_min, a_min = min(w for w, _ in cands), min(a for _, a in cands)
    fw = np.array([4.0 ** (-(w - w_min)) for w, _ in cands])
    fa = np.array([4.0 ** (-(a - a_min)) for _, a in cands])
    costs = share_w.mean(axis=1)[:, None] * fw[None, :] + share_a.mean(axis=1)[:, None] * fa[None, :]
    return costs, share_w + share_a


def _scorer_weights(scorer: Scorer) -> dict[str, float]:
    if isinstance(scorer, str):
        weights = {scorer: 1.0}
    elif isinstance(scorer, dict):
        weights = {str(k): float(v) for k, v in scorer.items()}
    else:
        weights = {str(s): 1.0 for s in scorer}
    bad = [s for s in weights if s not in SCORERS]
    if bad or not weights:
        raise ValueError(f"unknown scorer {bad or scorer!r}; allowed: {SCORERS}, a list of them, or a dict name -> weight")
    if any(not (w >= 0) for w in weights.values()):
        raise ValueError(f"scorer weights must be >= 0, got {weights}")
    return weights


def allocate(
    model: Any,
    calib_data: Any,
    budget: Optional[Budget] = 6.0,
    bops_budget: Union[float, int, str, None] = None,
    scorer: Scorer = "kl",
    synergy: bool = True,
    lam: float = 0.05,
    candidates: Optional[Sequence[tuple[int, int]]] = None,
    pinned: Optional[dict[str, Union[int, tuple[int, int]]]] = None,
    filter_fn: Optional[Callable] = None,
    output_fn: Optional[Callable] = None,
    time_limit: Optional[float] = None,
    cache_dir: Any = None,
    progress: bool = True,
    batch_size: int = 8,
) -> Plan:
    """Choose (w_bits, a_bits) for every Linear of ``model`` that runs on ``calib_data``.

    budget: average weight bits per weight (a number <= 32, e.g. ``6.0``; scales and biases not
        counted, the field's "average bit-width"), or the stored size of the planned layers in bytes
        (a larger number, or a string ``"12MB"``/``"1.5GiB"``; weights + fp32 scales + fp32 biases).
    bops_budget: BOPs per input (``3.2e12``, ``"800G"``) or a fraction of uniform W8A8 (``"0.5x"``).
    scorer: "kl" | "lrp" | "sensitivity", a list of them (summed) or a dict name -> weight. Each
        scorer's costs are normalized to mean 1 per layer at the noisiest candidate first.
    synergy, lam: add ``lam * S[l, m] * ((w_l - w_m)^2 + (a_l - a_m)^2)`` over execution-order
        neighbours, S from the per-image KL importances (normalized to max 1).
    pinned: layer name -> bits (``8`` or ``(8, 8)``) to keep fixed.
    output_fn: called as ``output_fn(model, batch)`` for each calibration batch; returns the output
        distribution per image, probabilities [B, D] with rows summing to 1, for the KL and
        sensitivity scores (default: softmax of the model output; see :mod:`mixq.scores.outputs`).
    cache_dir: score cache directory (default ``$MIXQ_CACHE_DIR`` or ~/.cache/mixq/scores; False: off).
    """
    from .scores.inventory import adjacent_pairs, build_inventory
    from .scores.kl import kl_importance
    from .scores.lrp import lrp_importance
    from .scores.outputs import check_output_fn
    from .scores.sensitivity import sensitivity_scores
    from .scores.synergy import synergy_scores

    cands = [tuple(map(int, c)) for c in (candidates if candidates is not None else DEFAULT_CANDIDATES)]
    weights = _scorer_weights(scorer)
    if budget is not None:
        parse_size_budget(budget)  # bad budgets fail here, not after minutes of scoring
    check_bops_budget(bops_budget)
    check_output_fn(output_fn)
    layers = build_inventory(model, calib_data, filter_fn, batch_size)
    names = [l.name for l in layers]
    pin_idx: dict[int, int] = {}
    for name, bits in (pinned or {}).items():
        if name not in names:
            raise ValueError(f"pinned layer {name!r} is not a Linear that ran on the calibration data; known: {names[:8]}...")
        pair_bits = (int(bits), int(bits)) if isinstance(bits, int) else tuple(map(int, bits))
        if pair_bits not in cands:
            raise ValueError(f"pinned bits {pair_bits} for {name!r} are not among the candidates {cands}")
        pin_idx[names.index(name)] = cands.index(pair_bits)
    lowest = (min(w for w, _ in cands), min(a for _, a in cands))
    noise = np.array([noise_factor(w, a) for w, a in cands]) / noise_factor(*lowest)
    common = dict(batch_size=batch_size, progress=progress, cache_dir=cache_dir)
    kl_costs = per_image = None
    if "kl" in weights or (synergy and lam > 0):
        # Two probes per layer, weights alone and activations alone at the lowest bits (the other
        # side at the highest candidate), so the costs tell weight noise from activation noise.
        highest = (max(w for w, _ in cands), max(a for _, a in cands))
        raw_w = kl_importance(model, calib_data, names, output_fn, lowest[0], highest[1], **common)["raw"]
        raw_a = kl_importance(model, calib_data, names, output_fn, highest[0], lowest[1], **common)["raw"]
        kl_costs, per_image = split_kl_costs(np.asarray(raw_w), np.asarray(raw_a), cands)
    costs = np.zeros((len(names), len(cands)))
    for name, wgt in weights.items():
        if wgt == 0:
            continue
        if name == "kl":
            table = kl_costs
        elif name == "lrp":
            table = np.asarray(lrp_importance(model, calib_data, names, **common)["importance"])[:, None] * noise[None, :]
        else:
            table = np.asarray(sensitivity_scores(model, calib_data, names, cands, output_fn, **common)["kl"])
        worst = table.max(axis=1).mean()
        costs += wgt * (table / worst if worst > 0 else table)
    pairs = adjacent_pairs(layers)
    syn = [0.0] * len(pairs)
    if synergy and lam > 0 and pairs:
        syn = synergy_scores(per_image.tolist(), pairs)
        top = max(syn) if syn else 0.0
        syn = [s / top if top > 0 else 0.0 for s in syn]
    problem = AllocationProblem(
        names=names, candidates=cands, costs=costs,
        weight_params=[l.weight_params for l in layers], out_features=[l.out_features for l in layers],
        has_bias=[l.bias for l in layers], macs=[l.macs for l in layers],
        pairs=pairs, synergy=syn, lam=lam if synergy else 0.0, pinned=pin_idx,
    )
    label = "+".join(k if v == 1 else f"{v:g}*{k}" for k, v in weights.items())
    return solve_plan(problem, budget, bops_budget, synergy=synergy, time_limit=time_limit, scorer=label)
