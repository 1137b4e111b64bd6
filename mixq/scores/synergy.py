"""Cross-layer synergy (Mix-QSAM): how strongly two adjacent layers' importances move together.

The paper's per-image approximation of the causal mutual-information synergy: for adjacent l, m,
``S[l, m] = log(1 + mean_images 1 / (|I_l - I_m| + eps))`` with ``I`` the per-image normalized KL
importances. Layers whose importances track each other get a large S, and the allocation keeps them
at similar precision.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def synergy_scores(per_image: Sequence[Sequence[float]], pairs: Sequence[tuple[int, int]],
                   eps: Optional[float] = None) -> list[float]:
    """One synergy weight per pair. ``eps`` defaults to 0.1 / L (importances are shares summing to 1)."""
    I = torch.as_tensor(per_image, dtype=torch.float64)
    if I.dim() != 2:
        raise ValueError(f"per_image must be [layers, images], got shape {tuple(I.shape)}")
    L = I.shape[0]
    eps = 0.1 / max(L, 1) if eps is None else eps
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    out = []
    for l, m in pairs:
        if not (0 <= l < L and 0 <= m < L):
            raise ValueError(f"pair {(l, m)} out of range for {L} layers")
        out.append(float(torch.log1p((1.0 / ((I[l] - I[m]).abs() + eps)).mean())))
    return out
