"""``allocate``: score a model's Linears, build the allocation problem and solve it.

Each scorer is one function in :data:`SCORER_FUNCTIONS` (name -> function of a :class:`ScoreContext`,
returning its cost table and, where it has them, per-image importances for synergy); ``allocate``
checks the budgets, runs the scorers asked for, sums their normalized tables and solves once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from ..scores.costs import noise_factor, split_kl_costs
from .attention import (attention_tables, check_scorers, kl_attention_costs, merge_rows, pad_linear,
                        problem_candidates)
from .budgets import check_bops_budget, parse_latency_budget, parse_size_budget
from .plan import Plan, solve_plan
from .problem import DEFAULT_CANDIDATES, AllocationProblem, Budget, LayerLatency

SCORERS = ("kl", "lrp", "sensitivity", "measured")
Scorer = Union[str, Sequence[str], dict]


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


@dataclass
class ScoreContext:
    """What every scorer reads: the model, its data, the problem's layers and candidates."""

    model: Any
    calib_data: Any
    layers: list
    cands: list[tuple[int, int]]  # the Linear candidates
    full: list[tuple[int, int]]  # the problem's candidates (attention pairs appended)
    output_fn: Optional[Callable]
    common: dict  # batch_size, progress, cache_dir
    att: Optional[dict] = None  # attention_tables(...) when attention matmuls are planned
    cache: dict = field(default_factory=dict)  # results one scorer computes and another reuses

    @property
    def names(self) -> list[str]:
        return [l.name for l in self.layers]

    @property
    def ops(self) -> list[str]:
        return [l.op for l in self.layers]

    @property
    def lin_names(self) -> list[str]:
        return [l.name for l in self.layers if l.op == "linear"]

    @property
    def is_lin(self) -> np.ndarray:
        return np.array([op == "linear" for op in self.ops])

    @property
    def lowest(self) -> tuple[int, int]:
        return (min(w for w, _ in self.cands), min(a for _, a in self.cands))


@dataclass
class Scored:
    """A scorer's answer: costs [L, C] over the problem's candidates, and per-image importances
    (for the synergy term) when the scorer measures them."""

    costs: np.ndarray
    per_image: Optional[np.ndarray] = None


def score_measured(ctx: ScoreContext) -> Scored:
    """Every layer alone at every candidate, quantized as quantize_ does it; KL per image."""
    from ..scores.measured import measured_cost_table, measured_scores

    result = measured_scores(ctx.model, ctx.calib_data, ctx.lin_names, ctx.cands, ctx.output_fn, **ctx.common)
    if ctx.att is not None:  # one table, so the per-image shares are normalized over every layer
        result = {"per_image": merge_rows(ctx.ops, pad_linear(np.asarray(result["per_image"]), len(ctx.full)),
                                          ctx.att["per_image"])}
    costs, per_image = measured_cost_table(result)[:2]
    return Scored(costs, per_image)


def score_kl(ctx: ScoreContext) -> Scored:
    """Two probes per layer, weights alone and activations alone at the lowest bits (the other
    side at the highest candidate), so the costs tell weight noise from activation noise."""
    from ..scores.kl import kl_importance

    if "kl" in ctx.cache:
        return ctx.cache["kl"]
    lowest = ctx.lowest
    highest = (max(w for w, _ in ctx.cands), max(a for _, a in ctx.cands))
    m, data, names, fn = ctx.model, ctx.calib_data, ctx.lin_names, ctx.output_fn
    raw_w = np.asarray(kl_importance(m, data, names, fn, lowest[0], highest[1], **ctx.common)["raw"])
    raw_a = np.asarray(kl_importance(m, data, names, fn, highest[0], lowest[1], **ctx.common)["raw"])
    att = ctx.att
    if att is not None:  # an attention matmul's probe counts as activation noise
        raw_w = merge_rows(ctx.ops, raw_w, np.zeros_like(att["raw_lowest"]))
        raw_a = merge_rows(ctx.ops, raw_a, att["raw_lowest"])
    costs, per_image = split_kl_costs(raw_w, raw_a, ctx.cands)
    if att is not None:
        is_lin = ctx.is_lin
        costs = merge_rows(ctx.ops, pad_linear(costs[is_lin], len(ctx.full)),
                           kl_attention_costs(per_image[~is_lin], ctx.full, lowest[1]))
    ctx.cache["kl"] = Scored(costs, per_image)
    return ctx.cache["kl"]


