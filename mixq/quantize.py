"""``quantize_(model, config, calib_data)``: replace a model's Linears with QuantLinear, in place.

The config classes live in :mod:`mixq.config`; this module runs them.
"""

from __future__ import annotations

import difflib
import fnmatch
import sys
import warnings
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from .attention import (is_attention, is_supported_attention, quantized_attention, supported_attention_names,
                        unsupported_attention, wrap_attention)
from .config import AttentionConfig, CalibrationConfig, LinearConfig, QuantConfig
from .data import batch_to, iter_batches, model_device, run_model, tensors_in
from .modules import FilterFn, find_linears, quantized_layers, set_module
from .nn import QuantLinear
from .progress import progress_bar

if TYPE_CHECKING:  # for the annotation only: quantize_ never imports the allocation floor
    from .alloc.plan import Plan

__all__ = ["calibrate", "find_linears", "quantize_", "quantized_layers", "set_simulate"]


def _linear_filter(linear: LinearConfig, filter_fn: Optional[FilterFn]) -> FilterFn:
    """The Linears the config may quantize: ``filter_fn``'s, and with ``layer_bits_only`` the listed ones."""
    listed = linear.layer_bits if linear.layer_bits_only else None
    return lambda name, m: (filter_fn is None or bool(filter_fn(name, m))) and (listed is None or name in listed)


def _targets(model: nn.Module, linear: LinearConfig, filter_fn: Optional[FilterFn]) -> dict[str, nn.Linear]:
    linears = find_linears(model, _linear_filter(linear, filter_fn))
    targets = {n: m for n, m in linears.items() if not any(fnmatch.fnmatchcase(n, p) for p in linear.skip)}
    all_modules = dict(model.named_modules())
    for name in linear.layer_bits:
        if name in targets:
            continue
        if name not in all_modules:
            close = difflib.get_close_matches(name, list(linears), n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise KeyError(f"layer_bits names module {name!r}, which does not exist in the model{hint}")
        raise KeyError(
            f"layer_bits names {name!r} ({type(all_modules[name]).__name__}), which is not a quantizable "
            "Linear under this config (not an nn.Linear, excluded by filter_fn, or listed in skip)"
        )
    if not targets:
        raise ValueError("no Linear layer to quantize: the model has none, or filter_fn/skip excluded them all")
    return targets


class _RowSampler:
    """A uniform random sample of at most ``capacity`` rows from a stream (bottom-k on random keys)."""

    def __init__(self, capacity: int, generator: torch.Generator) -> None:
        self.capacity, self.gen = capacity, generator
        self.rows: Optional[torch.Tensor] = None
        self.keys: Optional[torch.Tensor] = None

    def add(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).to("cpu", torch.float32)
        keys = torch.rand(rows.shape[0], generator=self.gen)
        if self.rows is not None:
            rows, keys = torch.cat([self.rows, rows]), torch.cat([self.keys, keys])
        if rows.shape[0] > self.capacity:
            keep = torch.topk(keys, self.capacity, largest=False).indices
            rows, keys = rows[keep], keys[keep]
        self.rows, self.keys = rows, keys


def _is_layernorm(m: nn.Module) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.GroupNorm)) or type(m).__name__.endswith("LayerNorm")


