"""Wall-clock latency of float, mixq and PyTorch-int8 models on the current device, in one table.

Every table mixq prints (the demo, ``mixq bench``, bench/bench_cpu_model.py) holds the same
competitors, timed in the same interleaved rounds (:mod:`mixq.timing`): float32, bfloat16 and, on
the CPU, PyTorch's int8 dynamic Linear on both of its x86 engines (fbgemm and oneDNN, which use
different kernels: oneDNN reaches AMX where the CPU has it). A mixq row slower than float32 gets a
footnote saying why, so a table can never show that without an explanation.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from . import timing
from .data import run_model

FLOAT32 = "float32"
BFLOAT16 = "bfloat16"
INT8_ENGINES = ("fbgemm", "onednn")
INT8_PREFIX = "torch int8 dynamic"


def int8_name(engine: str) -> str:
    """The table row of PyTorch's int8 dynamic Linear on ``engine``."""
    return f"{INT8_PREFIX} ({engine})"


BASELINE_NAMES = (FLOAT32, BFLOAT16) + tuple(int8_name(e) for e in INT8_ENGINES)


@dataclass
class Latency:
    name: str
    median_ms: float
    min_ms: float
    iters: int
    device: str
    threads: int

    def as_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def measure(
    name: str, fn: Callable[[], Any], device: torch.device | str = "cpu", warmup: int = 2, iters: int = 10,
    min_seconds: float = 0.0,
) -> Latency:
    """``mixq.timing``'s median over ``iters`` rounds (each >= ``min_seconds / iters`` long)."""
    t = timing.time_callable(fn, rounds=iters, min_round_s=min_seconds / max(iters, 1), device=device,
                             warmup=warmup)
    return Latency(name, t.median_ms, t.min_s * 1e3, t.rounds * t.calls_per_round, str(torch.device(device)),
                   torch.get_num_threads())


def torch_int8_dynamic(model: nn.Module, layer_names: list[str], engine: str = "fbgemm") -> nn.Module:
    """PyTorch's int8 dynamic quantized Linear on the same layers mixq quantizes, packed for ``engine``
    ("fbgemm" or "onednn"); the process-wide engine setting is restored afterwards (the packed
    weights keep the engine they were packed for)."""
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    supported = torch.backends.quantized.supported_engines
    if engine not in supported:
        raise ValueError(f"quantized engine {engine!r} is not in this torch build; supported: {supported}")
    previous = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = engine
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao deprecation notices
            return quantize_dynamic(copy.deepcopy(model), {n: default_dynamic_qconfig for n in layer_names},
                                    dtype=torch.qint8)
    finally:
        torch.backends.quantized.engine = previous


def _cast_floats(batch: Any, dtype: torch.dtype) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: _cast_floats(v, dtype) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_cast_floats(v, dtype) for v in batch)
    return batch


