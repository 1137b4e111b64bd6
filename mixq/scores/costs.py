"""Per-choice allocation costs from layer scores: how a (w_bits, a_bits) choice turns importance into cost."""

from __future__ import annotations

from typing import Sequence

import numpy as np


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
