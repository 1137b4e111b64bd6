"""LRP importance (Mix-QViT): the share of the target's relevance that flows through each Linear.

Relevance is propagated by gradient x input under transformer-aware rules, applied with hooks for
the duration of the pass only:

* Linear: the epsilon rule ``R_in = x * W^T (R_out / (z + eps * sign z))``, made by scaling the
  gradient at the Linear's output by ``z / (z + eps sign z)`` (the forward value is unchanged);
* LayerNorm: locally linear (its standard deviation is held constant);
* softmax (attention and elsewhere): locally linear, i.e. held constant, so relevance flows through
  the value path; ``scaled_dot_product_attention`` is rewritten with a held-constant softmax;
* GELU/SiLU/ReLU/Tanh/Sigmoid modules: locally linear gates ``y = x * (f(x) / x)``.

With every op locally linear, gradient x input equals LRP and relevance is conserved through a
block up to what biases and epsilon absorb (checked in tests). A layer's relevance is the sum of
``z * dR/dz`` over its outputs for an image; its importance is ``|R_l| / sum_k |R_k|`` per image,
averaged over images.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..data import iter_batches, run_model
from ..progress import progress_bar
from . import cache
from .kl import normalize_per_image
from .outputs import _tensor_output

TargetFn = Callable[[Any], torch.Tensor]
_GATES = (nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh, nn.Sigmoid)


def default_target(out: Any) -> torch.Tensor:
    """Per-image scalar to explain: the top logit for [B, K] outputs, the sum of the map otherwise."""
    t = _tensor_output(out)
    if t.dim() == 2:
        return t.gather(1, t.argmax(dim=1, keepdim=True)).squeeze(1)
    return t.reshape(t.shape[0], -1).sum(dim=1)


def _const_softmax(fn: Callable) -> Callable:
    def wrapped(*args, **kwargs):
        return fn(*args, **kwargs).detach()
    return wrapped


def _const_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    logits = (query @ key.transpose(-2, -1)) * scale
    if is_causal:
        L, S = query.shape[-2], key.shape[-2]
        logits = logits.masked_fill(torch.ones(L, S, dtype=torch.bool, device=query.device).triu(1), float("-inf"))
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + attn_mask
    return torch.softmax(logits, dim=-1).detach() @ value


@contextlib.contextmanager
def lrp_rules(model: nn.Module, eps: float = 1e-6) -> Iterator[None]:
    """Install the LRP rules on ``model`` (and torch's softmax/attention) for the block's duration."""
    handles = []

    def linear_hook(mod, args, z):
        s = (z / (z + eps * torch.where(z >= 0, 1.0, -1.0))).detach()
        return z * s + (z - z * s).detach()

    def ln_hook(mod, args, out):
        x = args[0]
        mean = x.mean(dim=-1, keepdim=True)
        std = torch.sqrt(x.var(dim=-1, unbiased=False, keepdim=True) + mod.eps).detach()
        y = (x - mean) / std
        if mod.weight is not None:
            y = y * mod.weight
        if getattr(mod, "bias", None) is not None:
            y = y + mod.bias
        return y

    def gate_hook(mod, args, out):
        x = args[0]
        safe = torch.where(x == 0, torch.ones_like(x), x)
        gate = torch.where(x == 0, torch.zeros_like(x), out / safe).detach()
        return x * gate

    for m in model.modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, nn.LayerNorm):
            handles.append(m.register_forward_hook(ln_hook))
        elif isinstance(m, _GATES):
            handles.append(m.register_forward_hook(gate_hook))
    saved = (torch.softmax, F.softmax, torch.Tensor.softmax, F.scaled_dot_product_attention)
    torch.softmax = _const_softmax(saved[0])
    F.softmax = _const_softmax(saved[1])
    torch.Tensor.softmax = _const_softmax(saved[2])
    F.scaled_dot_product_attention = _const_sdpa
    try:
        yield
    finally:
        torch.softmax, F.softmax, torch.Tensor.softmax, F.scaled_dot_product_attention = saved
        for h in handles:
            h.remove()


def lrp_relevance(model: nn.Module, batch: Any, names: list[str], target_fn: Optional[TargetFn] = None,
                  eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Relevance per layer and image [L, B] (signed), and the target values [B] it started from."""
    target_fn = target_fn or default_target
    modules = {n: model.get_submodule(n) for n in names}
    outputs: dict[str, torch.Tensor] = {}

    def keep(name):
        def fn(mod, args, out):
            out.retain_grad()
            outputs[name] = out
        return fn

    with torch.enable_grad(), lrp_rules(model, eps):
        handles = [m.register_forward_hook(keep(n)) for n, m in modules.items()]  # after the rule hooks
        try:
            target = target_fn(run_model(model, batch))
            B = target.shape[0]
            target.sum().backward()
        finally:
            for h in handles:
                h.remove()
    rel = torch.zeros(len(names), B, dtype=torch.float64)
    for i, n in enumerate(names):
        z = outputs.get(n)
        if z is None or z.grad is None:
            continue
        r = (z.detach() * z.grad).double()
        rel[i] = r.reshape(B, -1).sum(dim=1) if r.shape[0] == B else r.sum() / B
    model.zero_grad(set_to_none=True)
    return rel, target.detach().double()


def lrp_importance(model: nn.Module, calib_data: Any, names: list[str], target_fn: Optional[TargetFn] = None,
                   eps: float = 1e-6, batch_size: int = 8, progress: bool = True,
                   cache_dir: cache.CacheDir = None) -> dict:
    """``{"names", "per_image": [L][N] relevance shares, "importance": [L]}``."""
    params = {"kind": "lrp", "names": names, "eps": eps, "bs": batch_size,
              "target": cache.callable_key(target_fn)}

    def compute() -> dict:
        parts = [lrp_relevance(model, b, names, target_fn, eps)[0]
                 for b in progress_bar(list(iter_batches(calib_data, batch_size)), "LRP relevance", progress)]
        shares = normalize_per_image(torch.cat(parts, dim=1).abs())
        return {"names": list(names), "per_image": shares.tolist(), "importance": shares.mean(dim=1).tolist()}

    return cache.cached(cache_dir, "lrp", model, calib_data, params, compute)
