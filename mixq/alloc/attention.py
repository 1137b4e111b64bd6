"""Attention matmuls in the allocation problem (``allocate(..., attention=True)``).

Each supported attention module adds two layers to the problem, ``<module>.qk`` (bits of Q, K) and
``<module>.pv`` (bits of P, V), in execution order between the module's input and output projections
(:func:`mixq.scores.inventory.build_inventory`). They have no weights (size budgets are unaffected)
and BOPs = MACs x b1 x b2 with MACs = heads x N x M x D per image. They may take only the equal
pairs ``(a, a)`` of the activation bit-widths among the candidates (one rule for both operands; Q and
K share one step rule in :class:`mixq.attention.QuantAttention`); an equal pair that is not itself a
Linear candidate is added to the problem for the attention layers alone.

Costs per scorer (the same perturbation the Linear scorers use, one matmul alone, the rest float):

* "kl": the matmul alone at the lowest pair, KL per image, normalized per image together with the
  Linears' two probes (it counts as activation noise), extrapolated as ``I * 4^-(b - b_min)``;
* "measured" and "sensitivity": the matmul alone at every pair, measured.

LRP has no rule for a matmul between two activations: "lrp" with attention is refused.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np

ATTENTION_SCORERS = ("kl", "measured", "sensitivity")


def attention_candidates(cands: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The bit pairs an attention matmul may take: (a, a) for every activation bit-width among ``cands``."""
    return [(a, a) for a in sorted({a for _, a in cands})]


def problem_candidates(cands: Sequence[tuple[int, int]], ops: Sequence[str]
                       ) -> tuple[list[tuple[int, int]], Optional[list[Optional[list[int]]]]]:
    """(candidates of the problem, allowed candidate indices per layer) for layers of kinds ``ops``:
    Linears take ``cands``, attention matmuls their equal pairs (appended when missing)."""
    cands = [tuple(c) for c in cands]
    if all(op == "linear" for op in ops):
        return cands, None
    att = attention_candidates(cands)
    full = cands + [c for c in att if c not in cands]
    lin_idx = list(range(len(cands))) if len(full) > len(cands) else None
    att_idx = [full.index(c) for c in att]
    return full, [lin_idx if op == "linear" else att_idx for op in ops]


def check_scorers(weights: dict[str, float]) -> None:
    """Refuse, before any scoring, a scorer that has no costs for attention matmuls."""
    bad = [s for s, w in weights.items() if w > 0 and s not in ATTENTION_SCORERS]
    if bad:
        raise ValueError(f"scorer {bad} cannot score attention matmuls (LRP has no rule for a product of two "
                         f"activations); with attention=True use {list(ATTENTION_SCORERS)} or a mix of them")


def _columns(att_table: np.ndarray, att_cands: Sequence[tuple[int, int]], full: Sequence[tuple[int, int]]) -> np.ndarray:
    """[La, Ca, ...] measured at the equal pairs -> [La, C, ...] over the problem's candidates; a
    candidate (w, a) the layer may not take gets the value at (a, a) (finite, never chosen)."""
    index = {c[1]: k for k, c in enumerate(att_cands)}
    return att_table[:, [index[a] for _, a in full]]


def merge_rows(ops: Sequence[str], linear: np.ndarray, attention: np.ndarray) -> np.ndarray:
    """Stack per-layer rows in problem order: ``linear`` rows for "linear" layers, ``attention`` rows for the rest."""
    is_lin = np.array([op == "linear" for op in ops])
    out = np.zeros((len(ops),) + linear.shape[1:], dtype=np.float64)
    out[is_lin] = linear
    out[~is_lin] = attention
    return out


def pad_linear(table: np.ndarray, n_full: int) -> np.ndarray:
    """Linear rows [Ll, C, ...] widened to the problem's candidates: the added attention-only columns
    get each row's minimum (finite; the Linears may not take them, and the minimum never makes one
    the noisiest column)."""
    extra = n_full - table.shape[1]
    if extra == 0:
        return table
    fill = np.repeat(table.min(axis=1, keepdims=True), extra, axis=1)
    return np.concatenate([table, fill], axis=1)


def attention_tables(
    score: Callable[[list[tuple[int, int]]], dict],
    weights: dict[str, float],
    ops: Sequence[str],
    cands: Sequence[tuple[int, int]],
    full: Sequence[tuple[int, int]],
    lowest_a: int,
) -> dict[str, Any]:
    """The attention rows each scorer needs, from ``score(pairs)`` (:func:`mixq.scores.attention.attention_scores`
    bound to the model and data). Measures every pair if "measured" or "sensitivity" is asked for,
    else the lowest only. Returns {"raw_lowest": [La, N], "per_image": [La, C, N] or None,
    "kl": [La, C] or None} over the problem's candidates ``full``."""
    att = attention_candidates(cands)
    every = any(weights.get(s, 0) > 0 for s in ("measured", "sensitivity"))
    pairs = att if every else [(lowest_a, lowest_a)]
    result = score(pairs)
    per_image = np.asarray(result["per_image"], dtype=np.float64)  # [La, P, N]
    raw_lowest = per_image[:, pairs.index((lowest_a, lowest_a)), :]
    if not every:
        return {"raw_lowest": raw_lowest, "per_image": None, "kl": None}
    full_per_image = _columns(per_image, att, full)
    return {"raw_lowest": raw_lowest, "per_image": full_per_image, "kl": full_per_image.mean(axis=2)}


def kl_attention_costs(share: np.ndarray, full: Sequence[tuple[int, int]], lowest_a: int) -> np.ndarray:
    """KL-scorer costs of attention matmuls [La, C]: mean per-image share ``share`` [La, N] at the
    lowest pair, times 4^-(b - b_lowest) (the activation noise model; a candidate (w, a) the layer may
    not take is priced at (a, a))."""
    fa = np.array([4.0 ** (-(a - lowest_a)) for _, a in full])
    return share.mean(axis=1)[:, None] * fa[None, :]
