"""The measured-latency budget: its MILP row against brute force, the latency table's cache keys,
the infeasible-budget message, the profile-latency command, and the scorer registry."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from mixq.alloc import (AllocationProblem, InfeasibleBudgetError, LayerLatency, Plan, parse_latency_budget,
                        solve_plan)
from mixq.alloc.api import SCORER_FUNCTIONS, SCORERS, ScoreContext, layer_latency
from mixq.scores import latency as lat

CANDS = [(4, 8), (6, 8), (8, 8), (8, 4)]


def _random_problem(rng: np.random.Generator, L: int, synergy: bool) -> tuple[AllocationProblem, LayerLatency]:
    C = len(CANDS)
    params = rng.integers(10, 200, size=L).tolist()
    macs = rng.integers(100, 5000, size=L).tolist()
    pairs = [(i, i + 1) for i in range(L - 1)] if synergy else []
    problem = AllocationProblem(names=[f"l{i}" for i in range(L)], candidates=CANDS, costs=rng.random((L, C)) * 3,
                                weight_params=params, out_features=[4] * L, has_bias=[True] * L, macs=macs,
                                pairs=pairs, synergy=rng.random(len(pairs)).tolist(), lam=0.05 if synergy else 0.0)
    seconds = rng.uniform(1e-4, 5e-3, size=(L, C))  # no order between bits: measured, not modelled
    latency = LayerLatency(seconds=seconds, fp32=seconds.max(axis=1) * 1.5, w8a8=seconds[:, 2], other_s=2e-3)
    return problem, latency


def _brute_force(problem: AllocationProblem, latency: LayerLatency, size_rhs: int, bops_rhs: int, lat_rhs: int
                 ) -> float:
    L, C = len(problem.names), len(problem.candidates)
    wbits, bops, ns = problem.weight_bits(), problem.bops(), latency.nanoseconds()
    best = math.inf
    for choice in itertools.product(range(C), repeat=L):
        idx = np.arange(L), np.asarray(choice)
        if wbits[idx].sum() <= size_rhs and bops[idx].sum() <= bops_rhs and ns[idx].sum() <= lat_rhs:
            best = min(best, problem.objective(choice))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_milp_with_latency_row_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    problem, latency = _random_problem(rng, L=5, synergy=seed % 2 == 0)
    total = sum(problem.weight_params)
    bits = float(rng.uniform(5.0, 7.5))
    bops_frac = float(rng.uniform(0.5, 1.0))
    fastest, slowest = latency.seconds.min(axis=1).sum(), latency.seconds.max(axis=1).sum()
    budget_s = float(latency.other_s + fastest + rng.uniform(0.1, 0.8) * (slowest - fastest))
    size_rhs = math.floor(bits * total)
    bops_rhs = math.floor(bops_frac * int(np.asarray(problem.macs).sum()) * 64)
    spec = f"{budget_s * 1e3!r}ms"
    lat_rhs = parse_latency_budget(spec).row(latency).rhs
    assert abs(lat_rhs - (budget_s - latency.other_s) * 1e9) <= 1
    expected = _brute_force(problem, latency, size_rhs, bops_rhs, lat_rhs)
    if expected == math.inf:
        with pytest.raises(InfeasibleBudgetError):
            solve_plan(problem, bits, f"{bops_frac!r}x", latency_budget=spec, latency=latency)
        return
    plan = solve_plan(problem, bits, f"{bops_frac!r}x", latency_budget=spec, latency=latency)
    assert plan.objective == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert plan.latency["predicted_ms"] <= budget_s * 1e3 + 1e-6
    choice = [CANDS.index(plan.layers[n]) for n in problem.names]
    predicted = latency.other_s + latency.seconds[np.arange(5), choice].sum()
    assert plan.latency["predicted_ms"] == pytest.approx(predicted * 1e3)


def test_relative_latency_budgets_are_of_the_fp32_and_w8a8_layer_totals():
    problem, latency = _random_problem(np.random.default_rng(0), L=4, synergy=False)
    for spec, ref in (("0.9x", latency.fp32.sum()), ("0.95xw8a8", latency.w8a8.sum())):
        budget = parse_latency_budget(spec)
        allowed = float(spec.split("x")[0]) * ref
        assert budget.layer_seconds(latency) == pytest.approx(allowed)
        try:
            plan = solve_plan(problem, None, latency_budget=spec, latency=latency)
        except InfeasibleBudgetError:
            assert latency.seconds.min(axis=1).sum() > allowed
            continue
        assert plan.latency["layers_ms"] <= allowed * 1e3 + 1e-6


@pytest.mark.parametrize("text,kind,value", [("45ms", "seconds", 0.045), ("0.05 s", "seconds", 0.05),
                                             ("800us", "seconds", 8e-4), ("0.6x", "fp32", 0.6),
                                             ("0.8xW8A8", "w8a8", 0.8), ("0.8x-w8a8", "w8a8", 0.8)])
def test_latency_budget_forms(text, kind, value):
    b = parse_latency_budget(text)
    assert (b.kind, b.value) == (kind, pytest.approx(value))


@pytest.mark.parametrize("text", ["45", "fast", "-3ms", "0x", "1e999ms", "0.5xw4a4"])
def test_unreadable_latency_budget_names_the_forms(text):
    with pytest.raises(ValueError, match=r"'45ms'.*'0.6x'.*'0.8xw8a8'"):
        parse_latency_budget(text)


def test_infeasible_latency_budget_names_the_fastest_reachable():
    problem, latency = _random_problem(np.random.default_rng(3), L=4, synergy=True)
    fastest_ms = (latency.other_s + latency.seconds.min(axis=1).sum()) * 1e3
    with pytest.raises(InfeasibleBudgetError) as err:
        solve_plan(problem, None, latency_budget=f"{fastest_ms * 0.9}ms", latency=latency)
    assert err.value.kind == "latency"
    assert err.value.smallest == pytest.approx(fastest_ms, abs=1e-5)
    assert f"fastest reachable {fastest_ms:.3f} ms" in str(err.value)
    # below the constant alone: still the same answer, not a crash on a negative row
    with pytest.raises(InfeasibleBudgetError, match=f"fastest reachable {fastest_ms:.3f} ms"):
        solve_plan(problem, None, latency_budget="0.1ms", latency=latency)


def test_plan_json_keeps_latency_and_old_plans_load():
    problem, latency = _random_problem(np.random.default_rng(1), L=3, synergy=False)
    plan = solve_plan(problem, None, latency_budget="1s", latency=latency)
    plan.latency["measured_ms"] = plan.latency["predicted_ms"] * 1.1
    back = Plan.from_json(plan.to_json())
    assert back.latency == plan.latency
    assert "measured / predicted 1.100" in str(back)
    old = json.loads(plan.to_json())
    old.pop("latency")
    old.pop("p_grid")
    old["softmax_quant"] = None  # written before the rename
    assert Plan.from_dict(old).latency is None and Plan.from_dict(old).p_grid is None


# ----------------------------------------------------------------------------- the table and its cache


@pytest.fixture
def toy():
    from mixq.models import get_adapter

    adapter = get_adapter("toy-vit")
    return adapter.build().eval(), adapter.calibration_batches(2)


def _counting(monkeypatch):
    calls = []

    def fake_time_shape(shape, candidates, key, act_quant="smooth", device="cpu", rounds=7, min_round_s=0.02,
                        with_fp32=True):
        calls.append((shape, tuple(candidates), key["kernel_family"], key["threads"]))
        out = {lat.bits_label(c): 1e-5 * (c[0] + c[1]) for c in candidates}
        return {**out, **({lat.FP32: 1e-4} if with_fp32 else {})}

    monkeypatch.setattr(lat, "time_shape", fake_time_shape)
    monkeypatch.setattr(lat, "float_model_seconds", lambda *a, **k: (5e-3, 1e-3))
    return calls


def test_identical_shapes_are_measured_once_and_cached(toy, tmp_path, monkeypatch):
    model, calib = toy
    calls = _counting(monkeypatch)
    table = lat.profile_latency(model, calib, cache_dir=tmp_path, progress=False)
    n_shapes = len(set(table.layers.values()))
    assert n_shapes < len(table.layers)  # toy-vit's two blocks share their four shapes
    assert len(calls) == n_shapes
    assert table.measured == n_shapes and table.reused == 0
    again = lat.profile_latency(model, calib, cache_dir=tmp_path, progress=False)
    assert len(calls) == n_shapes and again.reused == n_shapes  # the same machine key reuses
    assert again.times == table.times
    assert (table.model_s, table.other_s) == (5e-3, 1e-3)


def test_another_kernel_family_or_thread_count_measures_again(toy, tmp_path, monkeypatch):
    model, calib = toy
    calls = _counting(monkeypatch)
    table = lat.profile_latency(model, calib, cache_dir=tmp_path, progress=False)
    n = len(calls)
    monkeypatch.setattr(lat, "kernel_family", lambda: "amx")
    lat.profile_latency(model, calib, cache_dir=tmp_path, progress=False)
    assert len(calls) == 2 * n and {c[2] for c in calls[n:]} == {"amx"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads != 1 else 2)
    try:
        lat.profile_latency(model, calib, cache_dir=tmp_path, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 3 * n
    lat.profile_latency(model, calib, cache_dir=tmp_path, progress=False)  # back to the first key: cached
    assert len(calls) == 3 * n
    # a candidate not yet measured is measured alone; the fp32 time is kept
    lat.profile_latency(model, calib, candidates=[(8, 8)], cache_dir=tmp_path, progress=False)
    assert len(calls) == 3 * n
    assert set(table.times[next(iter(table.times))]) >= {lat.FP32, "W4A4", "W8A8"}


def test_non_linear_time_runs_the_model_with_its_linears_stubbed(toy, tmp_path):
    from mixq.modules import find_linears

    model, calib = toy
    x = calib[:1]
    before = model(x)
    linears = find_linears(model)
    calls = []
    handles = [m.register_forward_hook(lambda *a: calls.append(1)) for m in linears.values()]
    model_s, other_s = lat.float_model_seconds(model, x, list(linears), lat.device_key(), tmp_path, rounds=1)
    for h in handles:
        h.remove()
    assert model_s > 0 and other_s > 0
    assert all("forward" not in m.__dict__ for m in linears.values())  # restored
    assert torch.equal(model(x), before)
    assert len(calls) > 0  # the hooks saw the recorded and the timed full passes
    again = lat.float_model_seconds(model, x, list(linears), lat.device_key(), tmp_path, rounds=1)
    assert again == (model_s, other_s)  # cached


def test_device_key_names_what_changes_a_kernels_speed():
    key = lat.device_key("cpu", "cpu", threads=3)
    assert key["threads"] == 3 and key["backend"] == "cpu" and key["device"] == "cpu"
    assert key["kernel_family"] == lat.kernel_family() and "cpu" in key


def test_real_timings_on_a_tiny_model(toy, tmp_path):
    model, calib = toy
    table = lat.profile_latency(model, calib, candidates=[(4, 8), (8, 8)], cache_dir=tmp_path, progress=False,
                                rounds=2)
    for entry in table.times.values():
        assert set(entry) == {lat.FP32, "W4A8", "W8A8"} and all(v > 0 for v in entry.values())
    problem_lat = layer_latency(table, list(table.layers)[:3], [(4, 8), (8, 8)])
    assert problem_lat.seconds.shape == (3, 2)
    # the Linears outside the problem count at fp32 in the constant
    assert problem_lat.other_s == pytest.approx(table.other_s + table.layer_total(None, list(table.layers)[3:]))


def test_allocate_with_a_latency_budget(toy, tmp_path, monkeypatch):
    import mixq

    model, calib = toy
    _counting(monkeypatch)
    # fake times: W4A8 (1.2e-4) is faster than W8A8 (1.6e-4) per layer
    with pytest.raises(InfeasibleBudgetError, match="fastest reachable"):
        mixq.allocate(model, calib, budget=None, scorer="lrp", candidates=[(4, 8), (8, 8)], latency_budget="0.1x",
                      cache_dir=tmp_path, progress=False)
    plan = mixq.allocate(model, calib, budget=None, scorer="lrp", candidates=[(4, 8), (8, 8)],
                         latency_budget="0.875xw8a8", cache_dir=tmp_path, progress=False)
    n = len(plan.layers)
    n4 = sum(b == (4, 8) for b in plan.layers.values())
    assert 1.2 * n4 + 1.6 * (n - n4) <= 0.875 * 1.6 * n + 1e-9
    assert n4 >= n / 2 and plan.latency["budget"] == "0.875xw8a8"
    with pytest.raises(ValueError, match="Linears only"):
        mixq.allocate(model, calib, scorer="kl", attention=True, latency_budget="0.5x", progress=False)


# ----------------------------------------------------------------------------- CLI, report, registry


def test_profile_latency_cli_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    from mixq.cli import main

    monkeypatch.setenv("MIXQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MIXQ_NO_PROGRESS", "1")
    _counting(monkeypatch)
    out = tmp_path / "table.json"
    assert main(["profile-latency", "toy-vit", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "W8A8" in text and "non-Linear time" in text and "fp32" in text
    data = json.loads(out.read_text())
    assert data["key"]["kernel_family"] == lat.kernel_family() and data["layers"]
    assert main(["profile-latency", "toy-vit", "--out", str(out)]) == 2  # refuses to replace without --force
    assert main(["quantize", "toy-vit", "--uniform", "W8A8", "--latency-budget", "0.5x",
                 "--out", str(tmp_path / "q")]) == 2
    assert main(["quantize", "toy-vit", "--latency-budget", "fast", "--out", str(tmp_path / "q")]) == 2
    assert "--latency-budget" in capsys.readouterr().err


def test_report_shows_predicted_and_measured_latency(tmp_path):
    from mixq.report import ReportData, write_report

    problem, latency = _random_problem(np.random.default_rng(2), L=3, synergy=False)
    plan = solve_plan(problem, None, latency_budget="1s", latency=latency)
    plan.latency["measured_ms"] = 2 * plan.latency["predicted_ms"]
    md = write_report(ReportData.from_plan("t", plan.to_dict()), tmp_path / "r").read_text()
    assert "predicted" in md and "measured / predicted 2.000" in md and "measured / budget" in md


def test_registry_covers_every_scorer_name():
    from mixq.cli import SCORER_CHOICES

    assert set(SCORER_FUNCTIONS) == set(SCORERS)
    for choice in SCORER_CHOICES.values():
        for name in [choice] if isinstance(choice, str) else choice:
            assert name in SCORER_FUNCTIONS
    assert all(callable(f) for f in SCORER_FUNCTIONS.values())
    assert ScoreContext.__dataclass_fields__.keys() >= {"model", "calib_data", "layers", "cands"}
