"""``allocate``: score a model's Linears, build the allocation problem and solve it."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from ..scores.costs import noise_factor, split_kl_costs
from .attention import (attention_tables, check_scorers, kl_attention_costs, merge_rows, pad_linear,
                        problem_candidates)
from .budgets import check_bops_budget, parse_size_budget
from .plan import Plan, solve_plan
from .problem import DEFAULT_CANDIDATES, AllocationProblem, Budget

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
    softmax_quant: str = "log2",
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
    softmax_quant: the probability grid the attention matmuls are scored (and the plan quantizes)
        with, "log2" or "uniform"; used only with ``attention=True``.
    """
    from ..formats import check_p_grid
    from ..scores.attention import attention_scores
    from ..scores.inventory import adjacent_pairs, build_inventory
    from ..scores.kl import kl_importance
    from ..scores.lrp import lrp_importance
    from ..scores.measured import measured_cost_table, measured_scores
    from ..scores.outputs import check_output_fn
    from ..scores.sensitivity import sensitivity_scores
    from ..scores.synergy import synergy_scores

    cands = [tuple(map(int, c)) for c in (candidates if candidates is not None else DEFAULT_CANDIDATES)]
    weights = _scorer_weights(scorer)
    if synergy is None:
        synergy = set(weights) != {"measured"}
    if budget is not None:
        parse_size_budget(budget)  # bad budgets fail here, not after minutes of scoring
    check_bops_budget(bops_budget)
    check_output_fn(output_fn)
    if not isinstance(attention, bool):
        raise TypeError(f"attention must be True or False, got {attention!r}")
    if attention:
        check_scorers(weights)
        check_p_grid(softmax_quant)
    layers = build_inventory(model, calib_data, filter_fn, batch_size, attention=attention)
    names = [l.name for l in layers]
    ops = [l.op for l in layers]
    full, allowed = problem_candidates(cands, ops)
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
    lin_names = [n for n, op in zip(names, ops) if op == "linear"]
    att_names = [n for n, op in zip(names, ops) if op != "linear"]
    is_lin = np.array([op == "linear" for op in ops])
    layer_args = dict(names=names, candidates=full, weight_params=[l.weight_params for l in layers],
                      out_features=[l.out_features for l in layers], has_bias=[l.bias for l in layers],
                      macs=[l.macs for l in layers], pinned=pin_idx, allowed=allowed, ops=ops)
    if budget is not None or bops_budget is not None:
        # An infeasible budget fails here, not after the scoring (minutes with the measured scorer):
        # feasibility depends only on sizes, MACs, candidates and pins, so zero costs tell.
        solve_plan(AllocationProblem(costs=np.zeros((len(names), len(full))), pairs=[], synergy=[], lam=0.0,
                                     **layer_args), budget, bops_budget, synergy=False, time_limit=time_limit)
    lowest = (min(w for w, _ in cands), min(a for _, a in cands))
    noise = np.array([noise_factor(w, a) for w, a in cands]) / noise_factor(*lowest)
    common = dict(batch_size=batch_size, progress=progress, cache_dir=cache_dir)
    kl_costs = per_image = measured = att = None
    if att_names:
        att = attention_tables(lambda pairs: attention_scores(model, calib_data, att_names, pairs, output_fn,
                                                              softmax_quant, **common),
                               weights, ops, cands, full, lowest[1])
    if "measured" in weights and weights["measured"] > 0:
        result = measured_scores(model, calib_data, lin_names, cands, output_fn, **common)
        if att is not None:  # one table, so the per-image shares are normalized over every layer
            result = {"per_image": merge_rows(ops, pad_linear(np.asarray(result["per_image"]), len(full)),
                                              att["per_image"])}
        measured = measured_cost_table(result)
        per_image = measured[1]
    if "kl" in weights or (synergy and lam > 0 and per_image is None):
        # Two probes per layer, weights alone and activations alone at the lowest bits (the other
        # side at the highest candidate), so the costs tell weight noise from activation noise.
        highest = (max(w for w, _ in cands), max(a for _, a in cands))
        raw_w = np.asarray(kl_importance(model, calib_data, lin_names, output_fn, lowest[0], highest[1], **common)["raw"])
        raw_a = np.asarray(kl_importance(model, calib_data, lin_names, output_fn, highest[0], lowest[1], **common)["raw"])
        if att is not None:  # an attention matmul's probe counts as activation noise
            raw_w = merge_rows(ops, raw_w, np.zeros_like(att["raw_lowest"]))
            raw_a = merge_rows(ops, raw_a, att["raw_lowest"])
        kl_costs, kl_per_image = split_kl_costs(raw_w, raw_a, cands)
        if att is not None:
            kl_costs = merge_rows(ops, pad_linear(kl_costs[is_lin], len(full)),
                                  kl_attention_costs(kl_per_image[~is_lin], full, lowest[1]))
        per_image = kl_per_image if per_image is None else per_image
    costs = np.zeros((len(names), len(full)))
    for name, wgt in weights.items():
        if wgt == 0:
            continue
        if name == "kl":
            table = kl_costs
        elif name == "measured":
            table = measured[0]
        elif name == "lrp":
            table = np.asarray(lrp_importance(model, calib_data, lin_names, **common)["importance"])[:, None] * noise[None, :]
        else:
            table = np.asarray(sensitivity_scores(model, calib_data, lin_names, cands, output_fn, **common)["kl"])
            if att is not None:
                table = merge_rows(ops, pad_linear(table, len(full)), att["kl"])
        worst = table.max(axis=1).mean()
        costs += wgt * (table / worst if worst > 0 else table)
    pairs = adjacent_pairs(layers)
    syn = [0.0] * len(pairs)
    if synergy and lam > 0 and pairs:
        syn = synergy_scores(per_image.tolist(), pairs)
        top = max(syn) if syn else 0.0
        syn = [s / top if top > 0 else 0.0 for s in syn]
    problem = AllocationProblem(costs=costs, pairs=pairs, synergy=syn, lam=lam if synergy else 0.0, **layer_args)
    label = "+".join(k if v == 1 else f"{v:g}*{k}" for k, v in weights.items())
    plan = solve_plan(problem, budget, bops_budget, synergy=synergy, time_limit=time_limit, scorer=label)
    plan.p_grid = softmax_quant if att_names else None
    return plan