def score_lrp(ctx: ScoreContext) -> Scored:
    """Layer-wise relevance per layer, spread over the candidates by their noise factor."""
    from ..scores.lrp import lrp_importance

    noise = np.array([noise_factor(w, a) for w, a in ctx.cands]) / noise_factor(*ctx.lowest)
    importance = np.asarray(lrp_importance(ctx.model, ctx.calib_data, ctx.lin_names, **ctx.common)["importance"])
    return Scored(importance[:, None] * noise[None, :])


def score_sensitivity(ctx: ScoreContext) -> Scored:
    """KL of the output with each layer alone fake-quantized at each candidate."""
    from ..scores.sensitivity import sensitivity_scores

    table = np.asarray(sensitivity_scores(ctx.model, ctx.calib_data, ctx.lin_names, ctx.cands, ctx.output_fn,
                                          **ctx.common)["kl"])
    if ctx.att is not None:
        table = merge_rows(ctx.ops, pad_linear(table, len(ctx.full)), ctx.att["kl"])
    return Scored(table)


# One function per scorer name. The CLI's "combined" is the list ["kl", "lrp", "sensitivity"].
SCORER_FUNCTIONS: dict[str, Callable[[ScoreContext], Scored]] = {
    "kl": score_kl, "lrp": score_lrp, "sensitivity": score_sensitivity, "measured": score_measured,
}


