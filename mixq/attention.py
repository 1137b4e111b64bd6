"""Quantized attention matmuls (issue 15): QK^T and softmax(.)V on integer codes.

One base arithmetic, several module kinds, each mirroring its float module's forward:

* :class:`QuantAttention` (kind ``"timm_vit"``): timm ``vision_transformer.Attention`` (ViT, DeiT, and
  mixq's DINOv2, a timm ``VisionTransformer``).
* :class:`QuantWindowAttention` (``"timm_swin"``): timm ``swin_transformer.WindowAttention``; the
  relative-position bias and the shifted-window mask are added in float to the dequantized scores.
* :class:`QuantSamAttention` (``"sam_encoder"``): segment_anything's image-encoder ``Attention``
  (windowed and global blocks); the decomposed relative positions are computed from the float Q, as
  SAM does, and added in float to the dequantized scores.
* :class:`QuantSamDecoderAttention` (``"sam_decoder"``): the mask decoder's ``Attention`` (separate
  q/k/v projections, cross attention with N != M tokens).

Q, K per-token dynamic at ``qk_bits`` -> ``mixq::quantized_qk`` -> (bias, mask) -> softmax in float ->
probabilities at ``p_bits`` on the ``p_grid`` grid (log2 or uniform), V per channel at ``v_bits`` ->
``mixq::quantized_pv``. ``float_ops`` keeps either matmul in float (an allocator perturbs one alone).
The Linears are kept as they are (QuantLinear after ``quantize_``), under their original names, so the
state dict keys do not change. ``simulate=True`` runs the same arithmetic in plain torch ops
(bit-identical, with straight-through gradients); the number format is in docs/DESIGN_NOTES.md,
"Attention matmuls". :func:`wrap_attention` picks the class for a module.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from . import formats, ops
from .backends import get_backend, select_backend
from .backends import reference as _reference

try:  # the cpu backend's C++ kernels (per-channel V codes); None when the extension is not built
    from . import _C
except ImportError:
    _C = None

ATTENTION_OPS = ("qk", "pv")


def _import_type(module: str, name: str) -> Optional[type]:
    """``module.name`` when that library is installed, else None (then no module of it can be in a model)."""
    try:
        mod = __import__(module, fromlist=[name])
    except ImportError:
        return None
    return getattr(mod, name, None)


def _timm_attention_type() -> Optional[type]:
    return _import_type("timm.models.vision_transformer", "Attention")


def _timm_window_attention_type() -> Optional[type]:
    return _import_type("timm.models.swin_transformer", "WindowAttention")


def _sam_encoder_attention_type() -> Optional[type]:
    return _import_type("segment_anything.modeling.image_encoder", "Attention")


def _sam_decoder_attention_type() -> Optional[type]:
    return _import_type("segment_anything.modeling.transformer", "Attention")


def _type_name(t: type) -> str:
    return f"{t.__module__}.{t.__name__}"


def is_attention(m: nn.Module) -> bool:
    """An attention module by type: nn.MultiheadAttention or a class whose name ends in "Attention"."""
    return isinstance(m, nn.MultiheadAttention) or type(m).__name__.endswith("Attention")


def _ste(x: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """exact's value with x's gradient, in float64: x + (exact - x) is exact there (both have few bits)."""
    x64 = x.to(torch.float64)
    return x64 + (exact.to(torch.float64) - x64).detach()


def _check_float_ops(float_ops: Iterable[str]) -> tuple[str, ...]:
    if isinstance(float_ops, str) or not isinstance(float_ops, (tuple, list, set, frozenset)):
        raise TypeError(f"float_ops must be a tuple of op names from {list(ATTENTION_OPS)} (e.g. ('qk',)), "
                        f"got {float_ops!r}")
    bad = [op for op in float_ops if op not in ATTENTION_OPS]
    if bad:
        raise ValueError(f"unknown op(s) {bad} in float_ops; allowed: {list(ATTENTION_OPS)}")
    ops_ = tuple(op for op in ATTENTION_OPS if op in float_ops)
    if len(ops_) == len(ATTENTION_OPS):
        raise ValueError(f"float_ops={tuple(float_ops)!r} keeps both attention matmuls in float: nothing is left "
                         "to quantize; keep the float module instead (list it in AttentionConfig.skip)")
    return ops_


# The constructor keywords before the one-name-per-concept rename, and what they are now.
_RENAMED = {"attn_bits": "qk_bits", "pv_bits": "v_bits", "softmax_bits": "p_bits", "softmax_quant": "p_grid"}


def _refuse_renamed(where: str, kwargs: dict) -> None:
    if not kwargs:
        return
    hints = [f"{k}= is now {_RENAMED[k]}=" for k in kwargs if k in _RENAMED]
    raise TypeError(f"{where}() got unexpected keyword(s) {sorted(kwargs)}" + (f": {'; '.join(hints)}" if hints else "")
                    + "; it takes qk_bits, v_bits, p_bits, p_grid, simulate, backend, float_ops")


class QuantAttention(nn.Module):
    """timm ``Attention`` with its matmuls on integer codes; the Linears are the wrapped ones.

    Also the base of the other kinds: ``qk_bits`` are the bits of Q's and K's codes, ``v_bits``
    of V's (default ``qk_bits``), ``p_bits`` of the probabilities (default ``v_bits``) on the
    ``p_grid`` grid (``"log2"`` or ``"uniform"``);
    ``float_ops`` names the matmuls ("qk", "pv") kept in float (for "pv" the probabilities stay float).
    """

    kind = "timm_vit"
    _source_type: Callable[[], Optional[type]] = staticmethod(_timm_attention_type)
    _source_name = "timm.models.vision_transformer.Attention"

    def __init__(self, attn: nn.Module, qk_bits: int = 8, *, v_bits: Optional[int] = None,
                 p_bits: Optional[int] = None, p_grid: str = "log2", simulate: bool = False,
                 backend: Optional[str] = None, float_ops: Iterable[str] = (), **renamed: object) -> None:
        _refuse_renamed(type(self).__name__, renamed)
        super().__init__()
        t = self._source_type()
        if t is None or type(attn) is not t:
            raise NotImplementedError(
                f"{type(self).__name__} wraps {self._source_name}, not {_type_name(type(attn))}; "
                "mixq.attention.wrap_attention picks the class for a module")
        self.qk_bits = formats.check_bits(qk_bits, "qk_bits")
        self.v_bits = formats.check_bits(self.qk_bits if v_bits is None else v_bits, "v_bits")
        self.p_bits = formats.check_bits(self.v_bits if p_bits is None else p_bits, "p_bits")
        self.p_grid = formats.check_p_grid(p_grid)
        self.float_ops = _check_float_ops(float_ops)
        if not isinstance(simulate, bool):
            raise TypeError(f"simulate must be True or False, got {simulate!r}")
        self.simulate = simulate
        if backend is not None:
            get_backend(backend)  # an unknown name raises here, naming the registered ones
        self._forced_backend = backend
        p = next(attn.parameters(), None)
        self.backend = backend or select_backend(p.device if p is not None else "cpu")
        self._take(attn)

    def _take(self, attn: nn.Module) -> None:
        """Adopt the float module's submodules and parameters under their own names."""
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        for name in ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop"):
            setattr(self, name, getattr(attn, name))
        self.gate = getattr(attn, "gate", None)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        p = next(self.parameters(), None)
        if self._forced_backend is None and p is not None:
            self.backend = select_backend(p.device)
        return self

    def set_simulate(self, simulate: bool) -> "QuantAttention":
        self.simulate = simulate
        return self

    def quantized_ops(self) -> list[str]:
        return [op for op in ATTENTION_OPS if op not in self.float_ops]

    def extra_repr(self) -> str:
        mode = "simulate" if self.simulate else f"backend={self.backend}"
        fl = f", float_ops={self.float_ops}" if self.float_ops else ""
        return (f"heads={self.num_heads}, qk_bits={self.qk_bits}, v_bits={self.v_bits}, p_bits={self.p_bits}, "
                f"p_grid={self.p_grid}{fl}, {mode}")

    def layer_config(self) -> dict:
        """What this module quantizes (reports, checkpoints): the quantized matmuls and their formats."""
        return {"ops": self.quantized_ops(), "qk_bits": self.qk_bits, "v_bits": self.v_bits,
                "p_bits": self.p_bits, "p_grid": self.p_grid}

    def _scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Q K^T in fp32 (unscaled): on integer codes, or in float when "qk" is in float_ops."""
        if "qk" in self.float_ops:
            return q.to(torch.float32) @ k.to(torch.float32).transpose(-2, -1)
        if self.simulate:
            qc, qs = formats.quantize_act_dynamic(q.detach(), self.qk_bits)
            kc, ks = formats.quantize_act_dynamic(k.detach(), self.qk_bits)
            return _reference.attention_qk(_ste(q / qs[..., None], qc), qs, _ste(k / ks[..., None], kc), ks,
                                           torch.float32)
        qc, qs = self._quantize_tokens(q.detach(), self.qk_bits)
        kc, ks = self._quantize_tokens(k.detach(), self.qk_bits)
        return ops.quantized_qk(qc, qs, kc, ks, torch.float32, self.backend)

    def _quantize_tokens(self, x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The dynamic per-token rule over the last dim of x [..., K] through the backend's op (the same
        contract as formats.quantize_act_dynamic, bit for bit): on the cpu one C++ pass over the strided
        view, several times faster than formats' torch ops; other backends take 2-D fp32/bf16/fp16."""
        if x.numel() == 0:
            return formats.quantize_act_dynamic(x, bits)
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            x = x.to(torch.float32)  # formats converts to fp32 first too
        if (self.backend == "cpu" and _C is not None and x.dim() in (3, 4) and x.device.type == "cpu"
                and x.stride(-1) == 1 and not torch.compiler.is_compiling()):
            # the same row rule on the strided view (csrc/quantize.cpp): no contiguous copy of Q or K
            codes, steps = _C.quantize_tokens(x if x.dim() == 4 else x[None], bits)
            return (codes, steps) if x.dim() == 4 else (codes[0], steps[0])
        codes, steps = ops.quantize_act_dynamic(x.reshape(-1, x.shape[-1]), bits, self.backend)
        return codes.view(x.shape), steps.view(x.shape[:-1])

    def _quantize_channels(self, v: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """V [..., M, D] per channel (one step per d over the tokens): (codes [..., M, D], steps [..., D]),
        formats.quantize_act_dynamic on V^T bit for bit. On the cpu backend one C++ pass over the strided
        view (csrc/quantize.cpp), where formats' torch ops cost up to a sixth of a batch-8 forward."""
        if (self.backend == "cpu" and _C is not None and v.dim() in (3, 4) and v.device.type == "cpu"
                and v.dtype in (torch.float32, torch.bfloat16, torch.float16) and not torch.compiler.is_compiling()):
            codes, steps = _C.quantize_channels(v if v.dim() == 4 else v[None], bits)
            return (codes, steps) if v.dim() == 4 else (codes[0], steps[0])
        vc, vs = formats.quantize_act_dynamic(v.transpose(-2, -1), bits)
        return vc.transpose(-2, -1), vs

    def _mix(self, attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(.) V in fp32: probability codes times V's codes, or in float when "pv" is in float_ops."""
        if "pv" in self.float_ops:
            return attn.to(torch.float32) @ v.to(torch.float32)
        if self.simulate:
            vc, vs = formats.quantize_act_dynamic(v.detach().transpose(-2, -1), self.v_bits)
            vc = vc.transpose(-2, -1)
        else:
            vc, vs = self._quantize_channels(v.detach(), self.v_bits)
        if self.simulate:
            pc = formats.quantize_probs(attn.detach(), self.p_bits, self.p_grid)
            out = _reference.attention_pv(pc, _ste(v / vs[..., None, :], vc), vs, self.p_bits, self.p_grid,
                                          torch.float32)
            if attn.requires_grad:  # straight-through for the probabilities: adds exactly 0 to the value
                pv = attn.to(torch.float32) @ v.detach().to(torch.float32)
                out = out + (pv - pv.detach())
            return out
        # the backend's own elementwise kernel (cpu: csrc/probs.cpp), bit-identical to formats
        pc = ops.quantize_probs(attn.detach(), self.p_bits, self.p_grid, self.backend)
        return ops.quantized_pv(pc, vc, vs, self.p_bits, self.p_grid, torch.float32, self.backend)

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


class QuantWindowAttention(QuantAttention):
    """timm Swin ``WindowAttention``: both matmuls on codes; the relative-position bias and the
    shifted-window mask (0 / -inf per window) are added in float to the dequantized, scaled scores,
    in timm's order (scale, + bias, + mask, softmax)."""

    kind = "timm_swin"
    _source_type = staticmethod(_timm_window_attention_type)
    _source_name = "timm.models.swin_transformer.WindowAttention"

    def _take(self, attn: nn.Module) -> None:
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.window_size, self.window_area = tuple(attn.window_size), attn.window_area
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)
        for name in ("qkv", "attn_drop", "proj", "proj_drop"):
            setattr(self, name, getattr(attn, name))

    def _rel_pos_bias(self) -> torch.Tensor:
        """[1, heads, N, N], as timm's ``_get_rel_pos_bias``."""
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(self.window_area, self.window_area, -1).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b_, n, _ = x.shape
        if n != self.window_area:
            raise ValueError(f"WindowAttention of window {self.window_size} takes {self.window_area} tokens per "
                             f"window, got x of shape {tuple(x.shape)}")
        qkv = self.qkv(x).reshape(b_, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = self._scores(q, k) * self.scale + self._rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            if mask.shape != (num_win, n, n) or b_ % num_win:
                raise ValueError(f"mask must be [num_windows, {n}, {n}] with num_windows dividing the batch of "
                                 f"windows ({b_}), got {tuple(mask.shape)}")
            attn = attn.view(-1, num_win, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, n)
        attn = self.attn_drop(attn.softmax(dim=-1))
        out = self._mix(attn, v).to(x.dtype)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b_, n, -1)))


