"""CPU cost of attention: its share of a float ViT forward, and quantized attention against float SDPA.

(1) Where a float forward at batch 1 spends its time (DINOv2-S at 224 px: 257 tokens, 6 heads;
    ViT-B/16: 197 tokens, 12 heads; random weights): torch.profiler's CPU time of the top-level ops
    of the forward, in the Linears (``aten::linear``) and in the attention core (fused SDPA, or the
    eager QK^T, softmax and PV matmuls), as a share of the whole forward.
(2) One attention core per shape (ViT-S, ViT-B, SAM-B window and global attention at batch 1):
    float ``F.scaled_dot_product_attention``, the eager float QK^T-softmax-PV, and the quantized
    path as QuantAttention runs it (quantize Q/K per token with ``mixq::quantize_act_dynamic`` and V
    per channel with formats, ``mixq::quantized_qk``, scale, softmax, ``mixq::quantize_probs``,
    ``mixq::quantized_pv``) on the reference backend and on the cpu kernels, plus the two cpu ops alone
    on ready codes. Medians of interleaved rounds (bench_cpu.median_times), ratios to SDPA timed in
    the same run.
(3) Each step of the quantized core alone (ViT-B; SAM-B window too unless --quick): the quantize steps
    as formats' torch ops and as the cpu ops, the two matmul ops and the softmax.

    python bench/bench_attention.py [--quick] [--out FILE] [--threads T] [--bits 8] [--kind log2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cpu import cpu_model, loadavg, median_times  # noqa: E402

from mixq import formats, ops  # noqa: E402

# (name, batch, heads, tokens, head dim): SAM-B at 1024 px has 64x64 tokens; its windowed blocks
# pad them to 70x70 = 25 windows of 14x14 = 196 tokens, its global blocks attend over all 4096.
SHAPES = [
    ("ViT-S (DINOv2-S 224 px)", 1, 6, 257, 64),
    ("ViT-B/16 224 px", 1, 12, 197, 64),
    ("SAM-B window", 25, 12, 196, 64),
    ("SAM-B global", 1, 12, 4096, 64),
]
# the reference path of the global shape holds int64 copies of the [12, 4096, 4096] probabilities (GBs)
HEAVY_REFERENCE = 12 * 4096 * 4096


# ----------------------------------------------------------------------------- (1) forward shares


def _models(quick: bool) -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    import timm

    from mixq.models.dinov2 import Dinov2Backbone

    torch.manual_seed(0)
    out = {"DINOv2-S, 224 px (257 tokens)": (Dinov2Backbone().eval(), torch.randn(1, 3, 224, 224))}
    if not quick:
        vit_b = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
        out["ViT-B/16, 224 px (197 tokens)"] = (vit_b, torch.randn(1, 3, 224, 224))
    return out


def _set_fused_attention(model: torch.nn.Module, fused: bool) -> None:
    """timm's Attention runs F.scaled_dot_product_attention when ``fused_attn``, else q@k^T, softmax, @v."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused


def forward_shares(model: torch.nn.Module, x: torch.Tensor, fused: bool, iters: int) -> dict[str, float]:
    """CPU time (ms per forward) of the forward's top-level ops by kind, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile, record_function

    _set_fused_attention(model, fused)
    with torch.inference_mode():
        model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(iters):
                with record_function("bench_forward"):
                    model(x)
    totals = {"forward": 0.0, "linear": 0.0, "attention": 0.0}
    attention_ops = {"aten::scaled_dot_product_attention", "aten::matmul", "aten::softmax"}
    for ev in prof.events():
        if ev.name == "bench_forward":
            totals["forward"] += ev.cpu_time_total
        elif ev.cpu_parent is not None and ev.cpu_parent.name == "bench_forward":
            if ev.name == "aten::linear":
                totals["linear"] += ev.cpu_time_total
            elif ev.name in attention_ops:
                totals["attention"] += ev.cpu_time_total
    return {k: v / iters / 1e3 for k, v in totals.items()}


def shares_table(quick: bool) -> list[str]:
    iters = 2 if quick else 5
    lines = [
        "| model | attention core | forward ms | Linears ms | Linears share | attention ms | attention share |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, (model, x) in _models(quick).items():
        for fused, label in ((True, "SDPA"), (False, "eager QK^T, softmax, PV")):
            t = forward_shares(model, x, fused, iters)
            lines.append(f"| {name} | {label} | {t['forward']:.2f} | {t['linear']:.2f} | "
                         f"{t['linear'] / t['forward']:.0%} | {t['attention']:.2f} | "
                         f"{t['attention'] / t['forward']:.0%} |")
            print(lines[-1], file=sys.stderr, flush=True)
    return lines


# ----------------------------------------------------------------------------- (2) attention cores


def quantize_tokens(x: torch.Tensor, bits: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token rule over the last dim through ``mixq::quantize_act_dynamic`` (QuantAttention's
    ``_quantize_tokens``): the op takes 2-D rows."""
    codes, steps = ops.quantize_act_dynamic(x.reshape(-1, x.shape[-1]), bits, backend)
    return codes.view(x.shape), steps.view(x.shape[:-1])


