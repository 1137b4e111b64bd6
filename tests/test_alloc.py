"""Bit allocation MILP: optimal against brute force, budgets met exactly, clear errors, plans round-trip."""

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn

from mixq.alloc import (
    DEFAULT_CANDIDATES, AllocationProblem, InfeasibleBudgetError, Plan, allocate, parse_bops_budget,
    parse_size_budget, solve_plan,
)


def _brute(problem, size_rhs, bops_rhs, weight_bits=True):
    L = len(problem.names)
    size = problem.weight_bits() if weight_bits else problem.size_bits()
    bops = problem.bops()
    best = math.inf
    allowed = [[problem.pinned[i]] if i in problem.pinned else range(len(problem.candidates)) for i in range(L)]
    for choice in itertools.product(*allowed):
        idx = np.arange(L)
        if size_rhs is not None and size[idx, list(choice)].sum() > size_rhs:
            continue
        if bops_rhs is not None and bops[idx, list(choice)].sum() > bops_rhs:
            continue
        best = min(best, problem.objective(choice))
    return best


@st.composite
def instances(draw):
    L = draw(st.integers(2, 5))
    C = draw(st.integers(2, 4))
    cands = draw(st.permutations(list(DEFAULT_CANDIDATES)))[:C]
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    costs = rng.uniform(0, 1, size=(L, C))
    params = [int(v) for v in rng.integers(1, 50, size=L)]
    macs = [int(v) for v in rng.integers(1, 200, size=L)]
    pairs = [(i, i + 1) for i in range(L - 1)]
    syn = [float(v) for v in rng.uniform(0, 1, size=L - 1)]
    lam = draw(st.sampled_from([0.0, 0.002, 0.02, 0.2]))
    pinned = {0: int(rng.integers(0, C))} if draw(st.booleans()) else {}
    p = AllocationProblem([f"l{i}" for i in range(L)], cands, costs, params, [1] * L, [False] * L, macs,
                          pairs, syn, lam, pinned)
    avg = draw(st.floats(4.0, 8.0))
    bops_frac = draw(st.one_of(st.none(), st.floats(0.2, 1.0)))
    return p, avg, bops_frac


@given(instances())
def test_milp_matches_brute_force(inst):
    p, avg, bops_frac = inst
    size = parse_size_budget(avg)
    size_rhs = size.row(p).rhs
    bops_rhs = None if bops_frac is None else parse_bops_budget(f"{bops_frac}x", p)
    best = _brute(p, size_rhs, bops_rhs)
    if math.isinf(best):
        with pytest.raises(InfeasibleBudgetError):
            solve_plan(p, avg, None if bops_frac is None else f"{bops_frac}x")
        return
    plan = solve_plan(p, avg, None if bops_frac is None else f"{bops_frac}x")
    assert plan.status == "optimal"
    assert plan.objective == pytest.approx(best, rel=1e-7, abs=1e-9)
    assert plan.weight_bits <= size_rhs and plan.avg_bits_per_weight <= avg
    if bops_rhs is not None:
        assert plan.bops <= bops_rhs
    for i, c in p.pinned.items():
        assert plan.layers[p.names[i]] == p.candidates[c]


def _chain_problem(L=30, lam=0.05, seed=0):
    rng = np.random.default_rng(seed)
    cands = list(DEFAULT_CANDIDATES)
    imp = rng.lognormal(size=L)
    noise = np.array([(4.0 ** (-(w - 4)) + 4.0 ** (-(a - 4))) / 2 for w, a in cands])
    costs = imp[:, None] * noise[None, :]
    params = [int(v) for v in rng.integers(100, 5000, size=L)]
    return AllocationProblem([f"l{i}" for i in range(L)], cands, costs, params, [16] * L, [True] * L,
                             [p * 10 for p in params], [(i, i + 1) for i in range(L - 1)],
                             list(rng.uniform(0, 1, size=L - 1)), lam)


