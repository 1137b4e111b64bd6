"""Pareto sweep support: measured per-candidate allocation costs, plans from them, budgets, plots.

Why measured costs. The built-in KL scorer measures two numbers per layer (weights alone at W4,
activations alone at A4) and extrapolates every other choice with the noise model I·4^-(bits):
mixing then only pays when two layers' importances differ by more than 16x, and the model
misses that GPTQ and smoothing change how error falls with bits. Here every (layer, candidate)
is measured: the layer is quantized exactly as ``quantize_`` will do it (smooth activations from
the same calibration rows, GPTQ weights), everything else stays float, and the distortion of what
the task reads is recorded per scoring image:

* ``feat``: squared error of the pooled CLS + mean-patch features, standardized as the probe sees
  them (divided by the width): what kNN and the probe read;
* ``patch``: mean over patch tokens of ||Δp||² / ||p||²: what the saliency decoder reads;
* ``cls``: ||Δcls||² / ||cls||²;
* ``probe_kl``: KL(P_fp || P_q) of the FP-fitted probe's softmax.

Squared errors of independent perturbations add, so the sum over layers predicts the whole plan.

Why fast. Perturbing a layer of block k cannot change blocks 0..k-1: the FP inputs of every block
are cached once, and each perturbed pass runs only blocks k..end (on average half the model).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..modules import set_module
from ..report import plot_frontier  # noqa: F401  (re-exported)

BITS = (4, 6, 8)
UNIFORM_POINTS: list[tuple[int, int]] = [(w, a) for w in BITS for a in BITS]
OUTPUTS = ("feat", "patch", "cls", "probe_kl")


# ----------------------------------------------------------------------------- memoized quantization


def _bytes_key(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    return f"{tuple(t.shape)}|{t.dtype}|" + hashlib.sha1(t.numpy().tobytes()).hexdigest()


@contextlib.contextmanager
def memoized_quantization() -> Iterator[dict]:
    """Within the block, GPTQ results are reused when the same (folded) weights, bits and Hessian
    come back, and ``quantize_``'s calibration pass is reused for the same float model, layers and
    data. Both are exact (keyed by the bytes / state): a sweep quantizes the same 48 layers at the
    same 3 weight widths again and again, and GPTQ's column loop dominated its time (206 s of one
    347 s point on the shared 2-core machine). Yields the hit/miss counters."""
    import mixq.gptq as gptq_mod
    import mixq.quantize as quant_mod

    orig_gptq, orig_cal = gptq_mod.quantize_weight_gptq, quant_mod.calibrate
    memo_g: dict = {}
    memo_c: dict = {}
    stats = {"gptq_hits": 0, "gptq_misses": 0, "calib_hits": 0, "calib_misses": 0}

    def gptq(w, bits, h, damp=0.01, clip_search=True):
        key = (bits, damp, clip_search, _bytes_key(w), _bytes_key(h))
        if key not in memo_g:
            stats["gptq_misses"] += 1
            memo_g[key] = orig_gptq(w, bits, h, damp=damp, clip_search=clip_search)
        else:
            stats["gptq_hits"] += 1
        q, s = memo_g[key]
        return q.clone(), s.clone()

    def calibrate(model, targets, calib_data, config, progress=True):
        h = hashlib.sha1()
        for n, v in model.state_dict().items():
            h.update(n.encode() + _bytes_key(v).encode())
        key = (h.hexdigest(), tuple(sorted(targets)), _bytes_key(calib_data) if isinstance(calib_data, torch.Tensor)
               else id(calib_data), config.max_calib_rows, config.seed, config.batch_size)
        if key not in memo_c:
            stats["calib_misses"] += 1
            memo_c[key] = orig_cal(model, targets, calib_data, config, progress)
        else:
            stats["calib_hits"] += 1
        samples, fed_by = memo_c[key]
        return dict(samples), dict(fed_by)

    gptq_mod.quantize_weight_gptq, quant_mod.calibrate = gptq, calibrate
    try:
        yield stats
    finally:
        gptq_mod.quantize_weight_gptq, quant_mod.calibrate = orig_gptq, orig_cal


# ----------------------------------------------------------------------------- budgets


def uniform_budget(w_bits: int, a_bits: int) -> tuple[float, str]:
    """(average weight bits, BOPs as a fraction of W8A8) of the uniform point WwAa."""
    return float(w_bits), f"{Fraction_str(w_bits * a_bits, 64)}x"


def Fraction_str(num: int, den: int) -> str:
    """An exact decimal for num/den when there is one (den = 64 always has one)."""
    from fractions import Fraction

    f = Fraction(num, den)
    s = f"{float(f):.10f}".rstrip("0").rstrip(".")
    if Fraction(s) != f:
        raise ValueError(f"{num}/{den} has no short exact decimal")
    return s


def bops_fraction(plan_bops: int, macs_total: int) -> float:
    return plan_bops / (macs_total * 64)


# ----------------------------------------------------------------------------- measured costs


@dataclass
class BlockModel:
    """How to run a transformer from a block onwards: ``blocks`` in order, ``head`` after the last,
    and ``prefix`` (the module-name prefix of block i is ``prefix + str(i) + '.'``)."""

    blocks: nn.ModuleList
    head: Callable[[torch.Tensor], torch.Tensor]
    prefix: str
    embed: Callable[[torch.Tensor], torch.Tensor]


def dinov2_blocks(model: nn.Module) -> BlockModel:
    """The DINOv2 saliency model as embed -> 12 blocks -> final norm (tokens)."""
    bb = model.backbone
    v = bb.vit

    def embed(x: torch.Tensor) -> torch.Tensor:
        tokens = v.patch_embed(x)
        b, gh, gw, d = tokens.shape
        tokens = torch.cat([v.cls_token.expand(b, -1, -1), tokens.reshape(b, gh * gw, d)], dim=1)
        return tokens + bb.position_embedding(gh, gw)

    return BlockModel(v.blocks, v.norm, "backbone.vit.blocks.", embed)


def _block_of(name: str, prefix: str) -> int:
    if not name.startswith(prefix):
        raise ValueError(f"layer {name!r} is not inside a block ({prefix}<i>.)")
    return int(name[len(prefix):].split(".", 1)[0])


def _distortions(tok: torch.Tensor, ref: torch.Tensor, probe) -> dict[str, torch.Tensor]:
    """Per-image distortions of tokens [B, 1+P, D] against the FP tokens."""
    from .harness import pooled

    t, r = tok.double(), ref.double()
    zq = (pooled(t) - probe.mean) / probe.std
    zr = (pooled(r) - probe.mean) / probe.std
    out = {"feat": ((zq - zr) ** 2).mean(1),
           "patch": (((t[:, 1:] - r[:, 1:]) ** 2).sum(-1) / (r[:, 1:] ** 2).sum(-1).clamp_min(1e-12)).mean(1),
           "cls": ((t[:, 0] - r[:, 0]) ** 2).sum(-1) / (r[:, 0] ** 2).sum(-1).clamp_min(1e-12)}
    pq, pr = torch.log_softmax(zq @ probe.weight.T + probe.bias, -1), torch.log_softmax(zr @ probe.weight.T + probe.bias, -1)
    out["probe_kl"] = (pr.exp() * (pr - pq)).sum(-1).clamp_min(0)
    return out


@torch.no_grad()
def measured_costs(model: nn.Module, calib: torch.Tensor, score: torch.Tensor, names: Sequence[str],
                   candidates: Sequence[tuple[int, int]], probe, blocks: Optional[BlockModel] = None,
                   act_quant: str = "smooth", weight_method: str = "gptq", batch_size: int = 16,
                   cache: Optional[Path] = None, log: Callable[[str], None] = print) -> dict:
    """Per (layer, candidate, scoring image) distortion of each output in :data:`OUTPUTS`.

    Returns ``{"names", "candidates", "n_images", "seconds", <output>: [L][C][N]}``; cached on disk
    (keyed by the weights, both image sets, the options) when ``cache`` is a directory.
    """
    from mixq.nn import QuantLinear
    import mixq.quantize as quant_mod
    from mixq.config import CalibrationConfig
    from mixq.quantize import find_linears

    if calib.dim() != 4 or score.dim() != 4 or len(calib) == 0 or len(score) == 0:
        raise ValueError("calib and score must be non-empty image batches [N, 3, H, W]")
    blocks = blocks or dinov2_blocks(model)
    key = _cost_key(model, calib, score, names, candidates, act_quant, weight_method, probe)
    path = None if cache is None else Path(cache) / f"measured_costs-{key}.json"
    if path is not None and path.is_file():
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    model.eval()
    linears = find_linears(model, lambda n, m: n in set(names))
    samples, _ = quant_mod.calibrate(model, linears, calib, CalibrationConfig(), progress=False)
    # FP block inputs on the scoring images (the prefix of every perturbed pass), and FP tokens
    block_in: list[list[torch.Tensor]] = [[] for _ in blocks.blocks]
    ref_tok = []
    for i in range(0, len(score), batch_size):
        x = blocks.embed(score[i: i + batch_size])
        for j, blk in enumerate(blocks.blocks):
            block_in[j].append(x)
            x = blk(x)
        ref_tok.append(blocks.head(x))
    out = {k: np.zeros((len(names), len(candidates), len(score))) for k in OUTPUTS}
    for li, name in enumerate(names):
        k = _block_of(name, blocks.prefix)
        original = model.get_submodule(name)
        t = time.perf_counter()
        for ci, (w, a) in enumerate(candidates):
            q = QuantLinear.from_float(original, w, a, act_quant=act_quant, act_samples=samples[name], simulate=True,
                                       weight_method=weight_method)
            set_module(model, name, q)
            try:
                col = {o: [] for o in OUTPUTS}
                for bi, x in enumerate(block_in[k]):
                    for blk in list(blocks.blocks)[k:]:
                        x = blk(x)
                    for o, v in _distortions(blocks.head(x), ref_tok[bi], probe).items():
                        col[o].append(v)
                for o in OUTPUTS:
                    out[o][li, ci] = torch.cat(col[o]).numpy()
            finally:
                set_module(model, name, original)
        log(f"measured costs {li + 1}/{len(names)} {name} ({time.perf_counter() - t:.1f} s)")
    result = {"names": list(names), "candidates": [list(c) for c in candidates], "n_images": len(score),
              "seconds": time.perf_counter() - t0, **{o: out[o].tolist() for o in OUTPUTS}}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(path)
    return result


def _cost_key(model, calib, score, names, candidates, act_quant, weight_method, probe) -> str:
    h = hashlib.sha256()
    for n, v in model.state_dict().items():
        h.update(n.encode() + repr(float(v.double().sum())).encode())
    for t in (calib, score, probe.weight):
        h.update(repr((tuple(t.shape), float(t.double().sum()), float(t.double().abs().sum()))).encode())
    h.update(json.dumps([list(names), [list(c) for c in candidates], act_quant, weight_method, "v1"]).encode())
    return h.hexdigest()[:24]


def cost_table(costs: dict, outputs: Sequence[str] | dict = ("feat",), n_images: Optional[int] = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Allocation costs [L, C] (each output's mean over the first ``n_images`` images, scaled so the
    noisiest choice averages 1 per layer, then summed with weights) and per-image importances
    [L, N] at the noisiest candidate, as shares per image (for the synergy term)."""
    weights = outputs if isinstance(outputs, dict) else {o: 1.0 for o in outputs}
    unknown = [o for o in weights if o not in OUTPUTS]
    if unknown:
        raise ValueError(f"unknown outputs {unknown}; allowed: {OUTPUTS}")
    table = 0.0
    per_image = 0.0
    for o, wgt in weights.items():
        v = np.asarray(costs[o], dtype=np.float64)[:, :, :n_images]
        if not np.isfinite(v).all():
            raise ValueError(f"measured costs for {o!r} contain NaN or infinite values")
        m = v.mean(axis=2)
        worst = m.max(axis=1).mean()
        table = table + wgt * (m / worst if worst > 0 else m)
        lowest = int(np.argmax(m.sum(axis=0)))  # the noisiest candidate
        raw = v[:, lowest, :]
        per_image = per_image + wgt * raw / np.maximum(raw.sum(axis=0, keepdims=True), 1e-300)
    return np.asarray(table), np.asarray(per_image)