def quantized_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bits: int, kind: str,
                        backend: str) -> torch.Tensor:
    """QuantAttention's core (mixq/attention.py, ``_scores`` and ``_mix``) on [B, H, N, D] float q, k, v."""
    qc, qs = quantize_tokens(q, bits, backend)
    kc, ks = quantize_tokens(k, bits, backend)
    attn = (ops.quantized_qk(qc, qs, kc, ks, torch.float32, backend) * q.shape[-1] ** -0.5).softmax(-1)
    vc, vs = formats.quantize_act_dynamic(v.transpose(-2, -1), bits)
    pc = ops.quantize_probs(attn, bits, kind, backend)
    return ops.quantized_pv(pc, vc.transpose(-2, -1), vs, bits, kind, torch.float32, backend)


def attention_runners(b: int, h: int, n: int, d: int, bits: int, kind: str, reference: bool
                      ) -> dict[str, Callable[[], torch.Tensor]]:
    gen = torch.Generator().manual_seed(n + h)
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for _ in range(3))
    scale = d**-0.5

    def probabilities() -> torch.Tensor:
        return ((q * scale) @ k.transpose(-2, -1)).softmax(-1)

    def eager() -> torch.Tensor:
        return probabilities() @ v

    # ready codes for the ops-only column
    qc, qs = formats.quantize_act_dynamic(q, bits)
    kc, ks = formats.quantize_act_dynamic(k, bits)
    vc, vs = formats.quantize_act_dynamic(v.transpose(-2, -1), bits)
    vc = vc.transpose(-2, -1)
    pc = formats.quantize_probs(probabilities(), bits, kind)

    def ops_only() -> torch.Tensor:
        ops.quantized_qk(qc, qs, kc, ks, torch.float32, "cpu")
        return ops.quantized_pv(pc, vc, vs, bits, kind, torch.float32, "cpu")

    runs = {
        "SDPA": lambda: F.scaled_dot_product_attention(q, k, v),
        "eager": eager,
        "quant cpu": lambda: quantized_attention(q, k, v, bits, kind, "cpu"),
        "cpu ops only": ops_only,
    }
    if reference:
        runs["quant reference"] = lambda: quantized_attention(q, k, v, bits, kind, "reference")
        with torch.no_grad():  # the kernels are bit-exact: a benchmark of wrong numbers is worthless
            assert torch.equal(runs["quant cpu"](), runs["quant reference"]())
    return runs


