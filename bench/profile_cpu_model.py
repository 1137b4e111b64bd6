"""Where a whole-model CPU forward spends its time, beyond the GEMM: torch.profiler by op family.

For DINOv2-S (mixq's ``dinov2-s``: the ViT-S/14 backbone and its saliency decoder) and ViT-B/16
(timm, random weights), at batch 1 and 8: float32, bfloat16, and mixq W8A8, W4A8, the stand-in
mixed plan of bench_cpu_model.py, W8A8 with quantized attention matmuls, and W8A8 with its float
parts in bf16 (``mixq.nn.cast_float_parts``). Each op's self CPU time
is put in one family (Linear, convolution, attention, GELU, LayerNorm, quantize passes, copies and
reshapes, elementwise, other), in ms per forward and as a share of the forward.

    python bench/profile_cpu_model.py [--threads 2] [--iters 3] [--batches 1,8] [--models dinov2-s,vit-b]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import mixq
from mixq import latency, timing
from mixq.nn import cast_float_parts

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cpu_model import MODELS, STANDIN, batch_of, float_model, standin_bits  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# family -> substrings of op names (first match wins, in this order)
FAMILIES = (
    ("Linear (GEMM)", ("mixq::linear_dynamic", "mixq::packed_linear", "mixq::int_gemm", "quantized::linear",
                       "aten::addmm", "aten::mm", "aten::linear", "aten::matmul")),
    ("convolution", ("conv", "mkldnn_convolution")),
    ("attention", ("scaled_dot_product", "flash_attention", "mixq::quantized_qk", "mixq::quantized_pv",
                   "mixq::attention", "mixq::quantize_probs", "softmax", "aten::bmm", "baddbmm")),
    ("quantize passes", ("mixq::quantize", "quantize_per", "aten::round", "aten::clamp", "amax", "aten::abs",
                         "aten::div", "aten::reciprocal")),
    ("GELU", ("gelu",)),
    ("LayerNorm", ("layer_norm",)),
    ("copies, reshapes", ("aten::copy_", "contiguous", "aten::clone", "permute", "transpose", "reshape", "view",
                          "aten::t", "expand", "as_strided", "aten::to", "_to_copy", "unbind", "select", "slice",
                          "aten::cat", "aten::empty", "aten::zeros", "aten::ones")),
    ("elementwise", ("aten::add", "aten::mul", "aten::sub", "aten::sigmoid", "relu", "clamp_min", "batch_norm",
                     "upsample", "aten::where", "masked_fill")),
)
ORDER = [f for f, _ in FAMILIES] + ["other"]


def family(op: str) -> str:
    for name, keys in FAMILIES:
        if any(k in op for k in keys):
            return name
    return "other"


def variants(name: str) -> dict[str, torch.nn.Module]:
    fp, calib, filter_fn = float_model(name)
    targets = [n for n, m in fp.named_modules() if isinstance(m, torch.nn.Linear) and filter_fn(n, m)]
    base = latency.baselines(fp, targets, "cpu")
    out = {"float32": base["float32"], "bfloat16": base["bfloat16"],
           "torch int8 (onednn)": base[latency.int8_name("onednn")]}
    linear = mixq.LinearConfig(fold_layernorm=True, weight_method="rtn")
    cfgs = {"mixq W8A8": mixq.QuantConfig(replace(linear, w_bits=8, a_bits=8), backend="cpu"),
            "mixq W4A8": mixq.QuantConfig(replace(linear, w_bits=4, a_bits=8), backend="cpu"),
            STANDIN: mixq.QuantConfig(replace(linear, layer_bits=standin_bits(fp, filter_fn), layer_bits_only=True),
                                      backend="cpu"),
            "mixq W8A8 + attention W8": mixq.QuantConfig(replace(linear, w_bits=8, a_bits=8),
                                                         attention=mixq.AttentionConfig(), backend="cpu")}
    for label, cfg in cfgs.items():
        out[label] = mixq.quantize_(copy.deepcopy(fp), cfg, calib, filter_fn=filter_fn, progress=False).eval()
    out["mixq W8A8, bf16 float parts"] = latency.CastInputs(cast_float_parts(copy.deepcopy(out["mixq W8A8"])),
                                                            torch.bfloat16, cast_model=False)
    return out, calib


@torch.inference_mode()
def profile_one(model: torch.nn.Module, x: torch.Tensor, iters: int) -> tuple[dict[str, float], list[tuple]]:
    """(ms per forward by family, the top ops (name, ms per forward, calls per forward))."""
    model(x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            model(x)
    fam: dict[str, float] = defaultdict(float)
    ops = []
    for e in prof.key_averages():
        ms = e.self_cpu_time_total / 1e3 / iters
        fam[family(e.key)] += ms
        ops.append((e.key, ms, e.count / iters))
    ops.sort(key=lambda t: -t[1])
    return dict(fam), ops[:8]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "profile_cpu_model.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = ["# Whole-model CPU profile: where the time goes beyond the GEMM (bench/profile_cpu_model.py)", "",
             f"Command: `python bench/profile_cpu_model.py {' '.join(sys.argv[1:])}`".rstrip(),
             f"Machine at the start: {timing.machine()}; mixq CPU kernel family `{latency.kernel_path()}`", "",
             "Self CPU time per op from torch.profiler, summed by family, in ms per forward (share of the "
             f"profiled forward in brackets), {args.iters} profiled forwards after one warm-up. Profiler overhead "
             "and a shared machine inflate the totals; the shares are the figure.", ""]
    tops = []
    for name in args.models.split(","):
        models, calib = variants(name)
        for b in [int(v) for v in args.batches.split(",")]:
            x = batch_of(calib, b)
            lines += [f"## {name}, batch {b}", "",
                      "| model | total ms | " + " | ".join(ORDER) + " |", "|---|---:|" + "---:|" * len(ORDER)]
            for label, model in models.items():
                fam, top = profile_one(model, x, args.iters)
                total = sum(fam.values())
                cells = " | ".join(f"{fam.get(f, 0.0):.1f} ({100 * fam.get(f, 0.0) / total:.0f}%)" for f in ORDER)
                lines.append(f"| {label} | {total:.1f} | {cells} |")
                tops.append((name, b, label, top))
                print(lines[-1], flush=True)
            lines.append("")
    lines += ["## Top ops (self ms per forward, calls per forward)", ""]
    for name, b, label, top in tops:
        lines.append(f"- {name} b{b} {label}: " + "; ".join(f"`{k}` {ms:.1f} ({c:g})" for k, ms, c in top))
    lines += ["", f"Machine at the end: {timing.machine()} (shared machine: other jobs ran alongside)."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
