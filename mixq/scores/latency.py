"""The latency table the allocator budgets with: measured time of every Linear at every candidate.

Why measured: no kernel mixq runs on makes A4 faster than A8 (VNNI and AMX multiply u8 x s8; Hopper
has no int4 MMA), and W4A8, W6A8 and W8A8 differ by shape and ISA, so BOPs do not predict speed.
For each Linear shape (M = tokens of one inference batch, K, N) the median time of mixq's own
``QuantLinear`` (through the backend the model runs on) at each candidate (w, a), and of the fp32
``F.linear``, all timed interleaved by :mod:`mixq.timing`. Identical shapes are measured once (the
qkv Linears of a ViT share one). Results are cached on disk per shape, keyed by everything that
changes a kernel's speed: device, CPU model and kernel family (``mixq._C.kernel_path()``) or GPU
name, backend, torch threads, shape, bits, activation mode. The model's non-Linear time (norms,
attention, GELU...) is measured once per model, as the float model with its Linears stubbed out
(each returns a recorded output), and added to every prediction as a constant.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import timing
from ..data import batch_to, iter_batches, model_device, run_model
from ..formats import SUPPORTED_BITS
from ..progress import progress_bar
from .cache import CacheDir, cache_root, fingerprint, load, store

LATENCY_FORMAT = 1  # bump when what a cached entry means changes
FP32 = "fp32"
DEFAULT_CANDIDATES = tuple((w, a) for w in SUPPORTED_BITS for a in SUPPORTED_BITS)


def bits_label(bits: tuple[int, int]) -> str:
    return f"W{bits[0]}A{bits[1]}"


def device_key(device: torch.device | str = "cpu", backend: Optional[str] = None,
               threads: Optional[int] = None) -> dict:
    """What a timing depends on besides the shape: the cache key's machine part."""
    from ..backends import select_backend

    device = torch.device(device)
    key: dict[str, Any] = {"format": LATENCY_FORMAT, "device": device.type,
                           "backend": backend or select_backend(device),
                           "threads": int(threads if threads is not None else torch.get_num_threads()),
                           "torch": torch.__version__}
    if device.type == "cuda":
        key["gpu"] = torch.cuda.get_device_name(device)
    else:
        key["cpu"] = timing.cpu_model()
        key["isa"] = " ".join(timing.cpu_flags())
        key["kernel_family"] = kernel_family()
    return key


def kernel_family() -> str:
    """The CPU kernel family the C++ extension dispatches to ('vnni', 'avx2', ...; 'none' without it)."""
    try:
        from .. import _C  # type: ignore[attr-defined]
    except ImportError:
        return "none"
    return str(_C.kernel_path())


@dataclass(frozen=True)
class Shape:
    """One Linear call: ``m`` rows (tokens of one inference batch) x ``k`` inputs -> ``n`` outputs."""

    m: int
    k: int
    n: int
    bias: bool

    def __str__(self) -> str:
        return f"{self.m}x{self.k}x{self.n}" + ("" if self.bias else " (no bias)")


@dataclass
class LatencyTable:
    """Seconds per call of every planned Linear at fp32 and at every candidate, plus the rest.

    ``times[label]`` maps "fp32" and "W8A8"-style labels to seconds for shape ``shapes[label]``;
    ``layers`` maps each Linear name to its shape's label. ``model_s``: the whole float model on one
    inference batch (``batch`` images); ``other_s``: the same model with the listed Linears stubbed
    out (:func:`float_model_seconds`), the time no choice of bits changes.
    """

    key: dict
    batch: int
    act_quant: str
    layers: dict[str, str]
    shapes: dict[str, Shape]
    times: dict[str, dict[str, float]]
    model_s: float
    other_s: float
    reused: int = 0  # shape entries that came from the cache
    measured: int = 0  # shape entries measured in this run
    profile_s: float = 0.0
    extra: dict = field(default_factory=dict)

    def seconds(self, name: str, bits: Optional[tuple[int, int]]) -> float:
        """Time of Linear ``name`` at ``bits`` (None: fp32)."""
        entry = self.times[self.layers[name]]
        label = FP32 if bits is None else bits_label(bits)
        if label not in entry:
            raise KeyError(f"the latency table has no {label} time for {name!r}; measured: {sorted(entry)}")
        return entry[label]

    def layer_total(self, bits: Optional[tuple[int, int]] = None, names: Optional[Sequence[str]] = None) -> float:
        """Sum over the Linears (all, or ``names``) at one uniform ``bits`` (None: fp32)."""
        return sum(self.seconds(n, bits) for n in (names if names is not None else self.layers))

    def predict(self, layer_bits: dict[str, tuple[int, int]]) -> float:
        """Predicted end-to-end seconds: the constant, fp32 for unplanned Linears, the plan's bits else."""
        return self.other_s + sum(self.seconds(n, layer_bits.get(n)) for n in self.layers)

    def rows(self) -> list[tuple[str, int, list[str]]]:
        """(shape label, number of Linears with it, the Linear names) in first-use order."""
        out: dict[str, list[str]] = {}
        for name, label in self.layers.items():
            out.setdefault(label, []).append(name)
        return [(label, len(names), names) for label, names in out.items()]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shapes"] = {k: asdict(s) for k, s in self.shapes.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LatencyTable":
        d = dict(d)
        d["shapes"] = {k: Shape(**s) for k, s in d["shapes"].items()}
        return cls(**d)

    def markdown(self, candidates: Optional[Sequence[tuple[int, int]]] = None) -> str:
        """The table as Markdown: one row per shape, ms per call at fp32 and each candidate."""
        labels = [FP32] + [bits_label(c) for c in (candidates or _measured_candidates(self))]
        lines = ["| shape (M x K x N) | Linears | " + " | ".join(f"{l} ms" for l in labels) + " |",
                 "|---|---:|" + "---:|" * len(labels)]
        for label, count, _ in self.rows():
            entry = self.times[label]
            lines.append(f"| {self.shapes[label]} | {count} | "
                         + " | ".join(f"{entry[l] * 1e3:.3f}" if l in entry else "-" for l in labels) + " |")
        return "\n".join(lines)


