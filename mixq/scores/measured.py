"""Measured costs: every (layer, candidate) measured, quantized the way ``quantize_`` quantizes it.

The KL scorer measures two numbers per layer and extrapolates every other choice with the noise
model I·4^-(bits); the Pareto sweep (bench/pareto.py, docs/ALLOCATION_EXPERIMENTS.md) found that
measuring each choice instead pays: GPTQ and smoothing change how error falls with bits. Here each
layer alone is replaced by the ``QuantLinear`` that ``quantize_`` would build at each candidate
(smooth activations from the same calibration rows, GPTQ weights by default), everything else stays
float, and KL(P_fp || P_q) of ``output_fn`` is recorded per calibration image.

Why it is affordable. Two exact shortcuts, neither of which changes a single bit of the result:

* **Prefix caching** (:class:`PrefixCache`). Transformers run their layers inside a sequence of
  blocks (timm ViT/DeiT/DINOv2 ``blocks``, SAM ``image_encoder.blocks`` and its two-way decoder
  ``layers``). A block call that *finished* in the FP forward before the perturbed layer was first
  called cannot depend on that layer, so in each perturbed forward those calls return their
  recorded FP outputs instead of running. The rest of the model (embedding, the blocks from the
  perturbed one on, final norm, head or decoder, ``output_fn``) runs exactly as in a full forward.
  For the 48 Linears of a 12-block ViT that skips 5.5 of 12 blocks per pass on average.
* **GPTQ once per (layer, weight bits)**: smoothing does not depend on the activation bits, so the
  weights GPTQ sees are the same for every activation width; the result is reused (keyed by bytes).

Cache size: the recorded block outputs, about N images x tokens x width x 4 bytes x blocks (DINOv2-S
at 224 px, 8 images: 8 x 257 x 384 x 4 x 12 = 38 MB; SAM ViT-B at 1024 px: 151 MB per image). Above
``max_prefix_mb`` (default 2048, or ``$MIXQ_PREFIX_CACHE_MB``) the scorer logs one line and runs full
forwards, with the same numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ..data import iter_batches, model_device
from ..modules import find_linears, set_module
from ..nn import QuantLinear
from ..progress import progress_bar
from . import cache
from .outputs import OutputFn, check_probs, kl_per_row, softmax_probs

log = logging.getLogger("mixq")

MEASURED = "quantize_-smooth-v1"  # part of the cache key: how the layer is quantized
DEFAULT_PREFIX_MB = 2048.0  # bound on the recorded block outputs; $MIXQ_PREFIX_CACHE_MB overrides


def prefix_limit_mb(max_prefix_mb: Optional[float] = None) -> float:
    """The prefix-cache bound in MB: the argument, else ``$MIXQ_PREFIX_CACHE_MB``, else 2048."""
    if max_prefix_mb is not None:
        return float(max_prefix_mb)
    env = os.environ.get("MIXQ_PREFIX_CACHE_MB")
    if env:
        try:
            return float(env)
        except ValueError:
            raise ValueError(f"MIXQ_PREFIX_CACHE_MB must be a number of megabytes, got {env!r}") from None
    return DEFAULT_PREFIX_MB


# ----------------------------------------------------------------------------- blocks


def find_blocks(model: nn.Module, names: list[str]) -> list[str]:
    """Module names of the blocks whose FP outputs the prefix cache may replay.

    A block is a child of an ``nn.ModuleList``/``nn.Sequential`` with at least two children, none
    of which is itself a Linear, and at least one of which holds one of the layers ``names``; of
    nested such containers only the innermost count (Swin: each stage's ``blocks``, not
    ``layers``). ViT/DeiT/DINOv2 ``blocks.<i>``, SAM ``image_encoder.blocks.<i>`` and
    ``mask_decoder.transformer.layers.<i>``. Empty when the model has none. Any choice is exact
    (:class:`PrefixCache`); the choice only decides how much work is skipped.
    """
    wanted = set(names)
    containers = []
    for cname, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or len(mod) < 2:
            continue
        kids = list(mod.named_children())
        prefix = f"{cname}." if cname else ""
        if (not any(isinstance(k, nn.Linear) for _, k in kids)
                and any(n.startswith(f"{prefix}{kn}.") for kn, _ in kids for n in wanted)):
            containers.append(cname)
    inner = [c for c in containers
             if not any(o != c and (o.startswith(c + ".") or (c == "" and o)) for o in containers)]
    blocks = []
    for c in inner:
        mod = model.get_submodule(c) if c else model
        blocks += [f"{c}.{kn}" if c else kn for kn, _ in mod.named_children()]
    return blocks


def _clone(out: Any) -> Any:
    """A detached copy of a block output (a tensor, or tuples/lists of them); None if it is anything else."""
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if isinstance(out, (tuple, list)):
        items = [_clone(o) for o in out]
        return None if any(i is None for i in items) else type(out)(items)
    return None


def _nbytes(out: Any) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    return sum(_nbytes(o) for o in out)


class PrefixCache:
    """FP outputs of every block call, per calibration batch, and when each call happened relative
    to the first call of each scored layer; :meth:`replaying` makes a forward return them.

    Exactness: a block call that returned before layer L was first called cannot depend on L, and
    the recorded output is bit-identical to what the same call computes in a forward where L is
    perturbed, so replaying it changes nothing but the time taken. Each replayed output is a fresh
    copy (a later in-place op cannot corrupt the cache). The forward must make the same block calls,
    in the same order, in every pass; :meth:`replaying` checks the call counts afterwards.
    """

    def __init__(self, model: nn.Module, blocks: list[str], names: list[str]) -> None:
        self.model = model
        self.blocks = blocks
        self.names = names
        self.outputs: list[dict[int, list[Any]]] = []  # [batch][block index] -> outputs per call
        self.ends: list[dict[int, list[int]]] = []  # [batch][block index] -> end sequence number per call
        self.first: list[dict[str, int]] = []  # [batch][layer name] -> sequence number of its first call
        self.nbytes = 0
        self.overflow = False

    @contextlib.contextmanager
    def recording(self, limit_bytes: float) -> Iterator[None]:
        """Hooks that record one forward (one batch) per ``output_fn`` call, until the caller's block ends."""
        handles = []
        state = {"seq": 0}
        self._limit = limit_bytes

        def start_batch() -> None:
            self.outputs.append({}), self.ends.append({}), self.first.append({})
            state["seq"] = 0

        def block_end(i: int):
            def hook(mod, args, out):
                state["seq"] += 1
                if self.overflow:
                    return
                copy = _clone(out)
                if copy is None:
                    self._give_up(f"block {self.blocks[i]!r} returns {type(out).__name__}, not tensors")
                    return
                self.nbytes += _nbytes(copy)
                if self.nbytes > self._limit:
                    self._give_up(f"the recorded block outputs would exceed {self._limit / 2**20:.0f} MB")
                    return
                self.outputs[-1].setdefault(i, []).append(copy)
                self.ends[-1].setdefault(i, []).append(state["seq"])
            return hook

        def layer_start(name: str):
            def hook(mod, args):
                state["seq"] += 1
                self.first[-1].setdefault(name, state["seq"])
            return hook

        self._start_batch = start_batch
        try:
            for i, b in enumerate(self.blocks):
                handles.append(self.model.get_submodule(b).register_forward_hook(block_end(i)))
            for n in self.names:
                handles.append(self.model.get_submodule(n).register_forward_pre_hook(layer_start(n)))
            yield
        finally:
            for h in handles:
                h.remove()

    def _give_up(self, why: str) -> None:
        self.overflow = True
        self.why = why
        self.outputs = []
        self.nbytes = 0

    def new_batch(self) -> None:
        self._start_batch()

    def usable(self) -> bool:
        return bool(self.blocks) and not self.overflow

    def skipped_calls(self, name: str) -> int:
        """How many block calls (over all batches) a perturbed pass of ``name`` replays."""
        return sum(sum(e < first.get(name, 0) for es in ends.values() for e in es)
                   for ends, first in zip(self.ends, self.first))

    @contextlib.contextmanager
    def replaying(self, batch: int, name: str) -> Iterator[None]:
        """Within the block, one forward of batch ``batch`` with layer ``name`` perturbed replays every
        block call that ended before ``name`` was first called in the FP forward."""
        first = self.first[batch].get(name)
        patched = []
        counters: dict[int, int] = {}
        if first is not None:
            for i, ends in self.ends[batch].items():
                if not any(e < first for e in ends):
                    continue
                mod = self.model.get_submodule(self.blocks[i])
                original = mod.forward
                outs = self.outputs[batch][i]

                def forward(*args, _i=i, _original=original, _ends=ends, _outs=outs, **kwargs):
                    k = counters.get(_i, 0)
                    counters[_i] = k + 1
                    if k < len(_ends) and _ends[k] < first:
                        return _clone(_outs[k])
                    return _original(*args, **kwargs)

                had_own = "forward" in mod.__dict__
                mod.forward = forward
                patched.append((mod, i, had_own, original))
        try:
            yield
        finally:
            for mod, _, had_own, original in patched:
                if had_own:
                    mod.forward = original
                else:
                    del mod.forward
        for mod, i, _, _ in patched:
            if counters.get(i, 0) != len(self.ends[batch][i]):
                raise RuntimeError(f"block {self.blocks[i]!r} ran {counters.get(i, 0)} times in a perturbed pass and "
                                   f"{len(self.ends[batch][i])} in the FP pass; run measured_scores with "
                                   f"prefix_cache=False for this model")


