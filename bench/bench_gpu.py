"""GPU speed of the triton backend against cuBLAS bf16 and torch._int_mm + scale (needs CUDA).

Three ways to run it, all on a CUDA GPU (everything skips or exits without one):

* ``pytest bench/bench_gpu.py --benchmark-only``: pytest-benchmark timings per shape and kernel.
* ``python bench/bench_gpu.py --table [--out bench/results/gpu.md]``: the Markdown tables of the
  report (median of ``triton.testing.do_bench``, warm-up included): ms, TOPS, % of the measured
  peak, GB/s, ratios vs bf16 and vs _int_mm; LayerNorm+quantize vs the GEMM it feeds; the
  ViT-B batch-1 Linear stack replayed in a CUDA graph.
* ``python bench/bench_gpu.py --counts``: operations and bytes per shape (arithmetic; any machine).
* ``python bench/bench_gpu.py --tune``: times GEMM configs per shape and rewrites the GPU's table
  in ``mixq/kernels/configs/`` (e.g. h100.json), so users never pay an autotune.

Shapes: SAM ViT-B encoder Linears (M = 64*64 and 70*70 tokens per image, batch 1 and 8) and
ViT-B/16 (M = 197 and 197*64); K x N = 768x2304 (qkv), 768x3072 (fc1), 3072x768 (fc2),
768x768 (proj). Operations per GEMM: 2*M*N*K. Bytes: int8 activations + packed weights +
scales + bf16 output for mixq; bf16 in and out for cuBLAS; for _int_mm its int32 output plus the
separate scale pass that reads it back and writes bf16.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
W_BITS = (8, 6, 4)
KN = ((768, 2304), (768, 3072), (3072, 768), (768, 768))  # (K, N): qkv, fc1, fc2, proj
M_BY_MODEL = {
    "SAM-B 64x64 b1": 4096,
    "SAM-B 70x70 b1": 4900,
    "SAM-B 64x64 b8": 8 * 4096,
    "SAM-B 70x70 b8": 8 * 4900,
    "ViT-B/16 b1": 197,
    "ViT-B/16 b64": 197 * 64,
}


@dataclasses.dataclass(frozen=True)
class Shape:
    model: str
    m: int
    k: int
    n: int

    @property
    def label(self) -> str:
        return f"{self.model} {self.m}x{self.k}x{self.n}"

    @property
    def ops(self) -> int:
        return 2 * self.m * self.n * self.k


SHAPES = [Shape(model, m, k, n) for model, m in M_BY_MODEL.items() for k, n in KN]


def mixq_bytes(s: Shape, w_bits: int) -> int:
    from mixq.kernels.layout import k_tiles, tile_bytes

    return s.m * s.k + s.n * k_tiles(s.k) * tile_bytes(w_bits) + 4 * s.m + 8 * s.n + 2 * s.m * s.n


def bf16_bytes(s: Shape) -> int:
    return 2 * (s.m * s.k + s.n * s.k + s.m * s.n + s.n)


def int_mm_bytes(s: Shape) -> int:
    return s.m * s.k + s.n * s.k + 4 * s.m * s.n + (4 + 2) * s.m * s.n + 4 * s.m + 8 * s.n


# ----------------------------------------------------------------------------- cases


class GemmCase:
    """Random inputs of one shape on the GPU and a callable per implementation."""

    def __init__(self, s: Shape, w_bits: int = 8, seed: int = 0, device: str = "cuda"):
        from mixq import formats, kernels

        dev = device
        g = torch.Generator(device=dev).manual_seed(seed)
        self.shape, self.w_bits = s, w_bits
        lim = formats.qmax(w_bits)
        self.xq = torch.randint(-127, 128, (s.m, s.k), generator=g, device=dev, dtype=torch.int8)
        wq = torch.randint(-lim, lim + 1, (s.n, s.k), generator=g, device=dev, dtype=torch.int8)
        self.w_gpu = kernels.prepack_gpu(formats.pack_weight(wq, w_bits), w_bits, s.k)
        self.w_int8_t = wq.t()  # [K, N] column-major: the layout cuBLASLt's int8 GEMM wants
        self.a_scale = torch.rand(s.m, generator=g, device=dev) * 1e-2
        self.w_scale = torch.rand(s.n, generator=g, device=dev) * 1e-2
        self.bias = torch.randn(s.n, generator=g, device=dev)
        self.x_bf16 = torch.randn(s.m, s.k, generator=g, device=dev).to(torch.bfloat16)
        self.w_bf16 = torch.randn(s.n, s.k, generator=g, device=dev).to(torch.bfloat16)
        self.b_bf16 = self.bias.to(torch.bfloat16)

    def mixq(self) -> torch.Tensor:
        from mixq import kernels

        s = self.shape
        return kernels.mixed_gemm(self.xq, self.w_gpu, self.w_bits, s.k, s.n, self.a_scale, self.w_scale,
                                  self.bias, torch.bfloat16)

    def bf16(self) -> torch.Tensor:
        return torch.nn.functional.linear(self.x_bf16, self.w_bf16, self.b_bf16)

    def int_mm(self) -> torch.Tensor:
        acc = torch._int_mm(self.xq, self.w_int8_t)
        return (acc.float() * self.a_scale[:, None] * self.w_scale[None, :] + self.bias).to(torch.bfloat16)


def layernorm_inputs(m: int, k: int = 768, device: str = "cuda") -> tuple[torch.Tensor, ...]:
    """(x bf16 [m, k], gamma, beta, inv_scale [k]) for the fused LayerNorm+quantize kernel."""
    g = torch.Generator(device=device).manual_seed(0)
    return (torch.randn(m, k, generator=g, device=device).to(torch.bfloat16),
            torch.randn(k, generator=g, device=device), torch.randn(k, generator=g, device=device),
            torch.rand(k, generator=g, device=device) * 20)


def time_ms(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def measured_peaks() -> dict[str, float]:
    """Peak TOPS this GPU reaches on a large square GEMM: int8 (_int_mm) and bf16 (cuBLAS)."""
    n = 8192
    a8 = torch.randint(-127, 128, (n, n), device="cuda", dtype=torch.int8)
    b8 = torch.randint(-127, 128, (n, n), device="cuda", dtype=torch.int8).t()
    a16, b16 = a8.to(torch.bfloat16), b8.to(torch.bfloat16)
    ops = 2 * n**3
    return {
        "int8": ops / time_ms(lambda: torch._int_mm(a8, b8)) / 1e9,
        "bf16": ops / time_ms(lambda: a16 @ b16) / 1e9,
    }


# ----------------------------------------------------------------------------- pytest-benchmark

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="GPU benchmark: needs CUDA")


def _synced(fn: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        fn()
        torch.cuda.synchronize()

    return run


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("s", SHAPES, ids=lambda s: s.label.replace(" ", "_"))
@pytest.mark.parametrize("impl", ["mixq_w8a8", "mixq_w6a8", "mixq_w4a8", "cublas_bf16", "int_mm_scale"])
def test_gemm_speed(benchmark, s, impl):
    case = GemmCase(s, int(impl[6]) if impl.startswith("mixq") else 8)
    fn = {"cublas_bf16": case.bf16, "int_mm_scale": case.int_mm}.get(impl, case.mixq)
    benchmark.extra_info.update(ops=s.ops, shape=s.label)
    benchmark.pedantic(_synced(fn), warmup_rounds=10, rounds=50, iterations=1)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("m", [4096, 8 * 4900, 197])
def test_layernorm_quantize_speed(benchmark, m):
    from mixq import kernels

    x, gamma, beta, inv = layernorm_inputs(m)
    benchmark.pedantic(_synced(lambda: kernels.layernorm_quantize(x, gamma, beta, 1e-6, inv, 8)),
                       warmup_rounds=10, rounds=50, iterations=1)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["w4a8", "bf16"])
def test_vit_b_batch1_linear_stack_cuda_graph(benchmark, kind):
    replay = vit_b_stack_graph(kind)
    benchmark.pedantic(_synced(replay), warmup_rounds=10, rounds=50, iterations=1)


# ----------------------------------------------------------------------------- ViT-B stack


def vit_b_stack_graph(kind: str, m: int = 197, depth: int = 12) -> Callable[[], None]:
    """The 48 Linears of ViT-B/16 at batch 1 (qkv, proj, fc1, fc2 per block) captured in one CUDA graph.

    ``kind='w4a8'`` runs QuantLinear (dynamic per-token A8 quantize + W4 GEMM, triton backend);
    ``kind='bf16'`` runs nn.Linear in bf16 (cuBLAS). Returns the graph's replay.
    """
    from mixq.nn import QuantLinear

    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        for k, n in ((768, 2304), (768, 768), (768, 3072), (3072, 768)):
            lin = torch.nn.Linear(k, n, device="cuda")
            layers.append(QuantLinear.from_float(lin, 4, 8) if kind == "w4a8" else lin.to(torch.bfloat16))
    if kind == "w4a8" and any(layer.backend != "triton" for layer in layers):
        raise RuntimeError("QuantLinear did not pick the triton backend on CUDA")
    inputs = {k: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for k in (768, 3072)}

    def stack() -> None:
        for layer in layers:
            layer(inputs[layer.in_features])

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):  # compile kernels and settle the allocator before capture
            stack()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        stack()
    return graph.replay


# ----------------------------------------------------------------------------- --table


def _fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}" if math.isfinite(x) else "n/a"


def table_markdown() -> str:
    from mixq import kernels

    device = torch.cuda.get_device_name()
    peaks = measured_peaks()
    out = [
        f"GPU: {device}; torch {torch.__version__}; triton {__import__('triton').__version__}. "
        f"Measured peak (8192^3 GEMM): int8 {peaks['int8']:.0f} TOPS (_int_mm), bf16 {peaks['bf16']:.0f} TFLOPS (cuBLAS). "
        "Times: median of triton.testing.do_bench.",
        "",
        "| shape (M x K x N) | kernel | ms | TOPS | % peak | GB/s | x bf16 | x _int_mm |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    gemm_ms: dict[tuple[int, int, int], float] = {}
    for s in SHAPES:
        base = GemmCase(s, 8)
        t_bf16, t_int = time_ms(base.bf16), time_ms(base.int_mm)
        rows = [("cuBLAS bf16", t_bf16, bf16_bytes(s), peaks["bf16"]),
                ("_int_mm + scale", t_int, int_mm_bytes(s), peaks["int8"])]
        for w_bits in W_BITS:
            case = base if w_bits == 8 else GemmCase(s, w_bits)
            t = time_ms(case.mixq)
            if w_bits == 8:
                gemm_ms[(s.m, s.k, s.n)] = t
            rows.append((f"mixq W{w_bits}A8", t, mixq_bytes(s, w_bits), peaks["int8"]))
        for name, t, nbytes, peak in rows:
            tops = s.ops / t / 1e9
            out.append(f"| {s.label} | {name} | {t:.4f} | {_fmt(tops)} | {100 * tops / peak:.1f} | "
                       f"{nbytes / t / 1e6:.0f} | {t_bf16 / t:.2f} | {t_int / t:.2f} |")
    out += ["", "LayerNorm + A8 quantize (one pass) against the W8A8 GEMM it feeds (K = 768):", "",
            "| M | LN+quant ms | GB/s | feeds | GEMM ms | LN+quant / GEMM |", "|---:|---:|---:|---|---:|---:|"]
    for m in sorted({s.m for s in SHAPES}):
        x, gamma, beta, inv = layernorm_inputs(m)
        t_ln = time_ms(lambda: kernels.layernorm_quantize(x, gamma, beta, 1e-6, inv, 8))
        for n in (2304, 3072):
            t_g = gemm_ms[(m, 768, n)]
            out.append(f"| {m} | {t_ln:.4f} | {3 * m * 768 / t_ln / 1e6:.0f} | 768x{n} | {t_g:.4f} | "
                       f"{100 * t_ln / t_g:.1f}% |")
    t_q = time_ms(vit_b_stack_graph("w4a8"))
    t_b = time_ms(vit_b_stack_graph("bf16"))
    out += ["", "ViT-B/16 batch 1: the 48 Linears (M = 197) replayed in one CUDA graph:", "",
            "| stack | ms | x bf16 |", "|---|---:|---:|",
            f"| bf16 nn.Linear (cuBLAS) | {t_b:.4f} | 1.00 |",
            f"| mixq W4A8 QuantLinear (dynamic A8 quantize + GEMM) | {t_q:.4f} | {t_b / t_q:.2f} |"]
    return "\n".join(out) + "\n"


def counts_markdown() -> str:
    """Operations and bytes moved per GEMM shape (arithmetic, no GPU needed)."""
    out = ["| shape (M x K x N) | GOP | MB bf16 | MB _int_mm+scale | MB W8A8 | MB W6A8 | MB W4A8 | OP/B bf16 | OP/B W4A8 |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in SHAPES:
        mb = [bf16_bytes(s), int_mm_bytes(s)] + [mixq_bytes(s, b) for b in W_BITS]
        out.append(f"| {s.label} | {s.ops / 1e9:.2f} | " + " | ".join(f"{b / 1e6:.2f}" for b in mb)
                   + f" | {s.ops / bf16_bytes(s):.0f} | {s.ops / mixq_bytes(s, 4):.0f} |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- --tune


def candidate_configs(s: Shape, sm_count: int) -> list:
    from mixq.kernels import GemmConfig
    from mixq.kernels.layout import k_tiles

    found = []
    for bm, bn, warps, stages in itertools.product((64, 128), (64, 128, 256), (4, 8), (3, 4)):
        if bm * bn >= 128 * 256 and warps == 4:
            continue  # accumulator would not fit in registers
        tiles = math.ceil(s.m / bm) * math.ceil(s.n / bn)
        splits = [1] + [sk for sk in (2, 4, 8) if tiles < sm_count and sk <= k_tiles(s.k)]
        for sk in splits:
            found.append(GemmConfig(bm, bn, group_m=8, split_k=sk, num_warps=warps, num_stages=stages))
    return found


def tune(path: Path | None) -> Path:
    from mixq.kernels import tuning

    device = torch.cuda.get_device_name()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    path = path or tuning.table_path_for(device) or tuning.CONFIG_DIR / (
        "".join(c if c.isalnum() else "_" for c in device.lower()) + ".json")
    # Several shapes share a table key (M bucket): per key, keep the config with the lowest mean
    # slowdown relative to each shape's own fastest config, among configs that ran on all of them.
    slowdowns: dict = {}
    for s in SHAPES:
        for w_bits in W_BITS:
            case = GemmCase(s, w_bits)
            want = case.mixq()
            timed = {}
            for cfg in candidate_configs(s, sms):
                run = _with_config(case, cfg)
                try:
                    got = run()
                except Exception as e:  # e.g. out of shared memory for this tile/stage combination
                    print(f"  skip {cfg}: {type(e).__name__}", file=sys.stderr)
                    continue
                if not torch.equal(got, want):
                    raise RuntimeError(f"{cfg} gives a different result on {s.label} W{w_bits}")
                timed[cfg] = time_ms(run)
            fastest = min(timed.values())
            key = (w_bits, tuning.m_bucket(s.m), s.n, s.k)
            per_key = slowdowns.setdefault(key, [])
            per_key.append({cfg: t / fastest for cfg, t in timed.items()})
            cfg = min(timed, key=timed.get)
            print(f"{s.label} W{w_bits}A8: {fastest:.4f} ms with {cfg}", file=sys.stderr)
    best = {}
    for key, runs in slowdowns.items():
        common = set.intersection(*(set(r) for r in runs))
        best[key] = min(common, key=lambda c: sum(r[c] for r in runs))
    source = (f"tuned by `python bench/bench_gpu.py --tune` on {device} (torch {torch.__version__}, "
              f"triton {__import__('triton').__version__}): per key, the candidate config with the lowest mean "
              "slowdown against each shape's fastest (triton.testing.do_bench medians)")
    tuning.write_table(path, device, source, best)
    return path


def _with_config(case: GemmCase, cfg) -> Callable[[], torch.Tensor]:
    from mixq import kernels

    s = case.shape
    return lambda: kernels.mixed_gemm(case.xq, case.w_gpu, case.w_bits, s.k, s.n, case.a_scale, case.w_scale,
                                      case.bias, torch.bfloat16, config=cfg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--table", action="store_true", help="print the Markdown tables of the report")
    mode.add_argument("--tune", action="store_true", help="time GEMM configs, rewrite mixq/kernels/configs/<gpu>.json")
    mode.add_argument("--counts", action="store_true", help="print operations and bytes per shape (no GPU needed)")
    parser.add_argument("--out", type=Path, help="--table: also write the tables here; --tune: table file to write")
    args = parser.parse_args(argv)
    if args.counts:
        print(counts_markdown())
        return 0
    if not HAS_CUDA:
        print("bench_gpu.py needs a CUDA GPU; none is visible here", file=sys.stderr)
        return 2
    if args.tune:
        print(f"wrote {tune(args.out)}")
        return 0
    text = table_markdown()
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
