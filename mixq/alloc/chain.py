"""Dynamic programming over the layer chain: Lagrangian bounds, min-marginals, an incumbent by repair
and local search, and variable fixing (steps 1-4 of the package docstring)."""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np

from .problem import AllocationProblem


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


def chain_presolve(
    problem: AllocationProblem,
    unary: np.ndarray,
    res: np.ndarray,
    int_rows: list[tuple[np.ndarray, int]],
    allowed: np.ndarray,
    weights: dict[tuple[int, int], float],
    pen: np.ndarray,
    feasible: Callable[[np.ndarray], bool],
    objective_of: Callable[[np.ndarray], float],
    n_starts: int = 2,
    rounds: int = 1,
) -> Optional[np.ndarray]:
    """Steps 1-4 of the package docstring on a chain: Lagrangian bound, incumbent by repair and
    local search, and fixing by min-marginals (``allowed`` shrinks in place). Returns the incumbent
    (None if no feasible path was found)."""
    L, C = unary.shape
    pair: list[Optional[np.ndarray]] = [None] * max(L - 1, 0)
    incumbent: Optional[np.ndarray] = None
    ub = math.inf
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
    return incumbent