class QuantSamAttention(QuantAttention):
    """segment_anything image-encoder ``Attention`` (x [B, H, W, C], windowed or global): both matmuls on
    codes; with ``use_rel_pos`` the decomposed relative-position term is computed from the float Q (as
    SAM does, with its own ``add_decomposed_rel_pos``) and added to the dequantized, scaled scores."""

    kind = "sam_encoder"
    _source_type = staticmethod(_sam_encoder_attention_type)
    _source_name = "segment_anything.modeling.image_encoder.Attention"

    def _take(self, attn: nn.Module) -> None:
        self.num_heads, self.scale, self.use_rel_pos = attn.num_heads, attn.scale, attn.use_rel_pos
        self.qkv, self.proj = attn.qkv, attn.proj
        if self.use_rel_pos:
            self.rel_pos_h, self.rel_pos_w = attn.rel_pos_h, attn.rel_pos_w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.num_heads, h * w, -1).unbind(0)
        attn = self._scores(q, k) * self.scale
        if self.use_rel_pos:
            attn = add_decomposed_rel_pos(attn, q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
        attn = attn.softmax(dim=-1)
        out = self._mix(attn, v).to(x.dtype)
        out = out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(out)


class QuantSamDecoderAttention(QuantAttention):
    """segment_anything mask-decoder ``Attention`` (separate q/k/v projections; token-to-image cross
    attention has N != M): both matmuls on codes, scores divided by sqrt(head dim) as SAM does."""

    kind = "sam_decoder"
    _source_type = staticmethod(_sam_decoder_attention_type)
    _source_name = "segment_anything.modeling.transformer.Attention"

    def _take(self, attn: nn.Module) -> None:
        self.num_heads, self.internal_dim = attn.num_heads, attn.internal_dim
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self, name, getattr(attn, name))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        dtype = q.dtype
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        attn = (self._scores(q, k) / math.sqrt(q.shape[-1])).softmax(dim=-1)
        out = self._mix(attn, v).to(dtype)
        b, heads, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, heads * c))