class Planner:
    """Solves allocation problems for one model on one calibration set (inventory measured once)."""

    def __init__(self, model: nn.Module, calib: torch.Tensor, filter_fn) -> None:
        from mixq.scores.inventory import adjacent_pairs, build_inventory

        self.layers = build_inventory(model, calib, filter_fn)
        self.names = [l.name for l in self.layers]
        self.pairs = adjacent_pairs(self.layers)
        self.macs_total = sum(l.macs for l in self.layers)

    def solve(self, costs: np.ndarray, candidates: Sequence[tuple[int, int]], budget: float, bops_budget: str,
              per_image: Optional[np.ndarray] = None, lam: float = 0.05, label: str = "measured"):
        """A :class:`mixq.alloc.Plan` minimizing ``costs`` (+ synergy from ``per_image`` when lam > 0)."""
        from mixq.alloc import AllocationProblem, solve_plan
        from mixq.scores.synergy import synergy_scores

        syn = [0.0] * len(self.pairs)
        if lam > 0 and per_image is not None and self.pairs:
            syn = synergy_scores(np.asarray(per_image).tolist(), self.pairs)
            top = max(syn)
            syn = [s / top if top > 0 else 0.0 for s in syn]
        problem = AllocationProblem(
            names=list(self.names), candidates=[tuple(c) for c in candidates], costs=np.asarray(costs),
            weight_params=[l.weight_params for l in self.layers], out_features=[l.out_features for l in self.layers],
            has_bias=[l.bias for l in self.layers], macs=[l.macs for l in self.layers],
            pairs=list(self.pairs), synergy=syn, lam=lam)
        return solve_plan(problem, budget, bops_budget, synergy=lam > 0, scorer=label)


