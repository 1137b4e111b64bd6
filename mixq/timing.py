"""The one timer: interleaved medians of callables, and the machine they ran on.

Every speed figure mixq prints (bench/, the latency table the allocator budgets with, the report)
comes from here, so they are comparable. The callables take turns within each round: a change of
load on a shared CPU hits all of them alike, which keeps the ratios fair.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

import torch


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one callable: the median of the rounds and the fastest single call."""

    median_s: float
    min_s: float
    rounds: int
    calls_per_round: int

    @property
    def median_ms(self) -> float:
        return self.median_s * 1e3

    def as_dict(self) -> dict:
        return asdict(self)


def synchronize(device: torch.device | str | None) -> None:
    """Waits for queued device work (a no-op on the CPU), so a clock reading covers it."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(torch.device(device))


@torch.inference_mode()
def interleaved_times(
    runs: Mapping[str, Callable[[], Any]],
    rounds: int = 7,
    min_round_s: float = 0.02,
    device: torch.device | str | None = None,
    warmup: int = 2,
) -> dict[str, Timing]:
    """Times each callable over ``rounds`` interleaved rounds, after ``warmup`` calls each.

    A round runs a callable enough times (>= ``min_round_s``) that the clock's and Python's own
    overheads do not count; its time per call is one sample, and the median of the samples is the
    figure. The fastest single call is kept too: the least disturbed one when the machine is shared.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not runs:
        raise ValueError("interleaved_times needs at least one callable")
    reps: dict[str, int] = {}
    for name, run in runs.items():
        for _ in range(max(warmup - 1, 0)):
            run()
        synchronize(device)
        t0 = time.perf_counter()
        run()
        synchronize(device)
        reps[name] = max(1, int(min_round_s / max(time.perf_counter() - t0, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in runs}
    fastest: dict[str, float] = {name: float("inf") for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                t1 = time.perf_counter()
                run()
                synchronize(device)
                fastest[name] = min(fastest[name], time.perf_counter() - t1)
            samples[name].append((time.perf_counter() - t0) / reps[name])
    return {name: Timing(statistics.median(samples[name]), fastest[name], rounds, reps[name]) for name in runs}


def time_callable(fn: Callable[[], Any], rounds: int = 7, min_round_s: float = 0.02,
                  device: torch.device | str | None = None, warmup: int = 2) -> Timing:
    """``interleaved_times`` of one callable."""
    return interleaved_times({"fn": fn}, rounds, min_round_s, device, warmup)["fn"]


_ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform's guess elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> list[str]:
    """The ISA flags that decide mixq's CPU kernel family, as /proc/cpuinfo lists them."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [flag for flag in _ISA_FLAGS if flag in have]
    except OSError:
        pass
    return []


def machine() -> str:
    """One line naming the machine a figure came from: CPU, ISA flags, threads, load."""
    load = " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"{cpu_model()} ({os.cpu_count()} cores; {' '.join(cpu_flags()) or 'no AVX2'}); "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average {load}")
