"""Measured costs: every (layer, candidate) measured, quantized the way ``quantize_`` quantizes it.

The KL scorer measures two numbers per layer and extrapolates every other choice with the noise
model I·4^-(bits); the Pareto sweep (bench/pareto.py, docs/ALLOCATION_EXPERIMENTS.md) found that
measuring each choice instead pays: GPTQ and smoothing change how error falls with bits. Here each
layer alone is replaced by the ``QuantLinear`` that ``quantize_`` would build at each candidate
(smooth activations from the same calibration rows, GPTQ weights by default), everything else stays
float, and KL(P_fp || P_q) of ``output_fn`` is recorded per calibration image.

Cost: one full forward over the calibration batches per (layer, candidate). Caching the FP inputs of
each transformer block and running only the blocks after the perturbed layer (as
``mixq.eval.pareto.measured_costs`` does for DINOv2) would halve it; that is left for later.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..modules import find_linears, set_module
from ..nn import QuantLinear
from ..progress import progress_bar
from . import cache
from .kl import prepare
from .outputs import OutputFn, kl_per_row, softmax_probs

MEASURED = "quantize_-smooth-v1"  # part of the cache key: how the layer is quantized


def measured_scores(model: nn.Module, calib_data: Any, names: list[str], candidates: list[tuple[int, int]],
                    output_fn: Optional[OutputFn] = None, batch_size: int = 8, weight_method: str = "gptq",
                    act_quant: str = "smooth", max_calib_rows: int = 2048, progress: bool = True,
                    cache_dir: cache.CacheDir = None) -> dict:
    """KL(P_fp || P) per image for every (layer, candidate), the layer quantized as ``quantize_`` would.

    Returns ``{"names", "candidates", "per_image": [L][C][N], "kl": [L][C]}`` (``kl``: the mean over images).
    """
    from ..quantize import QuantConfig, calibrate

    output_fn = output_fn or softmax_probs
    if weight_method not in ("gptq", "rtn"):
        raise ValueError(f"weight_method must be 'gptq' or 'rtn', got {weight_method!r}")
    if act_quant not in ("smooth", "dynamic"):
        raise ValueError(f"act_quant must be 'smooth' or 'dynamic', got {act_quant!r}")
    params = {"kind": "measured", "names": names, "cands": [list(c) for c in candidates], "bs": batch_size,
              "weights": weight_method, "act": act_quant, "rows": max_calib_rows, "how": MEASURED,
              "out": getattr(output_fn, "__qualname__", repr(output_fn))}

    def compute() -> dict:
        model.eval()
        wanted = set(names)
        with torch.no_grad():
            batches, reference, _ = prepare(model, calib_data, [], output_fn, batch_size)
            targets = find_linears(model, lambda n, m: n in wanted)
            missing = [n for n in names if n not in targets]
            if missing:
                raise ValueError(f"layers {missing[:4]} are not float nn.Linear modules of the model")
            config = QuantConfig(filter_fn=lambda n, m: n in wanted, max_calib_rows=max_calib_rows,
                                 batch_size=batch_size)
            samples, _ = calibrate(model, targets, calib_data, config, progress=False)
            per_image = []
            for name in progress_bar(names, "measured costs", progress):
                original = targets[name]
                row = []
                for w, a in candidates:
                    q = QuantLinear.from_float(original, w, a, act_quant=act_quant, act_samples=samples.get(name),
                                               simulate=True, weight_method=weight_method)
                    set_module(model, name, q)
                    try:
                        row.append(torch.cat([kl_per_row(p, output_fn(model, b).detach())
                                              for b, p in zip(batches, reference)]).tolist())
                    finally:
                        set_module(model, name, original)
                per_image.append(row)
        return {"names": list(names), "candidates": [list(c) for c in candidates], "per_image": per_image,
                "kl": [[sum(v) / len(v) for v in row] for row in per_image]}

    return cache.cached(cache_dir, "measured", model, calib_data, params, compute)


def measured_cost_table(result: dict) -> tuple[Any, Any]:
    """(costs [L, C], per-image shares [L, N]) from :func:`measured_scores`: costs are the mean KL,
    normalized later like every scorer's (mean 1 per layer at the noisiest candidate); the shares
    are each layer's KL at the noisiest candidate over the per-image total (for the synergy term)."""
    import numpy as np

    v = np.asarray(result["per_image"], dtype=np.float64)  # [L, C, N]
    if v.ndim != 3 or not np.isfinite(v).all():
        raise ValueError("measured per-image KL must be finite, shaped [layers][candidates][images]")
    costs = v.mean(axis=2)
    noisiest = int(np.argmax(costs.sum(axis=0)))
    raw = v[:, noisiest, :]
    total = raw.sum(axis=0, keepdims=True)
    shares = np.where(total > 0, raw / np.maximum(total, 1e-300), 0.0)
    return costs, shares
