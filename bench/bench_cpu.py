"""CPU speed of mixq's QuantLinear against fp32 nn.Linear and fbgemm's int8 dynamic Linear.

Every mixq timing is end to end, as a real Linear runs: ``QuantLinear(act_quant="dynamic")``
forward (per-token activation quantization, packed GEMM, fused epilogue: one C++ call behind one
custom op), fp32 in and out, against ``torch.ao.quantization.quantize_dynamic`` (fbgemm) on the same
weights; the "raw" columns time that C++ call alone, so the table also gives QuantLinear's per-call
Python overhead. Shapes: issue 14's ViT-S/ViT-B batch-1, BERT-small and SAM-B Linears, plus
ViT-B/16 batch 8.

    pytest bench/bench_cpu.py --benchmark-only                  # pytest-benchmark, few rounds
    python bench/bench_cpu.py --table [--quick] [--threads T]   # Markdown table, interleaved medians
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time
import warnings
from typing import Callable

import pytest
import torch

from mixq import formats, ops

# (name, M, K, N): the table of issue 14 first, then ours.
TABLE_SHAPES = [
    ("ViT-S qkv, batch 1", 257, 384, 1152),
    ("ViT-S fc2, batch 1", 257, 1536, 384),
    ("ViT-B fc1, batch 1", 197, 768, 3072),
    ("BERT-small fc1", 2048, 384, 1536),
    ("SAM-B fc1", 4096, 768, 3072),
    ("SAM-B qkv", 4096, 768, 2304),
    ("ViT-B proj, batch 1", 197, 768, 768),
    ("ViT-B fc2, batch 8", 1576, 3072, 768),
]
SHAPES = [(m, k, n) for _, m, k, n in TABLE_SHAPES]
QUANT = ["W8A8", "W6A8", "W4A8", "W4A4"]
IMPLS = ["fp32", "fbgemm"] + QUANT
# "raw": the C++ call QuantLinear makes (CpuBackend.linear_dynamic with the overflow headroom:
# quantize, GEMM, epilogue in one parallel region) without QuantLinear's Python around it (module
# call, custom-op dispatch, reshapes). QuantLinear minus raw is the per-call Python overhead.
RAW = ["W4A8 raw", "W8A8 raw"]


def _cpu_backend_ready() -> bool:
    from mixq.backends import get_backend

    return get_backend("cpu").available(torch.device("cpu"))


def make_runner(impl: str, m: int, k: int, n: int, seed: int = 0) -> Callable[[], torch.Tensor]:
    """A zero-argument callable computing one Linear forward of shape [m, k] -> [m, n] with ``impl``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    linear = torch.nn.Linear(k, n)
    if impl == "fp32":
        return lambda: linear(x)
    if impl == "fbgemm":
        torch.backends.quantized.engine = "fbgemm"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao deprecation notices
            qlinear = torch.ao.quantization.quantize_dynamic(
                torch.nn.Sequential(linear), {torch.nn.Linear}, dtype=torch.qint8
            )
        return lambda: qlinear(x)
    w_bits, a_bits = int(impl[1]), int(impl[3])
    from mixq.nn import QuantLinear

    qlin = QuantLinear.from_float(linear, w_bits, a_bits, act_quant="dynamic", backend="cpu", clip_search=False)
    assert qlin.backend == "cpu"
    if impl.endswith("raw"):
        from mixq import _C

        w = qlin.packed
        args = (w.codes, w.scale, w.bias, w_bits, a_bits, k, n, torch.float32, None, True)
        return lambda: _C.linear_dynamic(x, None, *args)
    return lambda: qlin(x)


def gops(m: int, k: int, n: int, seconds: float) -> float:
    return 2.0 * m * k * n / seconds / 1e9


# ----------------------------------------------------------------------------- pytest-benchmark


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("m,k,n", SHAPES, ids=[f"M{m}-K{k}-N{n}" for m, k, n in SHAPES])
def test_linear_cpu(benchmark, impl, m, k, n):
    if impl.startswith("W") and not _cpu_backend_ready():
        pytest.skip("mixq._C is not built")
    run = make_runner(impl, m, k, n)
    benchmark.extra_info.update({"impl": impl, "m": m, "k": k, "n": n, "threads": torch.get_num_threads()})
    with torch.no_grad():
        rounds = 2 if m >= 4096 else 5
        benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)
    benchmark.extra_info["gops"] = gops(m, k, n, benchmark.stats.stats.min)


# ----------------------------------------------------------------------------- table


def median_times(
    runs: dict[str, Callable[[], torch.Tensor]], rounds: int, best: dict[str, float] | None = None
) -> dict[str, float]:
    """Median wall time of each callable over ``rounds`` interleaved rounds, after two warm-up calls.

    The callables take turns within every round, so a change of load on the shared CPU hits all
    of them alike and the ratios stay fair. Each round times a batch of calls long enough
    (>= ~20 ms) that the clock's and Python's overheads do not matter. ``best``, if given, gets
    the fastest single call of each (the least disturbed one when other jobs share the cores).
    """
    with torch.no_grad():
        reps = {}
        for name, run in runs.items():
            run()
            t0 = time.perf_counter()
            run()
            reps[name] = max(1, int(0.02 / max(time.perf_counter() - t0, 1e-6)))
        samples: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(rounds):
            for name, run in runs.items():
                t0 = time.perf_counter()
                fastest = float("inf")
                for _ in range(reps[name]):
                    t1 = time.perf_counter()
                    run()
                    fastest = min(fastest, time.perf_counter() - t1)
                samples[name].append((time.perf_counter() - t0) / reps[name])
                if best is not None:
                    best[name] = min(best.get(name, float("inf")), fastest)
    return {name: statistics.median(v) for name, v in samples.items()}