def plan_mix(plan) -> str:
    """'20xW6A8, 28xW4A6'-style count of the plan's choices."""
    from collections import Counter

    c = Counter(f"W{w}A{a}" for w, a in plan.layers.values())
    return ", ".join(f"{n}x{k}" for k, n in sorted(c.items(), key=lambda kv: -kv[1]))


def is_uniform(plan) -> bool:
    return len(set(plan.layers.values())) == 1


# ----------------------------------------------------------------------------- plots


# plot_frontier lives in mixq.report (floor 8, matplotlib only) so `mixq report` can draw it; it is
# re-exported here, where the sweep has always imported it from.


def between_budgets(points: Sequence[tuple[float, float]] = ((4.5, 24 / 64), (5.0, 36 / 64), (5.5, 36 / 64),
                                                             (7.0, 48 / 64))) -> list[tuple[float, str]]:
    """Budgets between uniform points: (average weight bits, BOPs fraction string)."""
    out = []
    for wb, frac in points:
        if not 4 <= wb <= 8 or not 0 < frac <= 1 or math.isnan(wb):
            raise ValueError(f"budget ({wb}, {frac}) outside 4..8 bits / (0, 1] of W8A8")
        out.append((float(wb), f"{frac:.10f}".rstrip("0") + "x"))
    return out


def frontier_points(points: dict, summaries: Optional[dict] = None) -> list[dict]:
    """The points a frontier plot shows (as :func:`mixq.report.plot_frontier` takes them): every
    uniform point and every default-variant mixed plan of a sweep's ``points``, each metric with its
    paired-bootstrap interval. The FP row, the allocator variants, the channel-activation points and
    the points with quantized attention are left out: they are not on the frontier's recipe. ``summaries`` ({key: summarize(...)}) saves
    recomputing intervals the caller already has; without it, points lacking per-image values are skipped."""
    from .harness import summarize

    out = []
    for key, p in points.items():
        if key == "fp" or p.get("kind") == "fp" or "channel" in key or p.get("attn"):
            continue
        if p["kind"] == "mixed" and p.get("variant", "default") != "default":
            continue
        if summaries is not None:
            summ = summaries.get(key)
        else:
            summ = summarize(p["per_image"]) if "per_image" in p else None
        if summ is None:
            continue
        out.append({"kind": p["kind"], "label": str(p["label"]).replace("mixed ", ""), "bops": float(p["bops"]),
                    "wbits": float(p["wbits"]), "metrics": {m: iv.to_dict() for m, iv in summ.items()}})
    return out
