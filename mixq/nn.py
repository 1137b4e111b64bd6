"""``QuantLinear``: a drop-in ``nn.Linear`` that runs on packed integer weights.

The integer path quantizes the input (per the contract in :mod:`mixq.formats`) and calls the
``mixq::*`` ops on the backend chosen for the weights' device, with the weights as a
:class:`~mixq.backends.PackedWeight`; dynamic and smooth layers make one call,
``mixq::linear_dynamic``, and the backend decides what to fuse. The simulation path computes the
same numbers with fake-quantized float tensors (useful for scoring and on devices without kernels).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import formats, ops, rotation
from .backends import PackedWeight, get_backend, select_backend

log = logging.getLogger("mixq")

ACT_MODES = ("dynamic", "static", "channel", "smooth")
# Input dtypes the kernels take; any other float input (float64) runs in fp32 and is cast back.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
WEIGHT_METHODS = ("rtn", "gptq")
_ANNOUNCED: set[tuple[str, str]] = set()


def _check_act_samples(samples: Optional[torch.Tensor], k: int, mode: str) -> torch.Tensor:
    if samples is None:
        raise ValueError(f"act_quant={mode!r} needs calibration samples (act_samples [R, {k}]); got None")
    samples = samples.reshape(-1, samples.shape[-1]) if samples.dim() else samples
    if samples.dim() != 2 or samples.shape[-1] != k:
        raise ValueError(f"act_samples must have last dim {k} (in_features), got shape {tuple(samples.shape)}")
    if samples.shape[0] == 0:
        raise ValueError("act_samples is empty: calibration produced no activations for this layer")
    if not torch.isfinite(samples).all():
        raise ValueError("act_samples contain NaN/Inf; check the calibration data and the float model")
    return samples.detach().to(torch.float32)


class QuantLinear(nn.Module):
    """Linear layer with w_bits packed weights and a_bits activations, both in {4, 6, 8}."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        w_bits: int = 8,
        a_bits: int = 8,
        act_quant: str = "dynamic",
        simulate: bool = False,
        backend: Optional[str] = None,
        device: torch.device | str | None = None,
        folded_norm: bool = False,
        norm_eps: float = 1e-5,
        input_prescaled: bool = False,
        rotated: bool = False,
    ) -> None:
        """``folded_norm``: a LayerNorm is folded in (channel mode; the layer then takes the pre-norm
        input). ``rotated``: the (smoothed) input is rotated by mixq.rotation's randomized Hadamard
        transform before the quantize (dynamic and smooth modes; the weights hold W R^T)."""
        super().__init__()
        formats.check_bits(w_bits, "w_bits")
        formats.check_bits(a_bits, "a_bits")
        if act_quant not in ACT_MODES:
            raise ValueError(f"unknown act_quant={act_quant!r}; allowed: {list(ACT_MODES)}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.w_bits, self.a_bits, self.act_quant = w_bits, a_bits, act_quant
        self.simulate = simulate
        self._backend_request = backend
        k, n = self.in_features, self.out_features
        kw = dict(device=device)
        self.register_buffer("qweight", torch.zeros(n, formats.row_bytes(k, w_bits), dtype=torch.uint8, **kw))
        self.register_buffer("w_scale", torch.ones(n, dtype=torch.float32, **kw))
        self.register_buffer("bias", torch.zeros(n, dtype=torch.float32, **kw) if bias else None)
        if folded_norm and act_quant != "channel":
            raise ValueError("a LayerNorm can only be folded into a QuantLinear with act_quant='channel'")
        if input_prescaled and act_quant != "smooth":
            raise ValueError("input_prescaled (producer already divides by the channel factors) needs act_quant='smooth'")
        self.folded_norm, self.norm_eps = folded_norm, float(norm_eps)
        self.norm_module = ""  # qualified name of the folded LayerNorm (now an Identity) in the model
        self.input_prescaled = input_prescaled
        if rotated and act_quant not in ("dynamic", "smooth"):
            raise ValueError(f"a rotated QuantLinear needs act_quant 'dynamic' or 'smooth', got {act_quant!r}")
        # The rotation's random signs D (persistent; None: not rotated) and its Hadamard block size.
        self.register_buffer("rot_signs", torch.ones(k, dtype=torch.float32, **kw) if rotated else None)
        self.rot_block = rotation.hadamard_block(k) if k else 1
        # Persistent: the static per-tensor step t and the channel factors s_k folded into the weight
        # columns (ones unless smooth/channel mode); the multipliers the kernels take are derived
        # from them in refresh(), so a checkpoint holds each number once.
        self.register_buffer("act_scale", torch.ones(1, dtype=torch.float32, **kw))
        self.register_buffer("act_channel_factor", torch.ones(k, dtype=torch.float32, **kw))
        # A folded producer LayerNorm, with 1/s_k in its affine parameters (run by the fused kernel).
        self.register_buffer("norm_weight", torch.ones(k, dtype=torch.float32, **kw) if folded_norm else None)
        self.register_buffer("norm_bias", torch.zeros(k, dtype=torch.float32, **kw) if folded_norm else None)
        # Derived: static/channel modes multiply x by static_inv_scale before rounding: 1/(s_k t) per
        # channel, or 1/t once the factors live in a folded LayerNorm (or in static mode); smooth mode
        # multiplies by smooth_inv = 1/s_k before the dynamic rule, unless the producer already did.
        self.register_buffer("static_inv_scale", None, persistent=False)
        self.register_buffer("smooth_inv", None, persistent=False)
        self.register_buffer("w_sim", None, persistent=False)
        self.packed: Optional[PackedWeight] = None
        self.backend = "reference"
        self.refresh()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        w_bits: int,
        a_bits: int,
        act_quant: str = "dynamic",
        act_samples: Optional[torch.Tensor] = None,
        simulate: bool = False,
        backend: Optional[str] = None,
        clip_search: bool = True,
        smooth_alpha: float = 0.5,
        weight_method: str = "rtn",
        rotation_seed: Optional[int] = None,
    ) -> "QuantLinear":
        """Quantize ``linear``; ``act_samples`` [R, in_features] calibrates static/channel scales, or
        the smooth factors (from its per-channel amax), and GPTQ's Hessian (``weight_method="gptq"``;
        "rtn" rounds to nearest). ``rotation_seed``: rotate the input space (signs drawn from it),
        after the smooth factors: the weights become W diag(s) R^T."""
        if weight_method not in WEIGHT_METHODS:
            raise ValueError(f"unknown weight_method={weight_method!r}; allowed: {list(WEIGHT_METHODS)}")
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_float expects an nn.Linear, got {type(linear).__name__}")
        if not torch.isfinite(linear.weight).all():
            raise ValueError("the float layer's weights contain NaN/Inf; fix the model before quantizing")
        device = linear.weight.device
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, w_bits, a_bits,
                act_quant, simulate, backend, device="cpu", rotated=rotation_seed is not None)
        w = linear.weight.detach().to("cpu", torch.float32)
        if act_quant == "smooth":
            samples = _check_act_samples(act_samples, linear.in_features, act_quant).cpu()
            s = formats.smooth_factors(samples.abs().amax(dim=0), w, smooth_alpha)
            w = w * s[None, :]
            m.act_channel_factor.copy_(s)
        elif act_quant in ("static", "channel"):
            samples = _check_act_samples(act_samples, linear.in_features, act_quant).cpu()
            if act_quant == "channel":
                s, t = formats.calibrate_channelwise(samples, a_bits)
                w = w * s[None, :]
                m.act_channel_factor.copy_(s)
            else:
                t = formats.calibrate_per_tensor(samples, a_bits)
            m.act_scale.copy_(t.reshape(1))
        if m.rot_signs is not None:
            m.rot_signs.copy_(rotation.random_signs(linear.in_features, rotation_seed))
            w = rotation.rotate_weight(w, m.rot_signs, m.rot_block)
        if weight_method == "gptq":
            from .gptq import hessian, quantize_weight_gptq

            samples = _check_act_samples(act_samples, linear.in_features, "dynamic (with GPTQ)").cpu()
            samples = samples / m.act_channel_factor  # in the basis the folded weights see
            if m.rot_signs is not None:
                samples = rotation.hadamard_fp32(samples, m.rot_signs, m.rot_block)
            h = hessian(samples)
            q, scale = quantize_weight_gptq(w, w_bits, h, clip_search=clip_search)
        else:
            q, scale = formats.quantize_weight(w, w_bits, clip_search=clip_search)
        m.qweight.copy_(formats.pack_weight(q, w_bits))
        m.w_scale.copy_(scale)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().float().cpu())
        m.refresh()
        return m.to(device)

    # ------------------------------------------------------------------ runtime state

    def refresh(self) -> None:
        """Re-choose the backend for the current device, re-derive the input multipliers and rebuild the
        runtime weights (after a move, a load, or a change to the persistent buffers)."""
        device = self.qweight.device
        name = self._backend_request or select_backend(device)
        self.backend = name
        self.static_inv_scale, self.smooth_inv = self._input_multipliers()
        smooth_inv = self.smooth_inv if self.act_quant == "smooth" and not self.input_prescaled else None
        if self.rot_signs is not None:
            smooth_inv = None  # a rotated layer smooths, then rotates, before the kernel (forward)
        self.packed = get_backend(name).pack(self.qweight, self.w_scale, self.bias, self.w_bits, self.in_features,
                                             self.out_features, smooth_inv)
        if self.simulate:
            # Integer-valued floats: the product below is exact in fp32 while no partial sum can reach
            # 2**24, else it runs in fp64 (also exact), so simulation reproduces the kernels bit for bit.
            exact32 = self.in_features * formats.qmax(self.w_bits) * formats.qmax(self.a_bits) < 2**24
            q = formats.unpack_weight(self.qweight, self.w_bits, self.in_features)
            self.w_sim = q.to(torch.float32 if exact32 else torch.float64)
        else:
            self.w_sim = None
        key = (name, str(device))
        if key not in _ANNOUNCED:
            _ANNOUNCED.add(key)
            log.info("mixq: QuantLinear runs on backend %r for device %s", name, device)

    @property
    def input_prescaled(self) -> bool:
        """Smooth mode: the producer (a LayerNorm's affine) already divides by s_k, so no runtime multiply."""
        return self._input_prescaled

    @input_prescaled.setter
    def input_prescaled(self, value: bool) -> None:
        self._input_prescaled = bool(value)
        if self.__dict__.get("packed") is not None:  # after construction the runtime weights follow
            self.refresh()

    def _input_multipliers(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(static_inv_scale, smooth_inv) from the persistent step and channel factors."""
        if self.act_quant == "smooth":
            return None, formats.reciprocal_fp32(self.act_channel_factor)
        if self.act_quant == "channel" and not self.folded_norm:
            return formats.reciprocal_fp32(self.act_channel_factor * self.act_scale), None
        if self.act_quant in ("channel", "static"):
            return formats.reciprocal_fp32(self.act_scale), None
        return None, None

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if hasattr(self, "qweight"):
            self.refresh()
        return out

    # Buffers older checkpoints hold that are now derived: each is checked against its derivation.
    LEGACY_BUFFERS = ("act_inv_scale",)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        legacy = {key: state_dict.pop(prefix + key) for key in self.LEGACY_BUFFERS if prefix + key in state_dict}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.refresh()
        old = legacy.get("act_inv_scale")
        if old is not None:
            derived = self.smooth_inv if self.act_quant == "smooth" else self.static_inv_scale
            if derived is not None and not torch.equal(old.to(derived.device), derived):
                raise ValueError(f"{prefix}act_inv_scale in the state dict disagrees with its act_scale and "
                                 "act_channel_factor: the checkpoint is corrupt or not from this layer")

    def fold_layernorm(self, norm: nn.LayerNorm, norm_name: str = "") -> "QuantLinear":
        """Take over the LayerNorm that feeds this layer: its output is quantized in the same pass.

        The channel factors fold into the norm's affine parameters (gamma / s_k, beta / s_k), so the
        fused kernel quantizes with the one per-tensor step t. The caller replaces ``norm`` with an
        identity; the layer then expects the pre-norm input.
        """
        if self.act_quant != "channel" or self.folded_norm:
            raise ValueError("only a QuantLinear with act_quant='channel' and no folded LayerNorm can take one over")
        if tuple(norm.normalized_shape) != (self.in_features,):
            raise ValueError(f"LayerNorm over {tuple(norm.normalized_shape)} cannot feed in_features={self.in_features}")
        dev = self.qweight.device
        gamma = norm.weight.detach().float() if norm.weight is not None else torch.ones(self.in_features, device=dev)
        beta = norm.bias.detach().float() if norm.bias is not None else torch.zeros(self.in_features, device=dev)
        s = self.act_channel_factor
        self.folded_norm, self.norm_eps, self.norm_module = True, float(norm.eps), norm_name
        self.norm_weight = (gamma / s).to(dev)
        self.norm_bias = (beta / s).to(dev)
        self.refresh()
        return self

    def prescale_producer(self, norm: nn.LayerNorm) -> "QuantLinear":
        """Fold this smooth layer's 1/s_k into the LayerNorm that feeds it (its gamma and beta), so
        the runtime multiply disappears; the norm stays a float module. Changes ``norm`` in place."""
        if self.act_quant != "smooth" or self.input_prescaled:
            raise ValueError("only a smooth QuantLinear that is not yet prescaled can fold into its producer")
        if tuple(norm.normalized_shape) != (self.in_features,) or norm.weight is None:
            raise ValueError(f"need an affine LayerNorm over ({self.in_features},), got {norm}")
        with torch.no_grad():
            inv = self.smooth_inv.to(norm.weight.device, norm.weight.dtype)
            norm.weight.mul_(inv)
            if norm.bias is not None:
                norm.bias.mul_(inv)
        self.input_prescaled = True
        return self

    def set_simulate(self, simulate: bool) -> "QuantLinear":
        self.simulate = simulate
        self.refresh()
        return self

    def dequantized_weight(self) -> torch.Tensor:
        """The effective float weight in the input's original basis (channel factors unfolded)."""
        q = formats.unpack_weight(self.qweight, self.w_bits, self.in_features)
        w = q.to(torch.float32) * self.w_scale[:, None]
        if self.rot_signs is not None:
            w = rotation.unrotate_weight(w, self.rot_signs, self.rot_block)
        return w / self.act_channel_factor[None, :]

    def layer_config(self) -> dict:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "w_bits": self.w_bits,
            "a_bits": self.a_bits,
            "act_quant": self.act_quant,
            "folded_norm": self.folded_norm,
            "norm_eps": self.norm_eps,
            "norm_module": self.norm_module,
            "input_prescaled": self.input_prescaled,
            "rotated": self.rot_signs is not None,
        }

    def extra_repr(self) -> str:
        mode = "simulate" if self.simulate else f"backend={self.backend}"
        norm = ", folded LayerNorm" if self.folded_norm else ", prescaled by producer" if self.input_prescaled else ""
        norm += ", rotated" if self.rot_signs is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, W{self.w_bits}A{self.a_bits}, act={self.act_quant}{norm}, {mode}")

    # ------------------------------------------------------------------ forward

    def _smoothed(self, x2: torch.Tensor) -> torch.Tensor:
        """Smooth mode's input in the folded basis, x / s_k (one fp32 multiply, the same on every path)."""
        return x2 if self.input_prescaled else x2.to(torch.float32) * self.smooth_inv

    def _rotated(self, x2: torch.Tensor) -> torch.Tensor:
        """A rotated layer's kernel input: smoothed (smooth mode), then the backend's Hadamard transform (fp32)."""
        x2 = self._smoothed(x2) if self.act_quant == "smooth" else x2
        return ops.hadamard_transform(x2.contiguous(), self.rot_signs, self.rot_block, self.backend)

    def _quantize_static_input(self, x2: torch.Tensor) -> torch.Tensor:
        """Static and channel modes: codes with the calibrated step (a folded LayerNorm in the same pass)."""
        if self.folded_norm:
            return ops.layernorm_quantize(x2, self.norm_weight, self.norm_bias, self.norm_eps, self.static_inv_scale,
                                          self.a_bits, self.backend)
        return ops.quantize_act_static(x2, self.static_inv_scale, self.a_bits, self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"QuantLinear expects input last dim {self.in_features} (in_features), got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"QuantLinear expects a floating-point input, got {x.dtype}")
        n = self.out_features
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:
            return x.new_zeros(*x.shape[:-1], n)
        if self.simulate:
            return self._forward_simulated(x2).to(x.dtype).reshape(*x.shape[:-1], n)
        # The integer path is inference: no gradient flows through the kernels (set_simulate(True)
        # gives a straight-through one). Detaching also lets torch.compile trace it with grad enabled.
        if x2.requires_grad:
            x2 = x2.detach()
        dtype = x.dtype if x.dtype in KERNEL_DTYPES else torch.float32
        xk = (x2 if dtype == x.dtype else x2.to(dtype)).contiguous()
        if self.rot_signs is not None:
            out = ops.linear_dynamic(self._rotated(xk), self.packed, self.a_bits, dtype)
        elif self.act_quant == "dynamic" or self.act_quant == "smooth":
            out = ops.linear_dynamic(xk, self.packed, self.a_bits, dtype)
        else:
            out = ops.linear(self._quantize_static_input(xk), self.act_scale, self.packed, dtype)
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        return out.reshape(*x.shape[:-1], n)

    def _forward_simulated(self, x2: torch.Tensor) -> torch.Tensor:
        """Fake quantization computed in float, equal bit for bit to the integer path.

        Activations are quantized by the same rule, the integer product is formed exactly in float,
        and the epilogue repeats the kernels' order. Gradients flow to the input straight through
        the rounding (the gradient of the dequantized float layer).
        """
        xf = x2.to(torch.float32)
        if self.folded_norm:
            xf = formats.layer_norm_fp32(xf, self.norm_weight, self.norm_bias, self.norm_eps)
            q, a_scale = formats.quantize_with_inv_scale(xf, self.static_inv_scale, self.a_bits), self.act_scale
        elif self.rot_signs is not None:
            xf = rotation.hadamard_fp32(self._smoothed(xf) if self.act_quant == "smooth" else xf, self.rot_signs,
                                        self.rot_block)
            q, a_scale = formats.quantize_act_dynamic(xf, self.a_bits)
        elif self.act_quant == "dynamic":
            q, a_scale = formats.quantize_act_dynamic(xf, self.a_bits)
        elif self.act_quant == "smooth":
            xf = self._smoothed(xf)
            q, a_scale = formats.quantize_act_dynamic(xf, self.a_bits)
        else:
            q, a_scale = formats.quantize_with_inv_scale(xf, self.static_inv_scale, self.a_bits), self.act_scale
            xf = xf / self.act_channel_factor  # the straight-through path works in the folded basis
        acc = (q.to(self.w_sim.dtype) @ self.w_sim.T).to(torch.float32)
        f = formats.epilogue_headroom(a_scale) if self.act_quant in ("dynamic", "smooth") else None
        step = a_scale.to(torch.float32) * f if f is not None else a_scale.to(torch.float32)
        out = acc * step.reshape(-1, 1) * self.w_scale.reshape(1, -1)
        if self.bias is not None:
            out = out + (self.bias * f if f is not None else self.bias)
        if f is not None:
            out = out / f
        if xf.requires_grad:
            x_hat = q.to(torch.float32) * a_scale.reshape(-1, 1)
            w_hat = self.w_sim.to(torch.float32) * self.w_scale[:, None]
            ste = F.linear(xf + (x_hat - xf).detach(), w_hat, self.bias)
            out = ste + (out - ste).detach()
        return out.to(x2.dtype)


def bf16_preferred() -> bool:
    """True where this CPU runs bfloat16 matmuls and convolutions natively (AVX512-BF16 or AMX-BF16),
    so the float parts of a quantized model are faster in bf16; False elsewhere (bf16 is emulated)."""
    from .timing import cpu_flags

    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_flags()))


def cast_float_parts(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Cast the parameters and buffers of every module except the QuantLinears to ``dtype``, in place.

    The quantized Linears keep their fp32 steps, bias and channel factors (``model.to(dtype)`` would
    round those too); they take and return ``dtype`` activations, quantized from the exact widened
    values, so the integer path and ``simulate=True`` still agree bit for bit. The float parts
    (convolutions, attention, LayerNorm, GELU) then run in ``dtype``: a different float model, whose
    accuracy is measured, not assumed. Feed it ``dtype`` inputs (mixq.latency.CastInputs).
    """
    if not dtype.is_floating_point:
        raise ValueError(f"cast_float_parts needs a floating dtype (torch.bfloat16, torch.float16), got {dtype}")
    for module in model.modules():
        if isinstance(module, QuantLinear):
            continue
        for name, p in module.named_parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        for name, b in module.named_buffers(recurse=False):
            if b is not None and b.is_floating_point():
                setattr(module, name, b.to(dtype))
    return model
