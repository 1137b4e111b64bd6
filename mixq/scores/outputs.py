"""Output distributions for KL scores: one interface for classifiers, SAM masks and dense heads.

An :data:`OutputFn` maps ``(model, batch)`` to probabilities ``[B, D]`` whose rows sum to 1, so the
KL importance and sensitivity code never needs to know what kind of model it is scoring.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..data import run_model

OutputFn = Callable[[nn.Module, Any], torch.Tensor]


def _tensor_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (list, tuple)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict):
        for key in ("logits", "masks", "low_res_logits", "saliency", "pred"):
            if isinstance(out.get(key), torch.Tensor):
                return out[key]
    raise TypeError(f"cannot find a tensor in the model output ({type(out).__name__}); pass your own output_fn")


def softmax_probs(model: nn.Module, batch: Any) -> torch.Tensor:
    """Classifier logits [B, K] -> class probabilities [B, K]."""
    logits = _tensor_output(run_model(model, batch)).float()
    return torch.softmax(logits.reshape(logits.shape[0], -1), dim=-1)


def mask_probs(model: nn.Module, batch: Any) -> torch.Tensor:
    """Mask logits [B, ..., H, W] -> per-pixel sigmoid, normalized over all pixels of an image."""
    p = torch.sigmoid(_tensor_output(run_model(model, batch)).float())
    p = p.reshape(p.shape[0], -1) + 1e-12
    return p / p.sum(dim=1, keepdim=True)


def saliency_probs(model: nn.Module, batch: Any) -> torch.Tensor:
    """Saliency map [B, ..., H, W] (in [0, 1], or logits) -> normalized over pixels per image."""
    s = _tensor_output(run_model(model, batch)).float()
    if s.min() < 0 or s.max() > 1:
        s = torch.sigmoid(s)
    s = s.reshape(s.shape[0], -1) + 1e-12
    return s / s.sum(dim=1, keepdim=True)


def check_output_fn(output_fn: Any) -> None:
    """Fail before any scoring unless ``output_fn`` can be called as ``output_fn(model, batch)``."""
    import inspect

    if output_fn is None:
        return
    if not callable(output_fn):
        raise TypeError(f"output_fn must be callable as output_fn(model, batch), got {type(output_fn).__name__}")
    try:
        inspect.signature(output_fn).bind(None, None)
    except TypeError as e:
        raise TypeError(f"output_fn is called as output_fn(model, batch) -> probabilities [B, D] "
                        f"(rows summing to 1); {getattr(output_fn, '__qualname__', output_fn)!r} cannot take "
                        f"those two arguments: {e}") from None
    except ValueError:  # no signature to inspect (some builtins): let the first call decide
        pass


def kl_per_row(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """KL(p || q) per row, in float64; rows of p and q are distributions."""
    p, q = p.double(), q.double()
    return (p * (torch.log(p + eps) - torch.log(q + eps))).sum(dim=1).clamp_min(0.0)


def check_probs(p: torch.Tensor, where: str = "output_fn") -> torch.Tensor:
    if p.dim() != 2:
        raise ValueError(f"{where} must return probabilities [B, D], got shape {tuple(p.shape)}")
    sums = p.double().sum(dim=1)
    if not torch.allclose(sums, torch.ones_like(sums), atol=1e-3) or (p < 0).any():
        raise ValueError(f"{where} must return rows of non-negative numbers summing to 1 (row sums {sums[:4].tolist()})")
    return p