# ----------------------------------------------------------------------------- GPTQ reuse


def _bytes_key(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    return f"{tuple(t.shape)}|{t.dtype}|" + hashlib.sha1(t.numpy().tobytes()).hexdigest()


@contextlib.contextmanager
def _gptq_once() -> Iterator[None]:
    """Reuse GPTQ's result when the same weights, bits, Hessian and options come back (keyed by their
    bytes, so exact): the candidates of one layer share their weight widths."""
    import mixq.gptq as gptq_mod

    original = gptq_mod.quantize_weight_gptq
    memo: dict = {}

    def gptq(w, bits, h, *args, **kwargs):
        key = (bits, repr(args), repr(sorted(kwargs.items())), _bytes_key(w), _bytes_key(h))
        if key not in memo:
            if len(memo) > 8:  # one layer's widths at a time; older layers are not asked again
                memo.clear()
            memo[key] = original(w, bits, h, *args, **kwargs)
        q, s = memo[key]
        return q.clone(), s.clone()

    gptq_mod.quantize_weight_gptq = gptq
    try:
        yield
    finally:
        gptq_mod.quantize_weight_gptq = original


# ----------------------------------------------------------------------------- the scorer


def measured_scores(model: nn.Module, calib_data: Any, names: list[str], candidates: list[tuple[int, int]],
                    output_fn: Optional[OutputFn] = None, batch_size: int = 8, weight_method: str = "gptq",
                    act_quant: str = "smooth", max_calib_rows: int = 2048, progress: bool = True,
                    cache_dir: cache.CacheDir = None, prefix_cache: bool = True,
                    max_prefix_mb: Optional[float] = None) -> dict:
    """KL(P_fp || P) per image for every (layer, candidate), the layer quantized as ``quantize_`` would.

    prefix_cache: replay FP block outputs that the perturbed layer cannot change (module docstring);
        the numbers are the same either way, so it is not part of the score-cache key.
    max_prefix_mb: bound on the recorded block outputs (default ``$MIXQ_PREFIX_CACHE_MB`` or 2048);
        above it the scorer logs one line and runs full forwards.

    Returns ``{"names", "candidates", "per_image": [L][C][N], "kl": [L][C]}`` (``kl``: the mean over images).
    """
    from ..config import CalibrationConfig
    from ..quantize import calibrate

    output_fn = output_fn or softmax_probs
    if weight_method not in ("gptq", "rtn"):
        raise ValueError(f"weight_method must be 'gptq' or 'rtn', got {weight_method!r}")
    if act_quant not in ("smooth", "dynamic"):
        raise ValueError(f"act_quant must be 'smooth' or 'dynamic', got {act_quant!r}")
    limit_mb = prefix_limit_mb(max_prefix_mb)
    params = {"kind": "measured", "names": names, "cands": [list(c) for c in candidates], "bs": batch_size,
              "weights": weight_method, "act": act_quant, "rows": max_calib_rows, "how": MEASURED,
              "out": cache.callable_key(output_fn), "device": str(model_device(model))}

    def compute() -> dict:
        model.eval()
        wanted = set(names)
        with torch.no_grad():
            targets = find_linears(model, lambda n, m: n in wanted)
            missing = [n for n in names if n not in targets]
            if missing:
                raise ValueError(f"layers {missing[:4]} are not float nn.Linear modules of the model")
            batches = list(iter_batches(calib_data, batch_size))
            prefix = PrefixCache(model, find_blocks(model, names) if prefix_cache else [], names)
            reference = []
            with prefix.recording(limit_mb * 2**20):
                for b in batches:
                    prefix.new_batch()
                    reference.append(check_probs(output_fn(model, b)).detach())
            if prefix_cache and not prefix.blocks:
                log.info("mixq: measured costs: no blocks of scored layers found; every pass is a full forward")
            elif prefix_cache and prefix.overflow:
                log.warning("mixq: measured costs: prefix cache off (%s; limit max_prefix_mb or "
                            "$MIXQ_PREFIX_CACHE_MB); every pass is a full forward", prefix.why)
            config = CalibrationConfig(max_calib_rows=max_calib_rows, batch_size=batch_size)
            samples, _ = calibrate(model, targets, calib_data, config, progress=False)
            per_image: list[list[list[float]]] = [[] for _ in names]
            jobs = [(li, ci) for li in range(len(names)) for ci in range(len(candidates))]
            desc = f"measured costs ({len(names)} layers x {len(candidates)} candidates)"
            with _gptq_once():
                for li, ci in progress_bar(jobs, desc, progress, total=len(jobs)):
                    name, (w, a) = names[li], candidates[ci]
                    original = targets[name]
                    q = QuantLinear.from_float(original, w, a, act_quant=act_quant, act_samples=samples.get(name),
                                               simulate=True, weight_method=weight_method)
                    set_module(model, name, q)
                    try:
                        kl = []
                        for bi, (b, p) in enumerate(zip(batches, reference)):
                            replay = prefix.replaying(bi, name) if prefix.usable() else contextlib.nullcontext()
                            with replay:
                                kl.append(kl_per_row(p, output_fn(model, b).detach()))
                        per_image[li].append(torch.cat(kl).tolist())
                    finally:
                        set_module(model, name, original)
        return {"names": list(names), "candidates": [list(c) for c in candidates], "per_image": per_image,
                "kl": [[sum(v) / len(v) for v in row] for row in per_image]}

    return cache.cached(cache_dir, "measured", model, calib_data, params, compute)


def measured_cost_table(result: dict) -> tuple[Any, Any]:
    """(costs [L, C], per-image shares [L, N]) from :func:`measured_scores`: costs are the mean KL,
    normalized later like every scorer's (mean 1 per layer at the noisiest candidate); the shares
    are each layer's KL at the noisiest candidate over the per-image total (for the synergy term)."""
    import numpy as np

    v = np.asarray(result["per_image"], dtype=np.float64)  # [L, C, N]
    if v.ndim != 3 or not np.isfinite(v).all():
        raise ValueError("measured per-image KL must be finite, shaped [layers][candidates][images]")
    costs = v.mean(axis=2)
    noisiest = int(np.argmax(costs.sum(axis=0)))
    raw = v[:, noisiest, :]
    total = raw.sum(axis=0, keepdims=True)
    shares = np.where(total > 0, raw / np.maximum(total, 1e-300), 0.0)
    return costs, shares