def cores_table(quick: bool, rounds: int, bits: int, kind: str, reference_global: bool) -> list[str]:
    """Rows of medians, then the same rows from each one's fastest single call (the least disturbed)."""
    shapes = SHAPES[:2] if quick else SHAPES
    cols = ["SDPA", "eager", "quant reference", "quant cpu", "cpu ops only"]
    header = [
        "| shape (batch x heads x tokens x head dim) | " + " | ".join(f"{c} ms" for c in cols) + " | "
        + " | ".join(f"{c} / SDPA" for c in cols[1:]) + " |",
        "|---|" + "---:|" * (2 * len(cols) - 1),
    ]

    def row(name: str, t: dict[str, float]) -> str:
        ms = " | ".join(f"{t[c] * 1e3:.2f}" if c in t else "n/a" for c in cols)
        ratio = " | ".join(f"{t[c] / t['SDPA']:.2f}x" if c in t else "n/a" for c in cols[1:])
        return f"| {name} | {ms} | {ratio} |"

    medians, fastest = [], []
    for name, b, h, n, d in shapes:
        reference = reference_global or b * h * n * n < HEAVY_REFERENCE
        t0 = time.perf_counter()
        best: dict[str, float] = {}
        t = median_times(attention_runners(b, h, n, d, bits, kind, reference), rounds, best)
        label = f"{name} ({b} x {h} x {n} x {d})"
        medians.append(row(label, t))
        fastest.append(row(label, best))
        print(medians[-1] + f"  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return header + medians + ["", "Fastest single call of each (the least disturbed on a shared machine):", ""] \
        + header + fastest


def step_runners(b: int, h: int, n: int, d: int, bits: int) -> dict[str, Callable[[], object]]:
    """Each step of the quantized core alone, as formats' torch ops (what QuantAttention ran before the
    cpu kernels took these steps) and as the cpu op, on a qkv-shaped (non-contiguous) q, k, v."""
    gen = torch.Generator().manual_seed(n + h)
    q, k, v = torch.randn(b, n, 3, h, d, generator=gen).permute(2, 0, 3, 1, 4).unbind(0)
    probs = (((q * d**-0.5) @ k.transpose(-2, -1)) * 3.0).softmax(-1)
    qc, qs = formats.quantize_act_dynamic(q, bits)
    kc, ks = formats.quantize_act_dynamic(k, bits)
    vc, vs = formats.quantize_act_dynamic(v.transpose(-2, -1), bits)
    pc = formats.quantize_probs(probs, bits, "log2")
    vt = v.transpose(-2, -1)
    for kind in ("log2", "uniform"):  # a benchmark of wrong numbers is worthless
        assert torch.equal(ops.quantize_probs(probs, bits, kind, "cpu"), formats.quantize_probs(probs, bits, kind))
    assert all(torch.equal(a, b_) for a, b_ in zip(quantize_tokens(q, bits, "cpu"), (qc, qs)))
    return {
        "Q per token, formats": lambda: formats.quantize_act_dynamic(q, bits),
        "Q per token, cpu op": lambda: quantize_tokens(q, bits, "cpu"),
        "V per channel, formats": lambda: formats.quantize_act_dynamic(vt, bits),
        "V per channel, cpu op on a V^T copy": lambda: quantize_tokens(vt, bits, "cpu"),
        "qk op": lambda: ops.quantized_qk(qc, qs, kc, ks, torch.float32, "cpu"),
        "softmax": lambda: probs.softmax(-1),
        "probabilities log2, formats": lambda: formats.quantize_probs(probs, bits, "log2"),
        "probabilities log2, cpu op": lambda: ops.quantize_probs(probs, bits, "log2", "cpu"),
        "probabilities uniform, formats": lambda: formats.quantize_probs(probs, bits, "uniform"),
        "probabilities uniform, cpu op": lambda: ops.quantize_probs(probs, bits, "uniform", "cpu"),
        "pv op (log2)": lambda: ops.quantized_pv(pc, vc.transpose(-2, -1), vs, bits, "log2", torch.float32, "cpu"),
    }


def steps_table(quick: bool, rounds: int, bits: int) -> list[str]:
    """Per-step times of the quantized core (ViT-B, and the SAM-B window shape unless quick): medians
    of interleaved rounds and the fastest single call of each."""
    shapes = [SHAPES[1]] if quick else [SHAPES[1], SHAPES[2]]
    lines = ["| shape | step | median ms | fastest ms |", "|---|---|---:|---:|"]
    for name, b, h, n, d in shapes:
        best: dict[str, float] = {}
        t = median_times(step_runners(b, h, n, d, bits), rounds, best)
        for step, sec in t.items():
            lines.append(f"| {name} ({b} x {h} x {n} x {d}) | {step} | {sec * 1e3:.3f} | {best[step] * 1e3:.3f} |")
        print("\n".join(lines[-len(t):]), file=sys.stderr, flush=True)
    return lines


def report(quick: bool, rounds: int, bits: int, kind: str, reference_global: bool) -> str:
    from mixq import _C

    load_before = loadavg()
    shares = shares_table(quick)
    cores = cores_table(quick, rounds, bits, kind, reference_global)
    return "\n".join([
        f"CPU: {cpu_model()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, mixq kernel path "
        f"`{_C.kernel_path()}`. Load average (1/5/15 min) before: {load_before}, after: {loadavg()}.",
        "",
        "Share of a float forward at batch 1 (torch.profiler CPU time of the forward's top-level ops, "
        "random weights):",
        "",
        *shares,
        "",
        f"Attention core per call, quantized at {bits} bits with {kind} probabilities (medians of {rounds} "
        "interleaved rounds; ratios: time / SDPA time, above 1 = slower than SDPA). \"quant\" = quantize "
        "Q, K, V + qk op + softmax + quantize_probs + pv op; \"cpu ops only\" = the two cpu ops on ready codes."
        + ("" if reference_global else " The reference path is left out of the SAM-B global shape (its int64 "
           "probability copies take GBs; --reference-global runs it)."),
        "",
        *cores,
        "",
        f"Steps of the quantized core at {bits} bits, alone (formats = the plain torch ops of mixq.formats; "
        "cpu op = the mixq::* op on the cpu backend; the inputs are views of one qkv tensor, as in a model):",
        "",
        *steps_table(quick, rounds, bits),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="DINOv2-S and the two ViT shapes only (< 1 min)")
    parser.add_argument("--out", help="write the Markdown here instead of stdout")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    parser.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default: 3 quick, 7 full)")
    parser.add_argument("--bits", type=int, default=8, choices=list(formats.SUPPORTED_BITS),
                        help="attention and softmax bits")
    parser.add_argument("--kind", default="log2", choices=list(formats.P_GRIDS), help="probability grid")
    parser.add_argument("--reference-global", action="store_true",
                        help="also time the reference path at SAM-B global attention (needs several GB)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from mixq.backends.cpu import extension_available

    if not extension_available():
        raise SystemExit("mixq._C is not built: run `python setup.py build_ext --inplace` first")
    text = report(args.quick, args.rounds or (3 if args.quick else 7), args.bits, args.kind, args.reference_global)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