class CastInputs(nn.Module):
    """A model whose float inputs are cast to ``dtype``; with ``cast_model`` the model is cast too (the
    bfloat16 row: what a user gets from ``model.to(torch.bfloat16)``). A quantized model whose float
    parts were cast by ``mixq.nn.cast_float_parts`` takes ``cast_model=False``."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, cast_model: bool = True) -> None:
        super().__init__()
        self.model, self.dtype = (model.to(dtype) if cast_model else model), dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*_cast_floats(args, self.dtype), **_cast_floats(kwargs, self.dtype))


def baselines(fp: nn.Module, layer_names: Iterable[str], device: torch.device | str = "cpu") -> dict[str, nn.Module]:
    """The competitors of every latency table: float32, bfloat16 and, on the CPU, torch int8 dynamic
    on fbgemm and on oneDNN (an engine this torch build lacks is left out), on ``layer_names``."""
    device = torch.device(device)
    fp = fp.eval()
    models: dict[str, nn.Module] = {FLOAT32: fp.to(device), BFLOAT16: CastInputs(copy.deepcopy(fp), torch.bfloat16)}
    if device.type == "cpu":
        names = list(layer_names)
        for engine in INT8_ENGINES:
            if engine in torch.backends.quantized.supported_engines:
                models[int8_name(engine)] = torch_int8_dynamic(fp, names, engine).eval()
    return models


def compare(
    models: dict[str, nn.Module], batch: Any, device: torch.device | str = "cpu", iters: int = 10,
    reference: Optional[str] = None, min_round_s: float = 0.0,
) -> list[dict]:
    """Time every model on ``batch`` in the same interleaved rounds (``mixq.timing.interleaved_times``,
    ``iters`` rounds); rows carry the speedup over ``reference`` (default: float32 when present,
    else the first model) and over the fastest of the baselines (``vs_best_baseline``)."""
    runs = {name: (lambda m=model: run_model(m, batch)) for name, model in models.items()}
    times = timing.interleaved_times(runs, rounds=iters, min_round_s=min_round_s, device=device)
    dev, threads = str(torch.device(device)), torch.get_num_threads()
    rows = [Latency(name, t.median_ms, t.min_s * 1e3, t.rounds * t.calls_per_round, dev, threads).as_dict()
            for name, t in times.items()]
    ref_name = reference or (FLOAT32 if FLOAT32 in models else next(iter(models)))
    if ref_name not in models:
        raise ValueError(f"reference {ref_name!r} is not one of the timed models {list(models)}")
    ref = times[ref_name].median_ms
    base = [r["median_ms"] for r in rows if r["name"] in BASELINE_NAMES]
    best = min(base) if base else None
    for r in rows:
        r["speedup"] = ref / r["median_ms"]
        r["vs_best_baseline"] = best / r["median_ms"] if best else None
    return rows


def kernel_path() -> str:
    """The CPU kernel family mixq's C++ extension runs ("amx", "vnni", "avx2", "scalar"; "not built")."""
    try:
        from . import _C
    except ImportError:
        return "not built"
    return str(_C.kernel_path())


def slow_footnote(name: str, ratio: float, path: str, flags: list[str], backends: Iterable[str] = ()) -> str:
    """Why a mixq row is slower than float32: the kernel family in use against what this CPU has."""
    why = []
    backends = sorted(set(backends))
    if backends and "cpu" not in backends:
        why.append(f"its Linears run on the {', '.join(backends)} backend, not mixq's C++ kernels")
    if path in ("scalar", "not built"):
        why.append(f"mixq's CPU kernels are `{path}` here (no AVX2 path in use)")
    elif "amx_int8" in flags and path != "amx":
        why.append(f"mixq's GEMM runs its `{path}` kernels while this CPU has AMX-INT8/AMX-BF16 (which "
                   "bfloat16 and oneDNN's int8 reach)")
    else:
        why.append(f"mixq's GEMM runs its `{path}` kernels")
    why.append("the float parts of the forward (convolutions, attention, GELU, LayerNorm) cost the same in "
               "both, so only the Linears' share can speed up")
    return f"{name} is {1 / ratio:.2f}x the time of float32: " + "; ".join(why) + "."


def markdown_table(rows: list[dict], mixq_names: Iterable[str], caption: str = "",
                   backends: Iterable[str] = ()) -> str:
    """The latency table (median, min, vs float32, vs the best baseline) with a footnote for every
    mixq row slower than float32 and a line naming the machine and mixq's kernel family."""
    mixq_names = set(mixq_names)
    path, flags = kernel_path(), timing.cpu_flags()
    notes: list[str] = []
    lines = [f"| model | median ms{caption} | min ms | vs float32 | vs best baseline |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        mark = ""
        if r["name"] in mixq_names and r["speedup"] < 1.0:
            notes.append(slow_footnote(r["name"], r["speedup"], path, flags, backends))
            mark = f" [{len(notes)}]"
        best = f"{r['vs_best_baseline']:.2f}x" if r.get("vs_best_baseline") else "–"
        lines.append(f"| {r['name']}{mark} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['speedup']:.2f}x | "
                     f"{best} |")
    lines.append("")
    lines.append(f"Same interleaved rounds for every row ({rows[0]['iters'] if rows else 0} calls each); "
                 f"mixq CPU kernel family: `{path}`; machine: {timing.machine()}.")
    lines += [f"[{i}] {n}" for i, n in enumerate(notes, 1)]
    return "\n".join(lines)