def test_budgets_met_exactly_and_binding():
    p = _chain_problem()
    plan = solve_plan(p, 5.5, "0.4x")
    assert plan.avg_bits_per_weight <= 5.5
    assert plan.bops <= parse_bops_budget("0.4x", p)
    looser = solve_plan(p, 7.0, None)
    assert looser.objective <= plan.objective + 1e-12
    byte_plan = solve_plan(p, plan.size_bits // 8 + 1)  # a byte budget counts scales and biases too
    assert byte_plan.size_bytes <= plan.size_bits // 8 + 1
    assert solve_plan(p, f"{(plan.size_bits // 8 + 1) / 1e3}kB").size_bytes <= plan.size_bits // 8 + 1


def test_infeasible_budget_names_smallest_feasible():
    p = _chain_problem(L=8)
    with pytest.raises(InfeasibleBudgetError) as err:
        solve_plan(p, 3.5)
    assert "4.0000 bits/weight" in str(err.value) and err.value.smallest == 4.0
    smallest_bops = int(p.bops()[:, 0].sum())  # (4, 4) everywhere
    with pytest.raises(InfeasibleBudgetError) as err:
        solve_plan(p, 8.0, smallest_bops - 1)
    assert f"{smallest_bops:,}" in str(err.value)
    # the named value is feasible
    assert solve_plan(p, 8.0, smallest_bops).bops == smallest_bops


def test_pinned_layer_and_same_plan_twice():
    p = _chain_problem(L=20)
    p.pinned = {3: DEFAULT_CANDIDATES.index((8, 8))}
    a = solve_plan(p, 5.0, "0.5x")
    b = solve_plan(p, 5.0, "0.5x")
    assert a.layers["l3"] == (8, 8)
    assert a.layers == b.layers and a.objective == b.objective


def test_synergy_pulls_neighbours_together():
    p = _chain_problem(L=20, lam=0.0)
    free = solve_plan(p, 6.0)
    p.lam = 100.0
    glued = solve_plan(p, 6.0)
    jumps = lambda plan: sum(plan.layers[f"l{i}"] != plan.layers[f"l{i + 1}"] for i in range(19))
    assert jumps(glued) <= jumps(free)
    assert jumps(glued) <= 2


def test_time_limit_reports_status():
    plan = solve_plan(_chain_problem(L=40), 5.5, "0.4x", time_limit=30.0)
    assert plan.status in ("optimal", "time_limit") and plan.gap >= 0
    with pytest.raises(ValueError, match="time_limit"):
        solve_plan(_chain_problem(L=4), 5.5, time_limit=-1)


def test_plan_json_roundtrip_and_table(tmp_path):
    plan = solve_plan(_chain_problem(L=6), 6.0, "0.6x", scorer="kl")
    assert Plan.from_json(plan.to_json()) == plan
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == plan
    text = str(plan)
    assert "l5" in text and "bits/weight" in text


@pytest.mark.parametrize("bad", ["12 parsecs", -1.0, "abc"])
def test_bad_budgets_are_refused(bad):
    with pytest.raises(ValueError):
        parse_size_budget(bad)


def test_budget_units():
    assert parse_size_budget(6).kind == "bits_per_weight"
    assert parse_size_budget("12MB").value == 12e6
    assert parse_size_budget("1KiB").value == 1024
    assert parse_size_budget(5e6).kind == "bytes"


def test_bad_problem_is_refused():
    with pytest.raises(ValueError, match="costs must have shape"):
        AllocationProblem(["a"], [(4, 4)], np.zeros((2, 1)), [1], [1], [False], [1])
    with pytest.raises(ValueError, match="not allowed"):
        AllocationProblem(["a"], [(5, 4)], np.zeros((1, 1)), [1], [1], [False], [1])


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 4)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_allocate_end_to_end_quantize_accepts_plan(tmp_path):
    import mixq

    torch.manual_seed(0)
    model, x = _Tiny(), torch.randn(12, 8)
    plan = mixq.allocate(model, x, budget=6.0, bops_budget="0.6x", scorer=["kl", "lrp"], pinned={"c": 8},
                         cache_dir=tmp_path, progress=False)
    assert set(plan.layers) == {"a", "b", "c"} and plan.layers["c"] == (8, 8)
    assert plan.avg_bits_per_weight <= 6.0 and plan.status == "optimal"
    again = mixq.allocate(model, x, budget=6.0, bops_budget="0.6x", scorer=["kl", "lrp"], pinned={"c": 8},
                          cache_dir=tmp_path, progress=False)
    assert again.layers == plan.layers
    mixq.quantize_(model, plan, x, progress=False)
    from mixq.nn import QuantLinear

    assert {n: (m.w_bits, m.a_bits) for n, m in model.named_modules() if isinstance(m, QuantLinear)} == plan.layers
    with pytest.raises(ValueError, match="unknown scorer"):
        allocate(_Tiny(), x, scorer="nope", cache_dir=False, progress=False)


