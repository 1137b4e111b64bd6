"""KL importance (Mix-QSAM): how far the output distribution moves when one layer is perturbed.

For each layer alone: KL(P_fp || P_perturbed) per calibration image, normalized across layers per
image (so every image votes equally), then averaged over images.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..data import iter_batches
from ..progress import progress_bar
from . import cache
from .outputs import OutputFn, check_probs, kl_per_row, softmax_probs
from .perturb import input_amax, perturbed


# Part of every perturbation-score cache key: changing how layers are perturbed invalidates old scores.
PERTURBATION = "smooth-median-floor"


def prepare(model: nn.Module, calib_data: Any, names: list[str], output_fn: OutputFn, batch_size: int
            ) -> tuple[list, list[torch.Tensor], dict[str, torch.Tensor]]:
    """What every perturbation score needs once: the batches, the FP output distributions, and each
    layer's input amax (for the smooth-mode perturbation)."""
    batches = list(iter_batches(calib_data, batch_size))
    reference = [check_probs(output_fn(model, b)).detach() for b in batches]
    return batches, reference, input_amax(model, batches, names)


def perturbation_kl(model: nn.Module, batches: list, reference: list[torch.Tensor], name: str,
                    output_fn: OutputFn, w_bits: int, a_bits: int, mode: str,
                    act_amax: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KL per image [N] with layer ``name`` perturbed."""
    out = []
    with perturbed(model, name, w_bits, a_bits, mode, act_amax):
        for b, p in zip(batches, reference):
            out.append(kl_per_row(p, output_fn(model, b).detach()))
    return torch.cat(out)


def normalize_per_image(raw: torch.Tensor) -> torch.Tensor:
    """[L, N] -> shares over layers per image (columns sum to 1; an all-zero column stays zero)."""
    total = raw.sum(dim=0, keepdim=True)
    return torch.where(total > 0, raw / total.clamp_min(1e-300), torch.zeros_like(raw))


def kl_importance(model: nn.Module, calib_data: Any, names: list[str], output_fn: Optional[OutputFn] = None,
                  w_bits: int = 4, a_bits: int = 4, mode: str = "quantize", batch_size: int = 8,
                  progress: bool = True, cache_dir: cache.CacheDir = None) -> dict:
    """Per-layer KL importance.

    Returns ``{"names", "raw": [L][N] KL, "per_image": [L][N] shares, "importance": [L]}``.
    ``mode="ablate"`` zeroes the layer's output instead of quantizing it (the causal-MI proxy).
    """
    output_fn = output_fn or softmax_probs
    params = {"kind": "kl", "names": names, "w": w_bits, "a": a_bits, "mode": mode, "bs": batch_size,
              "act": PERTURBATION, "out": cache.callable_key(output_fn)}

    def compute() -> dict:
        with torch.no_grad():
            batches, reference, amax = prepare(model, calib_data, names, output_fn, batch_size)
            raw = torch.stack([
                perturbation_kl(model, batches, reference, n, output_fn, w_bits, a_bits, mode, amax.get(n))
                for n in progress_bar(names, f"KL importance ({mode})", progress)
            ])
        shares = normalize_per_image(raw)
        return {"names": list(names), "raw": raw.tolist(), "per_image": shares.tolist(),
                "importance": shares.mean(dim=1).tolist()}

    return cache.cached(cache_dir, "kl", model, calib_data, params, compute)
