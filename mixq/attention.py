"""Quantized attention matmuls (issue 15, phase 1): QK^T and softmax(.)V on integer codes.

:class:`QuantAttention` replaces timm's ``Attention`` (ViT, DeiT, and mixq's DINOv2, which is a timm
``VisionTransformer``): qkv -> Q, K per-token dynamic at ``attn_bits`` -> ``mixq::quantized_qk`` ->
softmax in float -> probabilities on a log2 (or uniform) grid, V per channel at ``attn_bits`` ->
``mixq::quantized_pv`` -> proj. The qkv and proj Linears are kept as they are (QuantLinear after
``quantize_``). ``simulate=True`` runs the same arithmetic in plain torch ops (bit-identical, with
straight-through gradients); the number format is in docs/DESIGN_NOTES.md, "Attention matmuls".
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import formats, ops
from .backends import reference as _reference
from .backends import select_backend


def _timm_attention_type() -> Optional[type]:
    try:
        from timm.models.vision_transformer import Attention
    except ImportError:  # timm absent: nothing of this kind can be in the model
        return None
    return Attention


def is_supported_attention(m: nn.Module) -> bool:
    """True for the attention modules QuantAttention can replace: timm's ``Attention``, exactly."""
    t = _timm_attention_type()
    return t is not None and type(m) is t


def is_attention(m: nn.Module) -> bool:
    """An attention module by type: nn.MultiheadAttention or a class whose name ends in "Attention"."""
    return isinstance(m, nn.MultiheadAttention) or type(m).__name__.endswith("Attention")


def _ste(x: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """exact's value with x's gradient, in float64: x + (exact - x) is exact there (both have few bits)."""
    x64 = x.to(torch.float64)
    return x64 + (exact.to(torch.float64) - x64).detach()


class QuantAttention(nn.Module):
    """timm ``Attention`` with both matmuls on integer codes; the Linears are the wrapped ones."""

    def __init__(self, attn: nn.Module, attn_bits: int = 8, softmax_bits: Optional[int] = None,
                 softmax_quant: str = "log2", simulate: bool = False, backend: Optional[str] = None) -> None:
        super().__init__()
        if not is_supported_attention(attn):
            raise NotImplementedError(
                f"QuantAttention wraps timm's vision_transformer.Attention, not {type(attn).__module__}."
                f"{type(attn).__name__}")
        self.attn_bits = formats.check_bits(attn_bits, "attn_bits")
        self.softmax_bits = formats.check_bits(attn_bits if softmax_bits is None else softmax_bits, "softmax_bits")
        self.softmax_quant = formats.check_softmax_quant(softmax_quant)
        self.simulate = simulate
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        for name in ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop"):
            setattr(self, name, getattr(attn, name))
        self.gate = getattr(attn, "gate", None)
        self._forced_backend = backend
        p = next(attn.parameters(), None)
        self.backend = backend or select_backend(p.device if p is not None else "cpu")

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        p = next(self.parameters(), None)
        if self._forced_backend is None and p is not None:
            self.backend = select_backend(p.device)
        return self

    def set_simulate(self, simulate: bool) -> "QuantAttention":
        self.simulate = simulate
        return self

    def extra_repr(self) -> str:
        mode = "simulate" if self.simulate else f"backend={self.backend}"
        return (f"heads={self.num_heads}, head_dim={self.head_dim}, attn_bits={self.attn_bits}, "
                f"softmax={self.softmax_quant}{self.softmax_bits}, {mode}")

    def layer_config(self) -> dict:
        """What this module quantizes, for reports: the two matmuls and their input formats."""
        return {"ops": ["qk", "pv"], "attn_bits": self.attn_bits, "softmax_bits": self.softmax_bits,
                "softmax_quant": self.softmax_quant}

    def _scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        qc, qs = formats.quantize_act_dynamic(q.detach(), self.attn_bits)
        kc, ks = formats.quantize_act_dynamic(k.detach(), self.attn_bits)
        if self.simulate:
            return _reference.attention_qk(_ste(q / qs[..., None], qc), qs, _ste(k / ks[..., None], kc), ks,
                                           torch.float32)
        return ops.quantized_qk(qc, qs, kc, ks, torch.float32, self.backend)

    def _mix(self, attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        vc, vs = formats.quantize_act_dynamic(v.detach().transpose(-2, -1), self.attn_bits)
        vc = vc.transpose(-2, -1)
        pc = formats.quantize_probs(attn.detach(), self.softmax_bits, self.softmax_quant)
        if self.simulate:
            out = _reference.attention_pv(pc, _ste(v / vs[..., None, :], vc), vs, self.softmax_bits,
                                          self.softmax_quant, torch.float32)
            if attn.requires_grad:  # straight-through for the probabilities: adds exactly 0 to the value
                pv = attn.to(torch.float32) @ v.detach().to(torch.float32)
                out = out + (pv - pv.detach())
            return out
        return ops.quantized_pv(pc, vc, vs, self.softmax_bits, self.softmax_quant, torch.float32, self.backend)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
                ) -> torch.Tensor:
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = self._scores(q, k) * self.scale
        if is_causal:
            attn = attn.masked_fill(torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        if attn_mask is not None:
            attn = (attn.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                    else attn + attn_mask.to(attn.dtype))
        attn = self.attn_drop(attn.softmax(dim=-1))
        out = self._mix(attn, v).to(x.dtype)
        out = self.norm(out.transpose(1, 2).reshape(b, n, self.attn_dim))
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))


def quantized_attention(model: nn.Module) -> dict[str, QuantAttention]:
    """The model's QuantAttention modules by qualified name (which attention matmuls are quantized)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantAttention)}


def unsupported_attention(model: nn.Module, names: Optional[set[str]] = None) -> dict[str, str]:
    """Attention modules (name -> type) that QuantAttention cannot replace yet (Swin, SAM, MHA...),
    outside any supported or already quantized one; ``names`` limits the check to those names."""
    found: dict[str, str] = {}
    covered: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(c + ".") for c in covered):
            continue
        if isinstance(m, QuantAttention) or is_supported_attention(m):
            covered.append(name)
        elif is_attention(m) and (names is None or name in names):
            found[name] = f"{type(m).__module__}.{type(m).__name__}"
            covered.append(name)
    return found