@pytest.mark.parametrize("seed", range(4))
def test_chain_presolve_keeps_the_optimum(seed):
    """The DP bounds fix variables before HiGHS; a plain MILP without them must agree (9 candidates,
    too many layers for brute force)."""
    from mixq.alloc import KnapsackRow, solve_milp

    rng = np.random.default_rng(seed)
    p = _chain_problem(L=14, lam=float(rng.choice([0.01, 0.1, 1.0])), seed=seed)
    p.costs = p.costs * rng.uniform(0.7, 1.3, size=p.costs.shape)  # break the cost structure
    rows = [parse_size_budget(float(rng.uniform(4.5, 7.5))).row(p),
            KnapsackRow("bops", p.bops(), parse_bops_budget(f"{rng.uniform(0.3, 0.9):.3f}x", p))]
    fast = solve_milp(p, rows)
    plain = solve_milp(p, rows, chain_presolve=False)
    assert (fast is None) == (plain is None)
    if fast is not None:
        assert fast.objective == pytest.approx(plain.objective, rel=1e-9, abs=1e-12)


def test_plan_json_is_what_the_report_reads():
    import json

    from mixq.report import rows_from_plan

    plan = solve_plan(_chain_problem(L=5), 6.0, "0.6x", scorer="kl")
    d = json.loads(plan.to_json())
    assert d["size_budget_bits"] == math.floor(6 * plan.weight_params) and d["bops_budget"] == plan.bops_budget
    rows = rows_from_plan(d)
    assert [(r.name, r.w_bits, r.a_bits) for r in rows] == [(n, w, a) for n, (w, a) in plan.layers.items()]
    legacy = dict(d, layers={n: list(b) for n, b in plan.layers.items()})  # plain [w, a] pairs load too
    assert Plan.from_dict(legacy).layers == plan.layers


@pytest.mark.parametrize("budget", [6.0, "bytes"])
def test_report_size_axis_is_the_plans_measure(budget):
    """The report's size and the plan's budget count the same things (weights, scales, biases for a
    byte budget; weights only for bits per weight), and old plans' "score" key still reads as cost."""
    import json

    from mixq.report import ReportData

    problem = _chain_problem(L=6)
    problem.has_bias = [True, False] * 3
    if budget == "bytes":
        budget = f"{int(problem.size_bits()[:, 4].sum()) / 8}B"
    plan = solve_plan(problem, budget)
    d = json.loads(plan.to_json())
    data = ReportData.from_plan("t", d)
    assert data.size_bits == plan.size_bits and data.weight_bits == plan.weight_bits
    assert data.budget_kind == plan.budget["kind"] and data.size_budget_bits == plan.size_budget_bits
    measure = data.size_bits if data.budget_kind == "bytes" else data.weight_bits
    assert measure <= data.size_budget_bits
    assert [r.cost for r in data.layers] == [plan.layer_info[n]["cost"] for n in plan.layers]
    old = dict(d, layers={n: {("score" if k == "cost" else k): v for k, v in e.items()} for n, e in d["layers"].items()})
    assert [r.cost for r in ReportData.from_plan("t", old).layers] == [r.cost for r in data.layers]
    assert Plan.from_dict(old).layer_info == plan.layer_info


def test_infeasible_budget_fails_before_any_scoring(monkeypatch):
    """The default scorer (measured) takes minutes on a real model: a budget no plan can meet is
    refused before it runs, with the smallest feasible value."""
    import mixq.scores.measured as measured_mod

    monkeypatch.setattr(measured_mod, "measured_scores", lambda *a, **k: pytest.fail("scored an infeasible budget"))
    torch.manual_seed(0)
    with pytest.raises(InfeasibleBudgetError, match="smallest feasible"):
        allocate(_Tiny(), torch.randn(12, 8), budget=6.0, bops_budget="0.1x", cache_dir=False, progress=False)


def test_allocate_default_is_the_sweep_winner():
    """measured costs with synergy off (docs/ALLOCATION_EXPERIMENTS.md, "What should be the default")."""
    import inspect

    params = inspect.signature(allocate).parameters
    assert params["scorer"].default == "measured" and params["synergy"].default is None
    torch.manual_seed(0)
    plan = allocate(_Tiny(), torch.randn(12, 8), budget=6.0, cache_dir=False, progress=False)
    assert plan.scorer == "measured" and not plan.synergy and plan.lam == 0.0
