"""``quantize_(model, config, calib_data)``: replace a model's Linears with QuantLinear, in place."""

from __future__ import annotations

import difflib
import fnmatch
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from . import formats
from .attention import (is_attention, is_supported_attention, quantized_attention, supported_attention_names,
                        unsupported_attention, wrap_attention)
from .data import batch_to, iter_batches, model_device, run_model, tensors_in
from .modules import FilterFn, find_linears, quantized_layers, set_module
from .nn import ACT_MODES, WEIGHT_METHODS, QuantLinear
from .progress import progress_bar

__all__ = ["QuantConfig", "calibrate", "find_linears", "quantize_", "quantized_layers", "set_simulate"]


@dataclass
class QuantConfig:
    """What to quantize and how.

    ``layer_bits`` maps module names to (w_bits, a_bits) and overrides the defaults; ``skip`` holds
    names or fnmatch patterns kept in float. ``act_quant="auto"`` is ``"smooth"``: calibrated
    channel factors (``smooth_alpha``) move activation outliers into the weight columns and a dynamic
    per-token step quantizes what is left, which holds up at 4-6 bits and on images unlike the
    calibration set (static ranges do not: see docs/DESIGN_NOTES.md). ``fold_layernorm`` folds a
    LayerNorm that feeds only one such Linear into it: the channel factors go into its gamma and beta
    (smooth), or the norm runs inside the quantize kernel (channel). ``weight_method="auto"`` is GPTQ
    when calibration data is given, else round-to-nearest.

    ``quantize_attention=True`` also puts the attention matmuls (QK^T, softmax.V) of every supported
    attention module on integer codes: Q, K, V at ``attn_bits`` (default ``a_bits``), probabilities at
    ``softmax_bits`` on the ``softmax_quant`` grid. ``attention_layer_bits`` gives per-matmul bits instead
    (what an allocation plan's :meth:`~mixq.alloc.Plan.to_config` sets), keyed like the plan's layers:
    ``"<attention module>.qk": (Q bits, K bits)`` (equal: Q and K share one bit-width) and
    ``"<attention module>.pv": (P bits, V bits)``. When it is given it is the complete list: a matmul
    it does not name stays float, and an attention module with neither entry is left as it is.
    """

    w_bits: int = 8
    a_bits: int = 8
    layer_bits: dict[str, tuple[int, int]] = field(default_factory=dict)
    filter_fn: Optional[FilterFn] = None
    skip: tuple[str, ...] = ()
    act_quant: str = "auto"
    simulate: bool = False
    backend: Optional[str] = None
    max_calib_rows: int = 2048
    batch_size: int = 8
    seed: int = 0
    fold_layernorm: bool = False
    smooth_alpha: float = 0.5
    weight_method: str = "auto"
    quantize_attention: bool = False
    attn_bits: Optional[int] = None
    softmax_bits: Optional[int] = None
    softmax_quant: str = "log2"
    attention_layer_bits: dict[str, tuple[int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        formats.check_bits(self.w_bits, "w_bits")
        formats.check_bits(self.a_bits, "a_bits")
        if self.act_quant not in ACT_MODES + ("auto",):
            raise ValueError(f"unknown act_quant={self.act_quant!r}; allowed: {list(ACT_MODES + ('auto',))}")
        for name, bits in self.layer_bits.items():
            if not (isinstance(bits, (tuple, list)) and len(bits) == 2):
                raise ValueError(f"layer_bits[{name!r}] must be a (w_bits, a_bits) pair, got {bits!r}")
            formats.check_bits(bits[0], f"w_bits of layer {name!r}")
            formats.check_bits(bits[1], f"a_bits of layer {name!r}")
        if self.weight_method not in WEIGHT_METHODS + ("auto",):
            raise ValueError(f"unknown weight_method={self.weight_method!r}; allowed: {list(WEIGHT_METHODS + ('auto',))}")
        if not 0.0 <= self.smooth_alpha <= 1.0:
            raise ValueError(f"smooth_alpha must be in [0, 1], got {self.smooth_alpha}")
        if self.max_calib_rows < 1:
            raise ValueError(f"max_calib_rows must be >= 1, got {self.max_calib_rows}")
        if not isinstance(self.quantize_attention, bool):
            raise TypeError(f"quantize_attention must be True or False, got {self.quantize_attention!r}")
        if self.attn_bits is not None:
            formats.check_bits(self.attn_bits, "attn_bits")
        if self.softmax_bits is not None:
            formats.check_bits(self.softmax_bits, "softmax_bits")
        formats.check_p_grid(self.softmax_quant)
        self._check_attention_layer_bits()
        self.skip = tuple(self.skip)

    def _check_attention_layer_bits(self) -> None:
        if not isinstance(self.attention_layer_bits, dict):
            raise TypeError(f"attention_layer_bits must be a dict '<attention module>.qk'/'.pv' -> (bits, bits), "
                            f"got {type(self.attention_layer_bits).__name__}")
        if self.attention_layer_bits and not self.quantize_attention:
            raise ValueError("attention_layer_bits is given but quantize_attention=False: set quantize_attention=True "
                             "to quantize the attention matmuls it lists")
        for name, bits in self.attention_layer_bits.items():
            module, _, op = str(name).rpartition(".")
            if not module or op not in ("qk", "pv"):
                raise ValueError(f"attention_layer_bits key {name!r} does not name an attention matmul: use "
                                 "'<attention module>.qk' (Q, K bits) or '<attention module>.pv' (P, V bits)")
            first, second = ("Q", "K") if op == "qk" else ("P", "V")
            if not (isinstance(bits, (tuple, list)) and len(bits) == 2):
                raise ValueError(f"attention_layer_bits[{name!r}] must be a ({first} bits, {second} bits) pair, got {bits!r}")
            formats.check_bits(bits[0], f"{first} bits of {name!r}")
            formats.check_bits(bits[1], f"{second} bits of {name!r}")
            if op == "qk" and int(bits[0]) != int(bits[1]):
                raise ValueError(f"attention_layer_bits[{name!r}] = {tuple(bits)}: Q and K share one bit-width (one "
                                 "dynamic step rule for both), so the pair must be equal, e.g. (6, 6)")

    def attention_bits(self) -> tuple[int, int]:
        """(bits of Q, K, V; bits of the softmax probabilities) when quantize_attention is on."""
        a = int(self.a_bits if self.attn_bits is None else self.attn_bits)
        return a, int(a if self.softmax_bits is None else self.softmax_bits)

    def bits_for(self, name: str) -> tuple[int, int]:
        w, a = self.layer_bits.get(name, (self.w_bits, self.a_bits))
        return int(w), int(a)


def _targets(model: nn.Module, config: QuantConfig) -> dict[str, nn.Linear]:
    linears = find_linears(model, config.filter_fn)
    targets = {n: m for n, m in linears.items() if not any(fnmatch.fnmatchcase(n, p) for p in config.skip)}
    all_modules = dict(model.named_modules())
    for name in config.layer_bits:
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
    model: nn.Module, targets: dict[str, nn.Linear], calib_data: Any, config: QuantConfig, progress: bool = True
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


def quantize_(model: nn.Module, config: Any = None, calib_data: Any = None, progress: bool = True) -> nn.Module:
    """Replace the selected Linears of ``model`` with QuantLinear, calibrated on ``calib_data``.

    ``config`` is a :class:`QuantConfig` or any object with ``to_config()`` (an allocation plan).
    Calibration data is needed unless every layer uses dynamic activation scales.
    Returns the same model object.
    """
    if config is None:
        config = QuantConfig()
    elif hasattr(config, "to_config"):
        config = config.to_config()
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig or a plan with to_config(), got {type(config).__name__}")
    targets = _targets(model, config)
    _check_weights(targets)
    attention: dict[str, dict] = {}
    if config.quantize_attention:
        attention = _planned_attention(model, config) if config.attention_layer_bits else {
            n: {} for n in _attention_targets(model, config)}
    samples: dict[str, torch.Tensor] = {}
    fed_by: dict[str, str] = {}
    weight_method = config.weight_method
    if weight_method == "auto":
        weight_method = "gptq" if calib_data is not None else "rtn"
    if config.act_quant != "dynamic" or weight_method == "gptq":
        if calib_data is None:
            need = f"act_quant={config.act_quant!r}" if config.act_quant != "dynamic" else "weight_method='gptq'"
            raise ValueError(f"{need} needs calibration data; pass calib_data")
        samples, fed_by = calibrate(model, targets, calib_data, config, progress)
    for name in progress_bar(list(targets), "quantizing", progress):
        lin = targets[name]
        w_bits, a_bits = config.bits_for(name)
        mode = config.act_quant
        if mode == "auto":
            mode = "smooth"
        q = QuantLinear.from_float(lin, w_bits, a_bits, act_quant=mode, act_samples=samples.get(name),
                                   simulate=config.simulate, backend=config.backend,
                                   smooth_alpha=config.smooth_alpha, weight_method=weight_method)
        set_module(model, name, q)
    if config.fold_layernorm and fed_by:
        check = batch_to(next(iter_batches(calib_data, config.batch_size)), model_device(model))
        _fold_layernorms(model, fed_by, check)
    attn_bits, softmax_bits = config.attention_bits()
    for name, bits in attention.items():  # after the Linears: the quantized attention keeps the (now quantized) projections
        kw = {"attn_bits": attn_bits, "softmax_bits": softmax_bits, **bits}  # per-matmul bits of attention_layer_bits
        set_module(model, name, wrap_attention(model.get_submodule(name), softmax_quant=config.softmax_quant,
                                               simulate=config.simulate, backend=config.backend, **kw))
    return model


def _planned_attention(model: nn.Module, config: QuantConfig) -> dict[str, dict]:
    """Attention module name -> wrap_attention's bit arguments, from ``config.attention_layer_bits``; every
    name must be a supported attention module of the model that ``skip`` does not list."""
    per_module: dict[str, dict[str, tuple[int, int]]] = {}
    for key, bits in config.attention_layer_bits.items():
        module, _, op = key.rpartition(".")
        per_module.setdefault(module, {})[op] = (int(bits[0]), int(bits[1]))
    modules = dict(model.named_modules())
    out: dict[str, dict] = {}
    for name, ops_bits in per_module.items():
        m = modules.get(name)
        if m is None:
            known = [n for n, mod in modules.items() if is_supported_attention(mod)]
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {[c + '.' + next(iter(ops_bits)) for c in close]}?" if close else ""
            raise KeyError(f"attention_layer_bits names {name + '.' + next(iter(ops_bits))!r}, but the model has no module "
                           f"{name!r}{hint}")
        if not is_supported_attention(m):
            raise KeyError(f"attention_layer_bits names {name!r} ({type(m).__module__}.{type(m).__name__}), which is not "
                           f"an attention module mixq can quantize (supported: {', '.join(supported_attention_names())})")
        if any(fnmatch.fnmatchcase(name, p) for p in config.skip):
            raise ValueError(f"attention_layer_bits names {name!r}, which skip keeps float; remove one or the other")
        kw: dict = {"float_ops": tuple(op for op in ("qk", "pv") if op not in ops_bits)}
        if "qk" in ops_bits:
            kw["attn_bits"] = ops_bits["qk"][0]
        if "pv" in ops_bits:
            kw["softmax_bits"], kw["pv_bits"] = ops_bits["pv"]
        out[name] = kw
    return out


def _attention_targets(model: nn.Module, config: QuantConfig) -> dict[str, nn.Module]:
    """The attention modules quantize_attention replaces; refuses, naming them, the ones it cannot.

    An attention module is a target unless ``skip`` matches its name or ``filter_fn`` selects none of
    its own Linears (so a filter that quantizes the SAM image encoder alone leaves the decoder's
    attention float, and does not refuse a kind that the filter never reaches)."""
    def selected(name: str, m: nn.Module) -> bool:
        if any(fnmatch.fnmatchcase(name, p) for p in config.skip):
            return False
        if config.filter_fn is None:
            return True
        prefix = f"{name}." if name else ""
        return any(isinstance(sub, nn.Linear) and config.filter_fn(prefix + sub_name, sub)
                   for sub_name, sub in m.named_modules() if sub_name)

    modules = dict(model.named_modules())
    bad = {n: t for n, t in unsupported_attention(model).items() if selected(n, modules[n])}
    if bad:
        first = next(iter(bad))
        raise NotImplementedError(
            f"quantize_attention=True: {len(bad)} attention module(s) of a kind mixq cannot quantize "
            f"({first!r} is {bad[first]}; supported: {', '.join(supported_attention_names())}); "
            "list them in skip to keep them float, or set quantize_attention=False")
    found = {n: m for n, m in modules.items() if is_supported_attention(m) and selected(n, m)}
    if not found and not quantized_attention(model) and not any(is_attention(m) for m in model.modules()):
        raise ValueError("quantize_attention=True but the model has no attention module: nothing for the "
                         "flag to quantize; set quantize_attention=False")
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