@torch.no_grad()
def calibrate(
    model: nn.Module, targets: dict[str, nn.Linear], calib_data: Any, config: CalibrationConfig, progress: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Run the float model on the data; return sampled input rows per target and LayerNorm producers."""
    gen = torch.Generator().manual_seed(config.seed)
    samplers = {n: _RowSampler(config.max_calib_rows, gen) for n in targets}
    fed_by: dict[str, str] = {}
    ln_outputs: dict[int, tuple[torch.Tensor, str]] = {}
    handles = []

    def ln_hook(name):
        def hook(mod, inp, out):
            if isinstance(out, torch.Tensor):
                ln_outputs[id(out)] = (out, name)
        return hook

    def linear_hook(name):
        def hook(mod, args):
            x = args[0]
            if x.shape[-1] != mod.in_features:
                return
            samplers[name].add(x)
            hit = ln_outputs.get(id(x))
            if hit is not None and hit[0] is x:
                fed_by[name] = hit[1]
        return hook

    for name, m in model.named_modules():
        if _is_layernorm(m):
            handles.append(m.register_forward_hook(ln_hook(name)))
    for name, m in targets.items():
        handles.append(m.register_forward_pre_hook(linear_hook(name)))
    was_training = model.training
    model.eval()
    device = model_device(model)
    try:
        for batch in progress_bar(iter_batches(calib_data, config.batch_size), "calibrating", progress):
            ln_outputs.clear()
            run_model(model, batch_to(batch, device))
    finally:
        for h in handles:
            h.remove()
        ln_outputs.clear()
        model.train(was_training)
    missing = [n for n, s in samplers.items() if s.rows is None]
    if missing:
        raise ValueError(
            f"{len(missing)} Linear layer(s) never ran on the calibration data (e.g. {missing[:3]}); "
            "exclude them with skip/filter_fn or use calibration data that reaches them"
        )
    return {n: s.rows for n, s in samplers.items()}, fed_by


def quantize_(model: nn.Module, config: "QuantConfig | Plan | None" = None, calib_data: Any = None, *,
              filter_fn: Optional[FilterFn] = None, progress: bool = True) -> nn.Module:
    """Replace the selected Linears of ``model`` with QuantLinear, calibrated on ``calib_data``.

    ``config`` is a :class:`QuantConfig` (default: ``QuantConfig()``, every Linear at W8A8) or a
    :class:`mixq.alloc.Plan` (its :meth:`~mixq.alloc.Plan.to_config`: exactly the planned layers).
    ``filter_fn(name, module)`` selects the Linears (and, with ``config.attention``, the attention
    modules holding a selected Linear); None: all. Calibration data is needed unless every layer
    uses dynamic activation scales and round-to-nearest weights. Sets ``model.mixq_config`` to the
    config used (None when the model already held quantized layers: no one config built it), which
    :func:`mixq.save` records. Returns the same model object.
    """
    config = _as_config(config)
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be a callable (name, module) -> bool or None, got {filter_fn!r}")
    built_here = not quantized_layers(model) and not quantized_attention(model)
    linear = config.linear
    targets = _targets(model, linear, filter_fn)
    _check_weights(targets)
    attention: dict[str, dict] = {}
    if config.attention is not None:
        attention = _planned_attention(model, config.attention) if config.attention.layer_bits else {
            n: {} for n in _attention_targets(model, config.attention, _linear_filter(linear, filter_fn))}
    samples: dict[str, torch.Tensor] = {}
    fed_by: dict[str, str] = {}
    weight_method = linear.weight_method
    if weight_method == "auto":
        weight_method = "gptq" if calib_data is not None else "rtn"
    if linear.act_quant != "dynamic" or weight_method == "gptq":
        if calib_data is None:
            need = f"act_quant={linear.act_quant!r}" if linear.act_quant != "dynamic" else "weight_method='gptq'"
            raise ValueError(f"{need} needs calibration data; pass calib_data")
        samples, fed_by = calibrate(model, targets, calib_data, config.calibration, progress)
    mode = "smooth" if linear.act_quant == "auto" else linear.act_quant
    rot = config.rotation
    if rot is not None and mode not in ("smooth", "dynamic"):
        raise ValueError(f"QuantConfig.rotation needs LinearConfig.act_quant 'auto', 'smooth' or 'dynamic' (the "
                         f"rotation precedes a per-token quantize), got {linear.act_quant!r}")
    for i, name in enumerate(progress_bar(list(targets), "quantizing", progress)):
        w_bits, a_bits = linear.bits_for(name)
        seed = rot.seed + i if rot is not None and rot.rotates(name) else None
        q = QuantLinear.from_float(targets[name], w_bits, a_bits, act_quant=mode, act_samples=samples.get(name),
                                   simulate=config.simulate, backend=config.backend,
                                   smooth_alpha=linear.smooth_alpha, weight_method=weight_method,
                                   rotation_seed=seed)
        set_module(model, name, q)
    if linear.fold_layernorm and fed_by:
        check = batch_to(next(iter_batches(calib_data, config.calibration.batch_size)), model_device(model))
        _fold_layernorms(model, fed_by, check)
    if config.attention is not None:  # after the Linears: the wrapper keeps the (now quantized) projections
        qk_bits, v_bits, p_bits = config.attention.bits(linear.a_bits)
        for name, bits in attention.items():
            kw = {"qk_bits": qk_bits, "v_bits": v_bits, "p_bits": p_bits, **bits}  # per-matmul bits of layer_bits
            set_module(model, name, wrap_attention(model.get_submodule(name), p_grid=config.attention.p_grid,
                                                   simulate=config.simulate, backend=config.backend, **kw))
    model.mixq_config = config if built_here else None
    return model


def _as_config(config: Any) -> QuantConfig:
    if config is None:
        return QuantConfig()
    if isinstance(config, QuantConfig):
        return config
    # A Plan exists only once mixq.alloc.plan is loaded; looking it up there, not importing it, keeps
    # this floor from reaching up to the allocation floor.
    plan_module = sys.modules.get("mixq.alloc.plan")
    if plan_module is not None and isinstance(config, plan_module.Plan):
        return config.to_config()
    raise TypeError(f"config must be a mixq.QuantConfig or a mixq.Plan, got {type(config).__name__}")


def _planned_attention(model: nn.Module, config: AttentionConfig) -> dict[str, dict]:
    """Attention module name -> wrap_attention's bit arguments, from ``config.layer_bits``; every
    name must be a supported attention module of the model that ``config.skip`` does not list."""
    per_module: dict[str, dict[str, tuple[int, int]]] = {}
    for key, bits in config.layer_bits.items():
        module, _, op = key.rpartition(".")
        per_module.setdefault(module, {})[op] = bits
    modules = dict(model.named_modules())
    out: dict[str, dict] = {}
    for name, ops_bits in per_module.items():
        m = modules.get(name)
        if m is None:
            known = [n for n, mod in modules.items() if is_supported_attention(mod)]
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {[c + '.' + next(iter(ops_bits)) for c in close]}?" if close else ""
            raise KeyError(f"AttentionConfig.layer_bits names {name + '.' + next(iter(ops_bits))!r}, but the model "
                           f"has no module {name!r}{hint}")
        if not is_supported_attention(m):
            raise KeyError(f"AttentionConfig.layer_bits names {name!r} ({type(m).__module__}.{type(m).__name__}), "
                           "which is not an attention module mixq can quantize (supported: "
                           f"{', '.join(supported_attention_names())})")
        if any(fnmatch.fnmatchcase(name, p) for p in config.skip):
            raise ValueError(f"AttentionConfig.layer_bits names {name!r}, which AttentionConfig.skip keeps float; "
                             "remove one or the other")
        kw: dict = {"float_ops": tuple(op for op in ("qk", "pv") if op not in ops_bits)}
        if "qk" in ops_bits:
            kw["qk_bits"] = ops_bits["qk"][0]
        if "pv" in ops_bits:
            kw["p_bits"], kw["v_bits"] = ops_bits["pv"]
        out[name] = kw
    return out


def _attention_targets(model: nn.Module, config: AttentionConfig, linear_filter: FilterFn) -> dict[str, nn.Module]:
    """The attention modules ``config`` quantizes; refuses, naming them, the ones it cannot.

    An attention module is a target unless ``config.skip`` matches its name or ``linear_filter``
    selects none of its own Linears (so a filter that quantizes the SAM image encoder alone leaves
    the decoder's attention float, and does not refuse a kind that the filter never reaches)."""
    def selected(name: str, m: nn.Module) -> bool:
        if any(fnmatch.fnmatchcase(name, p) for p in config.skip):
            return False
        prefix = f"{name}." if name else ""
        return any(isinstance(sub, nn.Linear) and linear_filter(prefix + sub_name, sub)
                   for sub_name, sub in m.named_modules() if sub_name)

    modules = dict(model.named_modules())
    bad = {n: t for n, t in unsupported_attention(model).items() if selected(n, modules[n])}
    if bad:
        first = next(iter(bad))
        raise NotImplementedError(
            f"QuantConfig.attention is set: {len(bad)} attention module(s) of a kind mixq cannot quantize "
            f"({first!r} is {bad[first]}; supported: {', '.join(supported_attention_names())}); "
            "list them in AttentionConfig.skip to keep them float, or leave QuantConfig.attention None")
    found = {n: m for n, m in modules.items() if is_supported_attention(m) and selected(n, m)}
    if not found and not quantized_attention(model) and not any(is_attention(m) for m in model.modules()):
        raise ValueError("QuantConfig.attention is set but the model has no attention module: nothing for it to "
                         "quantize; leave QuantConfig.attention None")
    return found


def _check_weights(targets: dict[str, nn.Linear]) -> None:
    """Refuse, before any calibration, the float layers that cannot be quantized, naming them."""
    for name, lin in targets.items():
        for what, t in (("weight", lin.weight), ("bias", lin.bias)):
            if t is None:
                continue
            if t.is_meta:
                raise ValueError(f"layer {name!r}: its {what} is on the meta device (no data): materialize the "
                                 "model and load its weights (to_empty() + load_state_dict) before quantize_")
            if not t.is_floating_point():
                raise TypeError(f"layer {name!r}: {what} has dtype {t.dtype}; quantize_ takes a float model")
            if not torch.isfinite(t).all():
                raise ValueError(f"layer {name!r}: the float model's {what} contains NaN/Inf; fix the model "
                                 "(not the calibration data) before quantizing")


def _fold_layernorms(model: nn.Module, fed_by: dict[str, str], check_batch: Any) -> list[str]:
    """Fold each LayerNorm that feeds exactly one channel-wise or smooth QuantLinear into it.

    Channel mode takes the norm over (the fused LayerNorm + quantize kernel runs it); smooth mode divides the
    norm's gamma and beta by its channel factors. Either changes what the LayerNorm module outputs,
    which is only right if nothing else reads it; hooks cannot see functional consumers, so
    :func:`_sole_consumers` checks by poisoning. Returns the folded norms' names.
    """
    modules = dict(model.named_modules())
    consumers: dict[str, list[str]] = {}
    for lin, ln in fed_by.items():
        consumers.setdefault(ln, []).append(lin)
    pairs = []
    for ln_name, lins in consumers.items():
        ln, q = modules.get(ln_name), modules.get(lins[0])
        if (len(lins) == 1 and isinstance(ln, nn.LayerNorm) and isinstance(q, QuantLinear)
                and tuple(ln.normalized_shape) == (q.in_features,)
                and (q.act_quant == "channel" or (q.act_quant == "smooth" and ln.weight is not None))):
            pairs.append((ln_name, lins[0]))
    pairs = _sole_consumers(model, pairs, check_batch)
    for ln_name, lin_name in pairs:
        ln, q = modules[ln_name], modules[lin_name]
        if q.act_quant == "smooth":
            q.prescale_producer(ln)
        else:
            set_module(model, ln_name, nn.Identity())
            set_module(model, lin_name, q.fold_layernorm(ln, ln_name))
    return [ln for ln, _ in pairs]


@torch.no_grad()
def _sole_consumers(model: nn.Module, pairs: list[tuple[str, str]], batch: Any) -> list[tuple[str, str]]:
    """The (norm, linear) pairs whose norm output reaches the model output only through the linear.

    The norm's output is replaced by NaN and the linear alone gets the real values back; a NaN in
    any other leaf module's input or in the model's output means something else read the norm.
    (Leaf inputs are watched because a quantized layer would turn NaN into integers.) Exact, unlike
    comparing outputs.
    """
    if not pairs:
        return []

    def poisoned_run(subset: list[tuple[str, str]]) -> bool:
        clean: dict[int, torch.Tensor] = {}
        handles = []
        leaked = []

        def watch(mod, args):
            if not leaked and any(not torch.isfinite(t).all() for t in tensors_in(list(args)) if t.is_floating_point()):
                leaked.append(mod)

        def ln_hook(mod, inp, out):
            bad = torch.full_like(out, float("nan"))
            clean[id(bad)] = out
            return bad

        def lin_hook(mod, args):
            real = clean.get(id(args[0]))
            return (real, *args[1:]) if real is not None else None

        for ln_name, lin_name in subset:
            handles.append(model.get_submodule(ln_name).register_forward_hook(ln_hook))
            handles.append(model.get_submodule(lin_name).register_forward_pre_hook(lin_hook))
        # Leaves only: a container (an attention block) is handed the norm output and passes it on.
        handles += [m.register_forward_pre_hook(watch) for m in model.modules()
                    if next(m.children(), None) is None]  # registered after the restores
        try:
            out = run_model(model, batch)
        finally:
            for h in handles:
                h.remove()
        return not leaked and all(torch.isfinite(t).all() for t in tensors_in(out) if t.is_floating_point())

    if not poisoned_run([]):
        warnings.warn("mixq: the model sees non-finite values on the check batch; no LayerNorm was folded")
        return []
    if poisoned_run(pairs):
        return pairs
    ok = [p for p in pairs if poisoned_run([p])]
    shared = [ln for ln, _ in pairs if ln not in {o[0] for o in ok}]
    warnings.warn(f"mixq: LayerNorm output read by more than the quantized Linear, not folded: {shared}")
    return ok


def set_simulate(model: nn.Module, simulate: bool) -> nn.Module:
    """Switch every QuantLinear and QuantAttention of ``model`` between the integer kernels and float
    simulation."""
    for m in quantized_layers(model).values():
        m.set_simulate(simulate)
    for a in quantized_attention(model).values():
        a.set_simulate(simulate)
    return model
