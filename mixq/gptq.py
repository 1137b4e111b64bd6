"""GPTQ weight rounding: per-channel integer weights chosen to minimize the layer's output error.

Round-to-nearest treats every weight alone. GPTQ (Frantar et al., 2022) rounds the input columns
one at a time and spreads each column's rounding error over the columns not yet rounded, weighted
by the inverse of the calibration Hessian H = X^T X, so the errors cancel in W X rather than in W.
The result is still the format of :mod:`mixq.formats` (symmetric, one fp32 scale per output
channel, the scale from the same MSE clip search), so every backend runs it unchanged. At 4 bits
this is what keeps a ViT usable; at 8 bits it changes little.
"""

from __future__ import annotations

import torch

from . import formats

BLOCK = 128  # columns per lazy-update block (the paper's batching; the result does not depend on it)


def hessian(samples: torch.Tensor) -> torch.Tensor:
    """H = X^T X / R in float64 from activation rows X [R, K]."""
    if samples.dim() != 2 or samples.shape[0] == 0:
        raise ValueError(f"GPTQ needs activation samples [R > 0, K], got shape {tuple(samples.shape)}")
    if not torch.isfinite(samples).all():
        raise ValueError("GPTQ activation samples contain NaN/Inf; check the calibration data")
    x = samples.detach().to(torch.float64)
    return x.T @ x / x.shape[0]


def quantize_weight_gptq(w: torch.Tensor, bits: int, h: torch.Tensor, damp: float = 0.01,
                         clip_search: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [N, K], scale fp32 [N]) for weights ``w`` [N, K] given the input Hessian ``h`` [K, K].

    ``damp`` adds that fraction of the mean diagonal to H, which keeps the Cholesky factorization
    stable when calibration rows are few or channels are nearly dead.
    """
    formats.check_bits(bits)
    if w.dim() != 2 or h.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"GPTQ needs w [N, K] and H [K, K], got {tuple(w.shape)} and {tuple(h.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("weights contain NaN or Inf; cannot quantize")
    _, scale = formats.quantize_weight(w, bits, clip_search=clip_search)
    lim = formats.qmax(bits)
    W = w.detach().to(torch.float64).clone()
    H = h.detach().to(torch.float64).clone()
    diag = torch.diagonal(H)
    dead = diag <= 0
    # Damping relative to the live channels only, so the result does not depend on the input scale.
    ref = diag[~dead].mean() if (~dead).any() else torch.tensor(1.0, dtype=H.dtype)
    H[dead, dead] = ref
    W[:, dead] = 0.0
    H += damp * ref * torch.eye(H.shape[0], dtype=H.dtype)
    try:
        L = torch.linalg.cholesky(H)
        U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except RuntimeError as e:  # not positive definite even after damping
        raise ValueError(f"GPTQ: calibration Hessian is not positive definite (damp={damp}); "
                         "use more calibration data or a larger damp") from e
    s = scale.to(torch.float64)[:, None]
    Q = torch.zeros_like(W)
    k = W.shape[1]
    for start in range(0, k, BLOCK):
        end = min(start + BLOCK, k)
        Wb = W[:, start:end].clone()
        Eb = torch.zeros_like(Wb)
        Ub = U[start:end, start:end]
        for j in range(end - start):
            col = Wb[:, j:j + 1]
            q = formats.round_half_even((col / s).clamp(-lim, lim))
            Q[:, start + j:start + j + 1] = q
            err = (col - q * s) / Ub[j, j]
            Wb[:, j:] -= err * Ub[j:j + 1, j:]
            Eb[:, j:j + 1] = err
        W[:, end:] -= Eb @ U[start:end, end:]
    return Q.to(torch.int8), scale