def combine_costs(tables: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """The weighted sum of the cost tables, each normalized first (mean over layers of its worst
    candidate = 1), so no scorer dominates by its units."""
    costs = None
    for name, wgt in weights.items():
        if wgt == 0:
            continue
        table = tables[name]
        worst = table.max(axis=1).mean()
        term = wgt * (table / worst if worst > 0 else table)
        costs = term if costs is None else costs + term
    return costs


def _synergy_weights(ctx: ScoreContext, scored: dict[str, Scored]) -> list[float]:
    """S per adjacent pair from the per-image importances (measured's if it ran, else KL's),
    normalized to max 1."""
    from ..scores.inventory import adjacent_pairs
    from ..scores.synergy import synergy_scores

    pairs = adjacent_pairs(ctx.layers)
    if not pairs:
        return []
    per_image = next((s.per_image for k, s in scored.items() if k == "measured" and s.per_image is not None), None)
    if per_image is None:
        per_image = score_kl(ctx).per_image
    syn = synergy_scores(per_image.tolist(), pairs)
    top = max(syn) if syn else 0.0
    return [s / top if top > 0 else 0.0 for s in syn]


def _pinned_indices(pinned: Optional[dict], names: list[str], full: list, allowed, cands: list,
                    attention: bool) -> dict[int, int]:
    pin_idx: dict[int, int] = {}
    for name, bits in (pinned or {}).items():
        if name not in names:
            what = "a Linear or attention matmul" if attention else "a Linear"
            raise ValueError(f"pinned layer {name!r} is not {what} that ran on the calibration data; known: {names[:8]}...")
        pair_bits = (int(bits), int(bits)) if isinstance(bits, int) else tuple(map(int, bits))
        i = names.index(name)
        layer_cands = [full[k] for k in allowed[i]] if allowed and allowed[i] is not None else cands
        if pair_bits not in layer_cands:
            raise ValueError(f"pinned bits {pair_bits} for {name!r} are not among its candidates {layer_cands}")
        pin_idx[i] = full.index(pair_bits)
    return pin_idx


def layer_latency(table: Any, names: Sequence[str], candidates: Sequence[tuple[int, int]]) -> LayerLatency:
    """The problem's latency rows from a :class:`mixq.scores.latency.LatencyTable` of its Linears."""
    seconds = np.array([[table.seconds(n, c) for c in candidates] for n in names])
    return LayerLatency(seconds=seconds, fp32=np.array([table.seconds(n, None) for n in names]),
                        w8a8=np.array([table.seconds(n, (8, 8)) for n in names]),
                        other_s=table.predict({}) - table.layer_total(None, names),
                        batch=table.batch, key=dict(table.key))


def allocate(
    model: Any,
    calib_data: Any,
    budget: Optional[Budget] = 6.0,
    bops_budget: Union[float, int, str, None] = None,
    scorer: Scorer = "measured",
    synergy: Optional[bool] = None,
    lam: float = 0.05,
    candidates: Optional[Sequence[tuple[int, int]]] = None,
    pinned: Optional[dict[str, Union[int, tuple[int, int]]]] = None,
    filter_fn: Optional[Callable] = None,
    output_fn: Optional[Callable] = None,
    time_limit: Optional[float] = None,
    cache_dir: Any = None,
    progress: bool = True,
    batch_size: int = 8,
    attention: bool = False,
    p_grid: str = "log2",
    latency_budget: Optional[str] = None,
    latency_batch: int = 1,
) -> Plan:
    """Choose (w_bits, a_bits) for every Linear of ``model`` that runs on ``calib_data``.

    budget: average weight bits per weight (a number <= 32, e.g. ``6.0``; scales and biases not
        counted, the field's "average bit-width"), or the stored size of the planned layers in bytes
        (a larger number, or a string ``"12MB"``/``"1.5GiB"``; weights + fp32 scales + fp32 biases).
    bops_budget: BOPs per input (``3.2e12``, ``"800G"``) or a fraction of uniform W8A8 (``"0.5x"``).
    scorer: "measured" (default) | "kl" | "lrp" | "sensitivity", a list of them (summed) or a dict
        name -> weight. Each scorer's costs are normalized to mean 1 per layer at the noisiest
        candidate first. "measured" quantizes each layer alone at each candidate as ``quantize_``
        would (smooth, GPTQ) and measures the KL of ``output_fn`` per image
        (:mod:`mixq.scores.measured`): the Pareto sweep's winner (docs/ALLOCATION_EXPERIMENTS.md),
        and the slowest scorer: one pass per layer and candidate, each starting at the perturbed
        layer's block (earlier blocks replay cached FP outputs). "kl" (two probes per layer,
        extrapolated with 4^-bits) is the fast one: about 3x less time on DINOv2-S.
    synergy, lam: add ``lam * S[l, m] * ((w_l - w_m)^2 + (a_l - a_m)^2)`` over execution-order
        neighbours, S from the per-image KL importances (normalized to max 1). ``synergy=None``
        (default): off for ``scorer="measured"`` alone (the sweep's winner: measured, synergy off),
        on for every other scorer.
    pinned: layer name -> bits (``8`` or ``(8, 8)``) to keep fixed; with ``attention=True`` an attention
        matmul (``"blocks.0.attn.pv": 8``) too.
    output_fn: called as ``output_fn(model, batch)`` for each calibration batch; returns the output
        distribution per image, probabilities [B, D] with rows summing to 1, for the KL and
        sensitivity scores (default: softmax of the model output; see :mod:`mixq.scores.outputs`).
    cache_dir: score cache directory (default ``$MIXQ_CACHE_DIR`` or ~/.cache/mixq/scores; False: off).
    attention: also allocate the attention matmuls of every supported attention module, as layers
        ``<module>.qk`` (bits of Q, K) and ``<module>.pv`` (bits of P, V) taking the equal pairs of the
        activation bits (:mod:`mixq.alloc.attention`): no weights, so size budgets do not change;
        their BOPs (MACs x b1 x b2) count in the BOPs total, and a fraction budget ("0.5x") is then
        relative to W8A8 over the Linears and the attention matmuls. Scorers "kl", "measured" and
        "sensitivity" only. Default False: Linears only, as before.
    p_grid: the probability grid the attention matmuls are scored (and the plan quantizes) with,
        "log2" or "uniform"; used only with ``attention=True``.
    latency_budget: a third budget on measured time (:mod:`mixq.scores.latency`; the table is
        measured, or read from the cache, before any scoring, and a budget no plan meets fails then,
        naming the fastest reachable latency): ``"45ms"`` (predicted end-to-end time of one inference
        call of ``latency_batch`` images: the planned Linears plus the measured non-Linear time),
        ``"0.6x"`` (the planned Linears at most 0.6 x their fp32 time) or ``"0.8xw8a8"`` (at most
        0.8 x their uniform-W8A8 time). Linears only: not with ``attention=True``.
    latency_batch: images per inference call the latency table is measured for (default 1).
    """
    from ..formats import check_p_grid
    from ..scores.attention import attention_scores
    from ..scores.inventory import adjacent_pairs, build_inventory
    from ..scores.outputs import check_output_fn

    cands = [tuple(map(int, c)) for c in (candidates if candidates is not None else DEFAULT_CANDIDATES)]
    weights = _scorer_weights(scorer)
    if synergy is None:
        synergy = set(weights) != {"measured"}
    if budget is not None:
        parse_size_budget(budget)  # bad budgets fail here, not after minutes of scoring
    check_bops_budget(bops_budget)
    parse_latency_budget(latency_budget)
    check_output_fn(output_fn)
    if not isinstance(attention, bool):
        raise TypeError(f"attention must be True or False, got {attention!r}")
    if attention:
        check_scorers(weights)
        check_p_grid(p_grid)
        if latency_budget is not None:
            raise ValueError("latency_budget covers the Linears only (the latency table has no attention-matmul "
                             "times yet); use attention=False with a latency budget")
    layers = build_inventory(model, calib_data, filter_fn, batch_size, attention=attention)
    names = [l.name for l in layers]
    ops = [l.op for l in layers]
    full, allowed = problem_candidates(cands, ops)
    pin_idx = _pinned_indices(pinned, names, full, allowed, cands, attention)
    layer_args = dict(names=names, candidates=full, weight_params=[l.weight_params for l in layers],
                      out_features=[l.out_features for l in layers], has_bias=[l.bias for l in layers],
                      macs=[l.macs for l in layers], pinned=pin_idx, allowed=allowed, ops=ops)
    latency = None
    if latency_budget is not None:
        from ..scores.latency import profile_latency

        # Every Linear that runs is timed (those outside the plan count at fp32 in the constant).
        table = profile_latency(model, calib_data, batch=latency_batch, cache_dir=cache_dir, progress=progress,
                                candidates=cands)
        latency = layer_latency(table, names, full)
    solve_args = dict(budget=budget, bops_budget=bops_budget, time_limit=time_limit, latency_budget=latency_budget,
                      latency=latency)
    if budget is not None or bops_budget is not None or latency_budget is not None:
        # An infeasible budget fails here, not after the scoring (minutes with the measured scorer):
        # feasibility depends only on sizes, MACs, times, candidates and pins, so zero costs tell.
        solve_plan(AllocationProblem(costs=np.zeros((len(names), len(full))), pairs=[], synergy=[], lam=0.0,
                                     **layer_args), synergy=False, **solve_args)
    common = dict(batch_size=batch_size, progress=progress, cache_dir=cache_dir)
    att_names = [n for n, op in zip(names, ops) if op != "linear"]
    att = None
    if att_names:
        att = attention_tables(lambda pairs: attention_scores(model, calib_data, att_names, pairs, output_fn,
                                                              p_grid, **common),
                               weights, ops, cands, full, min(a for _, a in cands))
    ctx = ScoreContext(model, calib_data, layers, cands, full, output_fn, common, att)
    scored = {name: SCORER_FUNCTIONS[name](ctx) for name, wgt in weights.items() if wgt > 0}
    costs = combine_costs({k: v.costs for k, v in scored.items()}, weights)
    if costs is None:
        costs = np.zeros((len(names), len(full)))
    use_synergy = synergy and lam > 0
    pairs = adjacent_pairs(layers)
    syn = _synergy_weights(ctx, scored) if use_synergy and pairs else [0.0] * len(pairs)
    problem = AllocationProblem(costs=costs, pairs=pairs, synergy=syn, lam=lam if synergy else 0.0, **layer_args)
    label = "+".join(k if v == 1 else f"{v:g}*{k}" for k, v in weights.items())
    plan = solve_plan(problem, synergy=synergy, scorer=label, **solve_args)
    plan.p_grid = p_grid if att_names else None
    return plan