def loadavg() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def table(quick: bool = False, rounds: int = 7, raw: bool = True) -> str:
    """Markdown table: ms per Linear, speed-up vs fbgemm (and fp32), GOP/s, share of the measured peak."""
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from cpu_peak import measure_peaks

    from mixq import _C

    threads = torch.get_num_threads()
    load_before = loadavg()
    iters = 5_000_000 if quick else 20_000_000
    peaks = measure_peaks(iters=iters)
    shapes = TABLE_SHAPES[:3] if quick else TABLE_SHAPES
    rows = []
    for name, m, k, n in shapes:
        impls = IMPLS + (RAW if raw else [])
        fastest: dict[str, float] = {}
        t = median_times({impl: make_runner(impl, m, k, n) for impl in impls}, rounds, fastest)
        rows.append((name, m, k, n, t, fastest))
        print(f"{name} M={m} K={k} N={n}: " + ", ".join(f"{i} {v * 1e3:.3f} ms" for i, v in t.items()), flush=True)
    # The peak is measured before and after the run; the higher reading is the less disturbed one.
    peaks = {key: max(v, w) for (key, v), w in zip(peaks.items(), measure_peaks(iters=iters).values())}
    quant = QUANT + (RAW if raw else [])
    fb_isa = os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "best available")
    lines = [
        f"CPU: {cpu_model()}, {threads} thread(s), torch {torch.__version__}, fbgemm ISA: {fb_isa}, mixq kernel path "
        f"`{_C.kernel_path()}`. Load average (1/5/15 min) before: {load_before}, after: {loadavg()}. "
        f"Medians of {rounds} interleaved rounds.",
        "",
        "Measured int8 peak (bench/cpu_peak.py, GOP/s, 2 ops per MAC, " + f"{threads} thread(s)): "
        + ", ".join(f"{seq} {v:.0f}" for (seq, t), v in peaks.items() if t == threads),
        "",
        "| shape (M, K, N) | fp32 ms | fbgemm ms | fbgemm vs fp32 | " + " | ".join(quant) + " | "
        + " | ".join(f"{q} GOP/s" for q in QUANT) + " |",
        "|---|---:|---:|---:|" + "---:|" * (len(quant) + len(QUANT)),
    ]
    header = lines[-2:]

    def body(fastest: bool) -> list[str]:
        """Table rows from each shape's medians or its fastest single calls."""
        out = []
        for name, m, k, n, median, best in rows:
            t = best if fastest else median
            ratios = " | ".join(f"{t['fbgemm'] / t[q]:.2f}x" for q in quant)
            rates = " | ".join(f"{gops(m, k, n, t[q]):.0f}" for q in QUANT)
            out.append(f"| {name} ({m}, {k}, {n}) | {t['fp32'] * 1e3:.3f} | {t['fbgemm'] * 1e3:.3f} | "
                       f"{t['fp32'] / t['fbgemm']:.2f}x | {ratios} | {rates} |")
        return out

    lines += body(fastest=False)
    lines.append("")
    lines.append("Ratios: fbgemm time / mixq time (above 1: mixq faster). GOP/s = 2*M*K*N / mixq time.")
    lines += ["", "Fastest single call of each (the least disturbed when other jobs share the cores):", ""]
    lines += header + body(fastest=True)
    if raw:
        lines += ["", "QuantLinear's per-call Python overhead: QuantLinear minus the raw C++ call it makes, same "
                  "run, us (median / fastest call), and what it costs against fbgemm:", "",
                  "| shape (M, K, N) | " + " | ".join(f"{q} overhead us" for q in ("W4A8", "W8A8")) + " | "
                  + " | ".join(f"fbgemm / {q}" for q in ("W4A8", "W4A8 raw", "W8A8", "W8A8 raw")) + " |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, m, k, n, median, best in rows:
            over = " | ".join(f"{(median[q] - median[q + ' raw']) * 1e6:.0f} / {(best[q] - best[q + ' raw']) * 1e6:.0f}"
                              for q in ("W4A8", "W8A8"))
            vs = " | ".join(f"{median['fbgemm'] / median[q]:.2f}x" for q in ("W4A8", "W4A8 raw", "W8A8", "W8A8 raw"))
            lines.append(f"| {name} ({m}, {k}, {n}) | {over} | {vs} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="mixq CPU Linear benchmark")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of all shapes")
    parser.add_argument("--quick", action="store_true", help="three shapes and a short peak measurement")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (median reported)")
    parser.add_argument("--isa", choices=["auto", "avx2"], default="auto",
                        help="avx2: mixq's AVX2 kernels against fbgemm's AVX2 kernels (a machine without VNNI)")
    parser.add_argument("--no-raw", "--no-fused", dest="no_raw", action="store_true",
                        help="leave out the raw C++ call columns (QuantLinear without its Python)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.table:
        parser.error("use --table (or run under pytest for pytest-benchmark)")
    if not _cpu_backend_ready():
        raise SystemExit("mixq._C is not built: run `python setup.py build_ext --inplace` first")
    if args.isa == "avx2":
        from mixq import _C

        # fbgemm reads this once, at its first GEMM (none has run yet); mixq caps its dispatch.
        os.environ["FBGEMM_ENABLE_INSTRUCTIONS"] = "AVX2"
        _C.set_kernel_path("avx2")
    print(table(quick=args.quick, rounds=args.rounds, raw=not args.no_raw))


if __name__ == "__main__":
    main()
