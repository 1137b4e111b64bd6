"""Sensitivity (Mix-QViT): output error with one layer at one candidate, the rest in float."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..progress import progress_bar
from . import cache
from .kl import PERTURBATION, perturbation_kl, prepare
from .outputs import OutputFn, softmax_probs


def sensitivity_scores(model: nn.Module, calib_data: Any, names: list[str], candidates: list[tuple[int, int]],
                       output_fn: Optional[OutputFn] = None, batch_size: int = 8, progress: bool = True,
                       cache_dir: cache.CacheDir = None) -> dict:
    """Mean KL(P_fp || P) over images for every (layer, candidate): ``{"names", "candidates", "kl": [L][C]}``."""
    output_fn = output_fn or softmax_probs
    params = {"kind": "sensitivity", "names": names, "cands": [list(c) for c in candidates], "bs": batch_size,
              "act": PERTURBATION, "out": cache.callable_key(output_fn)}

    def compute() -> dict:
        with torch.no_grad():
            batches, reference, amax = prepare(model, calib_data, names, output_fn, batch_size)
            jobs = [(n, c) for n in names for c in candidates]
            values = [float(perturbation_kl(model, batches, reference, n, output_fn, w, a, "quantize", amax.get(n)).mean())
                      for n, (w, a) in progress_bar(jobs, "sensitivity", progress)]
        C = len(candidates)
        return {"names": list(names), "candidates": [list(c) for c in candidates],
                "kl": [values[i * C:(i + 1) * C] for i in range(len(names))]}

    return cache.cached(cache_dir, "sensitivity", model, calib_data, params, compute)