QUANT_ATTENTION_CLASSES: dict[str, type[QuantAttention]] = {
    c.kind: c for c in (QuantAttention, QuantWindowAttention, QuantSamAttention, QuantSamDecoderAttention)}


def supported_attention_names() -> list[str]:
    """The float attention classes mixq can quantize (whether or not their library is installed)."""
    return [c._source_name for c in QUANT_ATTENTION_CLASSES.values()]


def _class_for(m: nn.Module) -> Optional[type[QuantAttention]]:
    for cls in QUANT_ATTENTION_CLASSES.values():
        t = cls._source_type()
        if t is not None and type(m) is t:
            return cls
    return None


def is_supported_attention(m: nn.Module) -> bool:
    """True for the float attention modules :func:`wrap_attention` can replace (exact types, no subclasses)."""
    return _class_for(m) is not None


def wrap_attention(module: nn.Module, qk_bits: int = 8, *, v_bits: Optional[int] = None,
                   p_bits: Optional[int] = None, p_grid: str = "log2", simulate: bool = False,
                   backend: Optional[str] = None, float_ops: Iterable[str] = (), **renamed: object) -> QuantAttention:
    """The quantized module for a float attention module of a supported type (see the module docstring)."""
    cls = _class_for(module)
    if cls is None:
        raise NotImplementedError(
            f"mixq cannot quantize the attention matmuls of {_type_name(type(module))}; supported: "
            f"{', '.join(supported_attention_names())}")
    _refuse_renamed("wrap_attention", renamed)
    return cls(module, qk_bits, v_bits=v_bits, p_bits=p_bits, p_grid=p_grid, simulate=simulate, backend=backend,
               float_ops=float_ops)


def quantized_attention(model: nn.Module) -> dict[str, QuantAttention]:
    """The model's quantized attention modules (every kind) by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantAttention)}


def unsupported_attention(model: nn.Module, names: Optional[set[str]] = None) -> dict[str, str]:
    """Attention modules (name -> type) that no quantized class can replace (nn.MultiheadAttention...),
    outside any supported or already quantized one; ``names`` limits the check to those names."""
    found: dict[str, str] = {}
    covered: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(c + ".") for c in covered):
            continue
        if isinstance(m, QuantAttention) or is_supported_attention(m):
            covered.append(name)
        elif is_attention(m) and (names is None or name in names):
            found[name] = _type_name(type(m))
            covered.append(name)
    return found