def _measured_candidates(table: LatencyTable) -> list[tuple[int, int]]:
    found = {lab for entry in table.times.values() for lab in entry if lab != FP32}
    return [c for c in DEFAULT_CANDIDATES if bits_label(c) in found]


# ----------------------------------------------------------------------------- measuring


def _shape_key(key: dict, shape: Shape, act_quant: str) -> str:
    text = json.dumps({**key, **asdict(shape), "act_quant": act_quant}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _quant_linear(shape: Shape, bits: tuple[int, int], act_quant: str, backend: str, device: torch.device,
                  gen: torch.Generator) -> nn.Module:
    """A QuantLinear of ``shape`` at ``bits`` with random weights, built as quantize_ builds one."""
    from ..nn import QuantLinear

    lin = nn.Linear(shape.k, shape.n, bias=shape.bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(shape.n, shape.k, generator=gen) / math.sqrt(shape.k))
    samples = torch.randn(64, shape.k, generator=gen) if act_quant != "dynamic" else None
    q = QuantLinear.from_float(lin, bits[0], bits[1], act_quant=act_quant, act_samples=samples, backend=backend,
                               clip_search=False)
    return q.to(device).eval()


def time_shape(shape: Shape, candidates: Sequence[tuple[int, int]], key: dict, act_quant: str = "smooth",
               device: torch.device | str = "cpu", rounds: int = 7, min_round_s: float = 0.02,
               with_fp32: bool = True) -> dict[str, float]:
    """Seconds per call of the fp32 Linear and of QuantLinear at each candidate, timed interleaved."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape.m, shape.k, generator=gen).to(device)
    w = (torch.randn(shape.n, shape.k, generator=gen) / math.sqrt(shape.k)).to(device)
    b = torch.zeros(shape.n, device=device) if shape.bias else None
    runs: dict[str, Callable[[], Any]] = {}
    if with_fp32:
        runs[FP32] = lambda: F.linear(x, w, b)
    for bits in candidates:
        q = _quant_linear(shape, bits, act_quant, key["backend"], device, gen)
        runs[bits_label(bits)] = lambda q=q: q(x)
    times = timing.interleaved_times(runs, rounds=rounds, min_round_s=min_round_s, device=device)
    return {label: t.median_s for label, t in times.items()}


def _one_batch(calib_data: Any, batch: int, device: torch.device) -> Any:
    first = next(iter_batches(calib_data, batch))
    return batch_to(first, device)


def profile_latency(
    model: nn.Module,
    calib_data: Any,
    names: Optional[Sequence[str]] = None,
    filter_fn: Optional[Callable[[str, nn.Module], bool]] = None,
    candidates: Optional[Sequence[tuple[int, int]]] = None,
    batch: int = 1,
    act_quant: str = "smooth",
    backend: Optional[str] = None,
    cache_dir: CacheDir = None,
    progress: bool = True,
    rounds: int = 7,
    log: Optional[Callable[[str], None]] = None,
) -> LatencyTable:
    """Measure (or read from the cache) the latency table of ``model`` on its current device.

    ``names``: the Linears to time (default: every Linear that runs on the data, after
    ``filter_fn``); ``batch``: images per inference call, the M of each shape (the data's first
    ``batch`` samples set the tokens per image); ``act_quant``: the QuantLinear mode timed ("smooth",
    quantize_'s default; "dynamic"...). (8, 8) is always measured: the "0.8xw8a8" budget needs it.
    """
    import time

    from ..nn import ACT_MODES
    from .inventory import build_inventory

    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a whole number >= 1 (images per inference call), got {batch!r}")
    if act_quant not in ACT_MODES:
        raise ValueError(f"unknown act_quant={act_quant!r}; allowed: {list(ACT_MODES)}")
    t0 = time.perf_counter()
    cands = [tuple(map(int, c)) for c in (candidates if candidates is not None else DEFAULT_CANDIDATES)]
    if (8, 8) not in cands:
        cands.append((8, 8))
    device = model_device(model)
    key = device_key(device, backend)
    inputs = _one_batch(calib_data, batch, device)
    was_training = model.training
    model.eval()
    try:
        layers = build_inventory(model, inputs, filter_fn, batch_size=batch)
    finally:
        model.train(was_training)
    if names is not None:
        known = {l.name: l for l in layers}
        missing = [n for n in names if n not in known]
        if missing:
            raise ValueError(f"no Linear named {missing[:4]} ran on the data; known: {list(known)[:8]}...")
        layers = [known[n] for n in names]
    n_images = next((int(t.shape[0]) for t in _tensors(inputs) if t.dim() > 0), batch)
    table_layers: dict[str, str] = {}
    shapes: dict[str, Shape] = {}
    for l in layers:
        rows = round(l.macs / max(l.in_features * l.out_features, 1)) * n_images
        shape = Shape(rows, l.in_features, l.out_features, l.bias)
        label = str(shape)
        shapes[label] = shape
        table_layers[l.name] = label
    root = cache_root(cache_dir)
    times: dict[str, dict[str, float]] = {}
    reused = measured = 0
    for label in progress_bar(list(shapes), "latency table", enabled=progress):
        skey = _shape_key(key, shapes[label], act_quant)
        entry = dict(load(root, "latency", skey) or {})
        missing = [c for c in cands if bits_label(c) not in entry]
        if missing or FP32 not in entry:
            entry.update(time_shape(shapes[label], missing, key, act_quant, device, rounds=rounds,
                                    with_fp32=FP32 not in entry))
            store(root, "latency", skey, entry)
            measured += 1
        else:
            reused += 1
        times[label] = entry
        if log is not None:
            log(f"{label}: fp32 {entry[FP32] * 1e3:.3f} ms, W8A8 {entry['W8A8'] * 1e3:.3f} ms")
    model_s, other_s = float_model_seconds(model, inputs, list(table_layers), key, root, rounds)
    fp32_layers = sum(times[table_layers[n]][FP32] for n in table_layers)
    return LatencyTable(key=key, batch=n_images, act_quant=act_quant, layers=table_layers, shapes=shapes,
                        times=times, model_s=model_s, other_s=other_s, reused=reused, measured=measured,
                        profile_s=time.perf_counter() - t0,
                        extra={"model_minus_fp32_linears_s": model_s - fp32_layers})


def _tensors(batch: Any) -> list[torch.Tensor]:
    from ..data import tensors_in

    return tensors_in(batch)


def float_model_seconds(model: nn.Module, inputs: Any, names: Sequence[str], key: dict, root: Any = None,
                        rounds: int = 7) -> tuple[float, float]:
    """(whole float model, the model with the Linears ``names`` stubbed out) in seconds on ``inputs``.

    The second is the non-Linear time measured directly: each listed Linear returns the output it
    produced in a recorded pass instead of computing it, so what is timed is everything else (norms,
    attention, activations, the other Linears). Both are timed interleaved; cached per model,
    inputs, Linears and machine key."""
    mkey = fingerprint(model, [inputs], {"kind": "float-model-latency", **key, "rounds": rounds,
                                         "names": sorted(names)})
    hit = load(root, "latency-model", mkey)
    if hit is not None:
        return float(hit["model_s"]), float(hit["other_s"])
    modules = dict(model.named_modules())
    state = {"mode": "run"}
    recorded: dict[str, torch.Tensor] = {}

    def stub(name: str, forward: Callable) -> Callable:
        def fn(x: torch.Tensor) -> torch.Tensor:
            if state["mode"] == "stub":
                return recorded[name]
            out = forward(x)
            if state["mode"] == "record":
                recorded[name] = out
            return out
        return fn

    was_training = model.training
    model.eval()
    for n in names:
        modules[n].forward = stub(n, modules[n].forward)
    try:
        with torch.inference_mode():
            state["mode"] = "record"
            run_model(model, inputs)

        def run(mode: str) -> Callable[[], Any]:
            def fn() -> Any:
                state["mode"] = mode
                return run_model(model, inputs)
            return fn

        t = timing.interleaved_times({"model": run("run"), "other": run("stub")}, rounds=rounds, min_round_s=0.05,
                                     device=model_device(model))
    finally:
        for n in names:
            del modules[n].forward
        model.train(was_training)
    result = {"model_s": t["model"].median_s, "other_s": t["other"].median_s}
    store(root, "latency-model", mkey, result)
    return result["model_s"], result["other_s"]


def measure_model_seconds(model: nn.Module, calib_data: Any, batch: int = 1, rounds: int = 5) -> float:
    """End-to-end seconds of ``model`` (float or quantized) on one inference batch, never cached."""
    device = model_device(model)
    inputs = _one_batch(calib_data, batch, device)
    model.eval()
    return timing.time_callable(lambda: run_model(model, inputs), rounds=rounds, min_round_s=0.05,
                                device=device).median_s
