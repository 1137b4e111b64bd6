"""Bit allocation: choose (w_bits, a_bits) for every Linear by solving a MILP with HiGHS.

The problem (shared/DESIGN.md, "Scores and allocation"): binary ``x[i,c]`` picks candidate ``c`` for layer
``i``; minimize ``sum cost[i,c] x[i,c] + lam * sum_{(l,m) adjacent} S[l,m] * D(c_l, c_m)`` with
``D = (w_l - w_m)^2 + (a_l - a_m)^2`` (the Mix-QSAM synergy term, on both bit-widths), subject to one
choice per layer, a model-size budget, an optional BOPs budget, an optional latency budget (measured
per-layer times, :mod:`mixq.scores.latency`) and pinned layers.

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

Attention matmuls (``allocate(..., attention=True)``, :mod:`.attention`): QK^T and softmax.V of each
supported attention module are layers ``<module>.qk`` / ``<module>.pv`` with no weights, BOPs =
MACs x b1 x b2, and only the equal pairs (b, b) allowed (``AllocationProblem.allowed``; the solver
removes the other choices exactly as it removes choices fixed by pinning).

Layout: :mod:`.problem` (the numbers in), :mod:`.budgets` (user budgets to integer rows),
:mod:`.chain` (steps 1-4), :mod:`.milp` (step 5), :mod:`.plan` (the answer), :mod:`.api`
(``allocate``: scores to problem), :mod:`.attention` (attention matmuls' candidates and costs). The cost functions live next to the scores
(:mod:`mixq.scores.costs`).
"""

from __future__ import annotations

from .api import SCORERS, Scorer, allocate
from .budgets import (LatencyBudget, SizeBudget, check_bops_budget, parse_bops_budget, parse_latency_budget,
                      parse_size_budget)
from .milp import solve_milp
from .plan import Plan, solve_plan
from .problem import (
    BIAS_BITS, BITS, BITS_PER_WEIGHT_MAX, DEFAULT_CANDIDATES, SCALE_BITS, AllocationProblem, Budget,
    InfeasibleBudgetError, KnapsackRow, LayerLatency, Solution,
)

__all__ = [
    "BIAS_BITS", "BITS", "BITS_PER_WEIGHT_MAX", "DEFAULT_CANDIDATES", "SCALE_BITS", "SCORERS", "AllocationProblem",
    "Budget", "InfeasibleBudgetError", "KnapsackRow", "LatencyBudget", "LayerLatency", "Plan", "Scorer", "SizeBudget", "Solution", "allocate",
    "check_bops_budget", "parse_bops_budget", "parse_latency_budget", "parse_size_budget", "solve_milp", "solve_plan",
]
