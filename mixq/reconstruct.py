"""Block reconstruction after GPTQ: AdaRound-style soft weight rounding, QDrop-style activation dropping.

Per transformer block, in order, the block's QuantLinears are replaced by trainable stand-ins and
optimized so that the block, fed the *quantized* model's input to it, reproduces the *float* block's
output on the float input (BRECQ's target). What is optimized is what the packed format can hold:

* the rounding direction of every weight code, AdaRound's rectified sigmoid h(V) in [0, 1] on top of
  a fixed integer base chosen so that base or base + 1 is GPTQ's code (the start point: h begins at
  GPTQ's choice), with the rounding regularizer sum(1 - |2h - 1|^beta), beta annealed 20 -> 2;
* the per-output-channel weight step (fp32 ``w_scale``, free in the format).

Activations keep the contract's dynamic per-token step (amax / qmax): it has no free parameter, and a
learned clipping ratio would change the format (scaling x does not change dynamic codes), so the
activation side is trained through, not learned. QDrop: during optimization each quantized input
element is replaced by its float value with probability ``drop_prob`` (straight-through rounding
otherwise); evaluation and the hardened result never drop. Hardening sets h to 0/1, writes the codes
and steps back into the QuantLinear (``qweight``, ``w_scale``) and refreshes it, so the kernels and the
simulation keep agreeing bit for bit. A block whose calibration MSE (kernel path, no dropping) got
worse keeps its GPTQ weights. Deterministic for a seed (one CPU thread count, the same inputs).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import formats, rotation
from .data import batch_to, iter_batches, model_device, run_model
from .nn import QuantLinear
from .progress import progress_bar

__all__ = ["ReconstructConfig", "SoftQuantLinear", "reconstruct_blocks"]

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid


@dataclass(frozen=True)
class ReconstructConfig:
    """``iters`` optimizer steps per block on mini-batches of ``batch_size`` calibration items (Adam,
    ``lr`` for the rounding variables, ``scale_lr`` for the weight steps); the rounding regularizer's
    weight ``reg_weight`` after a ``warmup`` share of the steps; QDrop's ``drop_prob``; at most
    ``max_seconds`` per block (None: no bound); ``seed`` for the batches and the drop masks."""

    iters: int = 200
    batch_size: int = 4
    lr: float = 1e-2
    scale_lr: float = 1e-4
    reg_weight: float = 0.01
    warmup: float = 0.2
    drop_prob: float = 0.5
    max_seconds: Optional[float] = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.iters < 0 or self.batch_size < 1:
            raise ValueError(f"iters must be >= 0 and batch_size >= 1, got {self.iters}, {self.batch_size}")
        if not 0.0 <= self.drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {self.drop_prob}")
        if not 0.0 <= self.warmup <= 1.0:
            raise ValueError(f"warmup must be a share of the steps in [0, 1], got {self.warmup}")


def _rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


class SoftQuantLinear(nn.Module):
    """A QuantLinear's trainable stand-in: the same input path (smooth factors, rotation, dynamic
    per-token fake quantization) and soft-rounded weights; ``drop_prob`` applies in training mode only."""

    def __init__(self, q: QuantLinear, float_weight: torch.Tensor, float_bias: Optional[torch.Tensor],
                 drop_prob: float, generator: torch.Generator) -> None:
        super().__init__()
        if q.act_quant not in ("dynamic", "smooth"):
            raise ValueError(f"reconstruction supports act_quant 'dynamic' and 'smooth' layers, got {q.act_quant!r}")
        self.q, self.drop_prob, self.gen = q, drop_prob, generator
        self.qmax = formats.qmax(q.w_bits)
        w = float_weight.detach().to(torch.float32) * q.act_channel_factor[None, :]  # the basis the codes live in
        if q.rot_signs is not None:
            w = rotation.rotate_weight(w, q.rot_signs, q.rot_block)
        scale = q.w_scale.detach().clone()
        codes = formats.unpack_weight(q.qweight, q.w_bits, q.in_features).to(torch.float32)
        base = torch.clamp(torch.floor(w / scale[:, None]), codes - 1, codes)  # base or base + 1 is GPTQ's code
        up = codes - base  # 0 or 1
        self.register_buffer("base", base)
        self.register_buffer("gptq_codes", codes)
        self.v = nn.Parameter(torch.where(up > 0, 2.3, -2.3))  # h(V) starts ~1% of a step from GPTQ's choice
        self.scale = nn.Parameter(scale)
        self.register_buffer("bias", None if float_bias is None else float_bias.detach().to(torch.float32).clone())
        self.hard = False

    def h(self) -> torch.Tensor:
        return (self.v >= 0).to(torch.float32) if self.hard else _rectified_sigmoid(self.v)

    def codes(self) -> torch.Tensor:
        return torch.clamp(self.base + self.h(), -self.qmax, self.qmax)

    def round_reg(self, beta: float) -> torch.Tensor:
        return (1 - (2 * _rectified_sigmoid(self.v) - 1).abs().pow(beta)).sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q
        shape = x.shape
        xf = x.reshape(-1, shape[-1]).to(torch.float32)
        if q.act_quant == "smooth" and not q.input_prescaled:
            xf = xf * q.smooth_inv
        if q.rot_signs is not None:
            xf = rotation.hadamard_fp32(xf, q.rot_signs, q.rot_block)
        codes, step = formats.quantize_act_dynamic(xf.detach(), q.a_bits)
        x_hat = xf + (codes.to(torch.float32) * step[:, None] - xf).detach()  # straight through the rounding
        if self.training and self.drop_prob > 0:
            keep_float = torch.rand(xf.shape, generator=self.gen) < self.drop_prob
            x_hat = torch.where(keep_float.to(xf.device), xf, x_hat)
        w = self.codes() * self.scale[:, None]
        return F.linear(x_hat, w, self.bias).reshape(*shape[:-1], -1).to(x.dtype)

    @torch.no_grad()
    def harden_into(self, q: QuantLinear) -> None:
        """Write the hard codes and the learned steps into ``q`` (the packed format) and refresh it."""
        self.hard = True
        codes = self.codes().to(torch.int8)
        q.qweight.copy_(formats.pack_weight(codes, q.w_bits))
        q.w_scale.copy_(self.scale.detach().to(torch.float32))
        q.refresh()


def _block_inputs(model: nn.Module, block: nn.Module, data: Any, batch_size: int) -> torch.Tensor:
    """The input of ``block`` when ``model`` runs on ``data`` (the first positional argument), on the CPU."""
    got: list[torch.Tensor] = []

    class _Stop(Exception):
        pass

    def hook(mod, args):
        got.append(args[0].detach())
        raise _Stop

    h = block.register_forward_pre_hook(hook)
    device = model_device(model)
    try:
        with torch.no_grad():
            for batch in iter_batches(data, batch_size):
                try:
                    run_model(model, batch_to(batch, device))
                except _Stop:
                    pass
    finally:
        h.remove()
    if not got:
        raise ValueError("the first block never ran on the calibration data")
    return torch.cat(got)


@torch.no_grad()
def _run(block: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([block(x[i: i + batch_size]) for i in range(0, len(x), batch_size)])


def _quant_linears(block: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in block.named_modules() if isinstance(m, QuantLinear)}


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def reconstruct_block(q_block: nn.Module, fp_block: nn.Module, x_q: torch.Tensor, target: torch.Tensor,
                      config: ReconstructConfig, generator: torch.Generator) -> dict[str, Any]:
    """Optimize ``q_block``'s QuantLinears (in place) so that q_block(x_q) approaches ``target``.

    Returns {"mse_before", "mse_after", "kept" ("reconstructed" | "gptq"), "steps", "seconds"}; both
    MSEs from the hardened kernel path without dropping."""
    t0 = time.perf_counter()
    mse_before = float(F.mse_loss(_run(q_block, x_q, config.batch_size), target))
    qlins = _quant_linears(q_block)
    if not qlins or config.iters == 0:
        return {"mse_before": mse_before, "mse_after": mse_before, "kept": "gptq", "steps": 0,
                "seconds": time.perf_counter() - t0}
    fp_mods = dict(fp_block.named_modules())
    saved = {n: (m.qweight.clone(), m.w_scale.clone()) for n, m in qlins.items()}
    soft: dict[str, SoftQuantLinear] = {}
    for n, m in qlins.items():
        lin = fp_mods.get(n)
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"the float block has no Linear {n!r} to read the float weights from")
        soft[n] = SoftQuantLinear(m, lin.weight, lin.bias, config.drop_prob, generator)
        _set(q_block, n, soft[n])
    frozen = [p for p in q_block.parameters() if not any(p is s.v or p is s.scale for s in soft.values())]
    flags = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    opt = torch.optim.Adam([{"params": [s.v for s in soft.values()], "lr": config.lr},
                            {"params": [s.scale for s in soft.values()], "lr": config.scale_lr}])
    n_items, warm = len(x_q), int(config.warmup * config.iters)
    steps = 0
    q_block.train()
    try:
        for it in range(config.iters):
            if config.max_seconds is not None and time.perf_counter() - t0 > config.max_seconds:
                break
            idx = torch.randperm(n_items, generator=generator)[: config.batch_size]
            out = q_block(x_q[idx])
            loss = F.mse_loss(out, target[idx])
            if it >= warm:
                frac = (it - warm) / max(config.iters - warm, 1)
                beta = 20.0 + (2.0 - 20.0) * frac
                n_w = sum(s.v.numel() for s in soft.values())
                loss = loss + config.reg_weight * sum(s.round_reg(beta) for s in soft.values()) / n_w
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for s in soft.values():
                    s.scale.clamp_(min=formats.SCALE_EPS)
            steps += 1
    finally:
        q_block.eval()
        for n, s in soft.items():
            s.harden_into(qlins[n])
            _set(q_block, n, qlins[n])
        for p, f in zip(frozen, flags):
            p.requires_grad_(f)
    mse_after = float(F.mse_loss(_run(q_block, x_q, config.batch_size), target))
    kept = "reconstructed"
    if not mse_after <= mse_before:  # never worse on the calibration data than GPTQ
        for n, m in qlins.items():
            m.qweight.copy_(saved[n][0])
            m.w_scale.copy_(saved[n][1])
            m.refresh()
        mse_after, kept = mse_before, "gptq"
    return {"mse_before": mse_before, "mse_after": mse_after, "kept": kept, "steps": steps,
            "seconds": time.perf_counter() - t0}


def reconstruct_blocks(model: nn.Module, fp_model: nn.Module, calib_data: Any, config: ReconstructConfig = ReconstructConfig(),
                       blocks: Callable[[nn.Module], Sequence[nn.Module]] = None, progress: bool = True
                       ) -> list[dict[str, Any]]:
    """Reconstruct every block of the quantized ``model`` (in place) against ``fp_model``, in order.

    ``blocks(m)`` lists a model's transformer blocks (the same structure in both models, each called
    with the token tensor alone, as timm's and DINOv2's blocks are). Block i sees the quantized model's
    input to it (blocks before it already reconstructed) and the float block's output on the float
    input as target. Returns one record per block (see :func:`reconstruct_block`)."""
    if blocks is None:
        raise ValueError("pass blocks=lambda m: m.blocks (the model's transformer blocks, in order)")
    q_blocks, fp_blocks = list(blocks(model)), list(blocks(fp_model))
    if len(q_blocks) != len(fp_blocks) or not q_blocks:
        raise ValueError(f"the quantized and float models list {len(q_blocks)} and {len(fp_blocks)} blocks; "
                         "need the same, at least one")
    gen = torch.Generator().manual_seed(config.seed)
    fp_model = copy.deepcopy(fp_model).eval()  # its blocks run on detached inputs; the caller's copy stays as is
    fp_blocks = list(blocks(fp_model))
    x_q = _block_inputs(model, q_blocks[0], calib_data, config.batch_size)
    x_fp = _block_inputs(fp_model, fp_blocks[0], calib_data, config.batch_size)
    records = []
    for i in progress_bar(range(len(q_blocks)), "reconstructing blocks", progress, total=len(q_blocks)):
        target = _run(fp_blocks[i], x_fp, config.batch_size)
        rec = reconstruct_block(q_blocks[i], fp_blocks[i], x_q, target, config, gen)
        records.append({"block": i, **rec})
        x_q = _run(q_blocks[i], x_q, config.batch_size)
        x_fp = target
    return records
