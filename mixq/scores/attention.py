"""Attention matmuls as allocation layers: which modules, their MACs, and their perturbation costs.

Each supported attention module (:func:`mixq.attention.is_supported_attention`) contributes two
layers, ``<module>.qk`` (QK^T; bits of Q, K) and ``<module>.pv`` (softmax.V; bits of P, V). They have
no weights. Their MACs are counted inside the module while it runs (``q.numel() * M`` for QK^T,
``p.numel() * D`` for P.V: heads * N * M * D per sequence, with the real token counts of windowed
and cross attention). Their costs come from perturbing one matmul alone, the way ``quantize_``
quantizes it (:func:`mixq.attention.wrap_attention` with the other matmul in ``float_ops``), and
measuring KL(P_fp || P) of the output distribution per calibration image, as the Linear scorers do.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from ..modules import set_module
from ..progress import progress_bar
from . import cache
from .outputs import OutputFn, kl_per_row, softmax_probs

OPS = ("qk", "pv")
# Part of the cache key of attention scores: changing how a matmul is perturbed invalidates them.
ATTENTION_PERTURBATION = "wrap_attention-simulate-v1"


def split_name(name: str) -> tuple[str, str]:
    """``"blocks.3.attn.qk"`` -> ``("blocks.3.attn", "qk")``; ValueError for a name that is not one."""
    module, _, op = name.rpartition(".")
    if not module or op not in OPS:
        raise ValueError(f"{name!r} does not name an attention matmul: expected '<attention module>.qk' or "
                         "'<attention module>.pv'")
    return module, op


def selects_attention(name: str, module: nn.Module, filter_fn: Optional[Callable] = None) -> bool:
    """The rule ``quantize_`` uses: an attention module is a target when ``filter_fn`` (a Linear filter)
    accepts one of its own Linears, or when there is no filter."""
    if filter_fn is None:
        return True
    prefix = f"{name}." if name else ""
    return any(isinstance(sub, nn.Linear) and filter_fn(prefix + sub_name, sub)
               for sub_name, sub in module.named_modules() if sub_name)


def attention_modules(model: nn.Module, filter_fn: Optional[Callable] = None) -> dict[str, nn.Module]:
    """The model's float attention modules whose matmuls mixq can quantize, by name, selected by
    :func:`selects_attention`.

    Raises NotImplementedError naming a selected attention module of a kind it cannot quantize (it
    would stay float while the plan claims attention is covered), and ValueError when none is left."""
    from ..attention import is_supported_attention, quantized_attention, supported_attention_names, unsupported_attention

    done = quantized_attention(model)
    if done:
        raise ValueError(f"the model already has quantized attention ({next(iter(done))!r}); allocate bits on the "
                         "float model")
    modules = dict(model.named_modules())
    bad = {n: t for n, t in unsupported_attention(model).items() if selects_attention(n, modules[n], filter_fn)}
    if bad:
        first = next(iter(bad))
        raise NotImplementedError(
            f"attention=True: {len(bad)} attention module(s) of a kind mixq cannot quantize ({first!r} is "
            f"{bad[first]}; supported: {', '.join(supported_attention_names())}); allocate with attention=False")
    found = {n: m for n, m in modules.items() if is_supported_attention(m) and selects_attention(n, m, filter_fn)}
    if not found:
        raise ValueError("attention=True but the model has no attention module whose matmuls mixq can quantize "
                         f"(supported: {', '.join(supported_attention_names())}) among those filter_fn selects; "
                         "allocate with attention=False")
    return found


def _counting(module: nn.Module, macs: dict[str, int], name: str) -> nn.Module:
    """The quantized-attention wrapper of ``module`` running both matmuls in float and counting their
    MACs into ``macs[name + ".qk"]`` / ``[".pv"]`` (shapes as they reach the matmuls)."""
    from ..attention import wrap_attention

    w = wrap_attention(module, 8, simulate=True)
    if not (hasattr(w, "_scores") and hasattr(w, "_mix")):  # pragma: no cover - a change in mixq.attention
        raise RuntimeError(f"{type(w).__name__} has no _scores/_mix to count the attention MACs of {name!r}")

    def scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        macs[f"{name}.qk"] += q.numel() * k.shape[-2]
        return q.to(torch.float32) @ k.to(torch.float32).transpose(-2, -1)

    def mix(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        macs[f"{name}.pv"] += p.numel() * v.shape[-1]
        return p.to(torch.float32) @ v.to(torch.float32)

    w._scores, w._mix = scores, mix  # instance attributes shadow the methods
    return w


@contextlib.contextmanager
def counting_attention(model: nn.Module, modules: dict[str, nn.Module]) -> Iterator[tuple[dict[str, nn.Module], dict[str, int]]]:
    """Within the block the named attention modules are replaced by float wrappers that count MACs;
    yields (wrappers by module name, MACs by matmul name, summed over every call). Always restored."""
    macs = {f"{n}.{op}": 0 for n in modules for op in OPS}
    wrappers = {n: _counting(m, macs, n) for n, m in modules.items()}
    try:
        for n, w in wrappers.items():
            set_module(model, n, w)
        yield wrappers, macs
    finally:
        for n, m in modules.items():
            set_module(model, n, m)


@contextlib.contextmanager
def perturbed_attention(model: nn.Module, name: str, bits: tuple[int, int], p_grid: str = "log2"
                        ) -> Iterator[None]:
    """Within the block only the attention matmul ``name`` (``<module>.qk`` or ``.pv``) runs on codes at
    ``bits`` (Q, K bits or P, V bits), simulated; the module's other matmul and everything else stay
    float. The float module comes back after."""
    from ..attention import wrap_attention

    module_name, op = split_name(name)
    original = model.get_submodule(module_name)
    b1, b2 = (int(b) for b in bits)
    if op == "qk":
        if b1 != b2:
            raise ValueError(f"{name}: Q and K share one bit-width, got {(b1, b2)}")
        wrapper = wrap_attention(original, b1, p_grid=p_grid, simulate=True, float_ops=("pv",))
    else:
        wrapper = wrap_attention(original, 8, p_bits=b1, v_bits=b2, p_grid=p_grid, simulate=True, float_ops=("qk",))
    set_module(model, module_name, wrapper)
    try:
        yield
    finally:
        set_module(model, module_name, original)


def _kl_run(model: nn.Module, batches: list, reference: list[torch.Tensor], output_fn: OutputFn) -> list[float]:
    return torch.cat([kl_per_row(p, output_fn(model, b).detach()) for b, p in zip(batches, reference)]).tolist()


def attention_scores(model: nn.Module, calib_data: Any, names: Sequence[str], candidates: Sequence[tuple[int, int]],
                     output_fn: Optional[OutputFn] = None, p_grid: str = "log2", batch_size: int = 8,
                     progress: bool = True, cache_dir: cache.CacheDir = None) -> dict:
    """KL(P_fp || P) per image with one attention matmul alone at each of ``candidates`` (bit pairs).

    Returns ``{"names", "candidates", "per_image": [L][C][N], "kl": [L][C]}`` (``kl``: mean over images).
    The KL scorer passes the lowest candidate only and extrapolates; "measured" passes them all.
    """
    from .kl import prepare

    output_fn = output_fn or softmax_probs
    names = list(names)
    for n in names:
        split_name(n)
    params = {"kind": "attention", "names": names, "cands": [list(map(int, c)) for c in candidates],
              "bs": batch_size, "softmax": p_grid, "how": ATTENTION_PERTURBATION,
              "out": cache.callable_key(output_fn)}

    def compute() -> dict:
        with torch.no_grad():
            batches, reference, _ = prepare(model, calib_data, [], output_fn, batch_size)
            per_image = []
            for name in progress_bar(names, "attention matmul costs", progress):
                row = []
                for bits in candidates:
                    with perturbed_attention(model, name, bits, p_grid):
                        row.append(_kl_run(model, batches, reference, output_fn))
                per_image.append(row)
        return {"names": names, "candidates": [list(map(int, c)) for c in candidates], "per_image": per_image,
                "kl": [[sum(v) / len(v) for v in row] for row in per_image]}

    return cache.cached(cache_dir, "attention", model, calib_data, params, compute)
