"""Whole-model CPU latency: DINOv2 ViT-S/14 (mixq's ``dinov2-s``) and ViT-B/16 at batch 1 and 8.

Every row in the same interleaved rounds (``mixq.latency.compare``, i.e. ``mixq.timing``): the
baselines float32, bfloat16 (``model.to(torch.bfloat16)``), and PyTorch's int8 dynamic Linear
(``quantize_dynamic`` on the same Linears) packed for fbgemm and for oneDNN; then mixq uniform
W8A8 and W4A8 and a mixed plan, each also with its float parts in bf16 (``mixq.nn.cast_float_parts``,
by default where the CPU has AVX512-BF16/AMX-BF16; its effect on the output is printed). Ratios are against float32 and against the fastest baseline of the
same run. mixq runs on its ``cpu`` backend with the demo's recipe: round-to-nearest weights (GPTQ
ones run at the same speed), smooth activations with 1/s folded into the LayerNorms, so every
quantized Linear is one fused C++ call.

The DINOv2 mixed plan is the newest ``runs/demo-*/plan-mixed-4.5b.json`` when one is at hand
(``--plans``), else a fixed stand-in: fc1/fc2 at W4A8, qkv/proj at W6A8 (the demo's ~4.5-bit plans
are mostly W4A8 with W6 layers). ViT-B (timm ``vit_base_patch16_224``, random weights: speed does not
depend on them) uses the same stand-in.

    python bench/bench_cpu_model.py [--threads 2] [--rounds 7] [--batches 1,8] [--models dinov2-s,vit-b]
    python bench/bench_cpu_model.py --quick      # DINOv2-S, batch 1, 3 rounds: a check that it runs
"""

from __future__ import annotations

import argparse
import copy
import glob
import os
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

import mixq
from mixq import latency, timing
from mixq.nn import bf16_preferred, cast_float_parts

ROOT = Path(__file__).resolve().parent.parent
UNIFORM = {"mixq W8A8": (8, 8), "mixq W4A8": (4, 8)}
STANDIN = "mixq mixed (fc W4A8, attn W6A8)"
BF16_PARTS = ", bf16 float parts"
MODELS = ("dinov2-s", "vit-b")


def default_plans() -> list[str]:
    """The newest demo run's ~4.5-bit plan (``mixq demo`` writes runs/demo-<time>/plan-*.json), if any."""
    runs = sorted(glob.glob(str(ROOT / "runs" / "demo-*")))
    return sorted(glob.glob(os.path.join(runs[-1], "plan-mixed-4.5b.json"))) if runs else []


def standin_bits(model: nn.Module, filter_fn) -> dict[str, tuple[int, int]]:
    """The stand-in mixed plan: the MLP Linears at W4A8, the attention Linears at W6A8."""
    return {n: ((4, 8) if ".mlp." in n else (6, 8)) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and filter_fn(n, m)}


def float_model(name: str, n_calib: int = 8) -> tuple[nn.Module, torch.Tensor, callable]:
    """(float model, calibration images, the filter of the Linears mixq quantizes)."""
    if name == "dinov2-s":
        from mixq.models import get_adapter

        adapter = get_adapter("dinov2-s")
        return adapter.build().eval(), adapter.calibration_batches(n_calib), adapter.quant_filter
    if name == "vit-b":
        import timm

        torch.manual_seed(0)
        fp = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
        return fp, torch.randn(n_calib, 3, 224, 224), lambda n, m: isinstance(m, nn.Linear) and n.startswith("blocks.")
    raise SystemExit(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")


def build_models(name: str, plans: list[str], act_quant: str = "auto", n_calib: int = 8,
                 bf16_parts: bool = False) -> tuple[dict[str, nn.Module], list[str], torch.Tensor]:
    """(every row's model, the mixq rows' names, calibration images) for one float model."""
    fp, calib, filter_fn = float_model(name, n_calib)
    targets = [n for n, m in fp.named_modules() if isinstance(m, nn.Linear) and filter_fn(n, m)]
    models = latency.baselines(fp, targets, "cpu")
    linear = mixq.LinearConfig(fold_layernorm=True, weight_method="rtn", act_quant=act_quant)
    quant: dict[str, nn.Module] = {}
    for label, (w, a) in UNIFORM.items():
        cfg = mixq.QuantConfig(replace(linear, w_bits=w, a_bits=a), backend="cpu")
        quant[label] = mixq.quantize_(copy.deepcopy(fp), cfg, calib, filter_fn=filter_fn, progress=False).eval()
    if name == "dinov2-s" and plans:
        for path in plans:
            plan = mixq.Plan.load(path)
            label = f"mixq {Path(path).stem.removeprefix('plan-')} (demo plan, {plan.avg_bits_per_weight:.2f} bits)"
            quant[label] = mixq.quantize_(copy.deepcopy(fp), plan.to_config(linear=linear, backend="cpu"), calib,
                                          progress=False).eval()
    else:
        cfg = mixq.QuantConfig(replace(linear, layer_bits=standin_bits(fp, filter_fn), layer_bits_only=True),
                               backend="cpu")
        quant[STANDIN] = mixq.quantize_(copy.deepcopy(fp), cfg, calib, filter_fn=filter_fn, progress=False).eval()
    for label, model in quant.items():
        layers = [m for m in model.modules() if isinstance(m, mixq.QuantLinear)]
        if not layers or not all(q.backend == "cpu" for q in layers):
            raise SystemExit(f"{label}: not every QuantLinear runs the cpu backend's fused call (is mixq._C built?)")
    if bf16_parts:
        for label in list(quant):
            quant[label + BF16_PARTS] = latency.CastInputs(cast_float_parts(copy.deepcopy(quant[label])),
                                                           torch.bfloat16, cast_model=False)
    return {**models, **quant}, list(quant), calib


@torch.inference_mode()
def bf16_parts_effect(models: dict[str, nn.Module], calib: torch.Tensor) -> list[str]:
    """How far bf16 float parts move each mixq model's output: relative L2 distance to the float32
    model's output, with fp32 and with bf16 float parts, on the calibration images."""
    ref = models["float32"](calib).float()
    lines = []
    for label, m in models.items():
        if label.endswith(BF16_PARTS):
            base = label[: -len(BF16_PARTS)]
            d32 = ((models[base](calib).float() - ref).norm() / ref.norm()).item()
            d16 = ((m(calib).float() - ref).norm() / ref.norm()).item()
            lines.append(f"- {base}: output distance to float32 {d32:.4f} with fp32 float parts, {d16:.4f} with "
                         "bf16 float parts (relative L2)")
    return lines


def batch_of(calib: torch.Tensor, b: int) -> torch.Tensor:
    reps = (b + calib.shape[0] - 1) // calib.shape[0]
    return calib.repeat(reps, 1, 1, 1)[:b].contiguous()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8; --quick: 1)")
    parser.add_argument("--models", default=None, help=f"comma-separated, from {','.join(MODELS)} (default: both)")
    parser.add_argument("--plans", nargs="*", default=None,
                        help="DINOv2 mixq Plan JSON files (default: the newest runs/demo-*/plan-mixed-4.5b.json)")
    parser.add_argument("--act-quant", default="auto", choices=["auto", "smooth", "dynamic"])
    parser.add_argument("--bf16-parts", choices=["auto", "on", "off"], default="auto",
                        help="add each mixq model with its float parts in bf16 (mixq.nn.cast_float_parts); auto: "
                             "where the CPU has AVX512-BF16/AMX-BF16")
    parser.add_argument("--quick", action="store_true", help="DINOv2-S, batch 1, 3 rounds, stand-in plan")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu_model.md"),
                        help="Markdown file to write ('' to skip)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds = 3 if args.quick else args.rounds
    batches = [int(v) for v in (args.batches or ("1" if args.quick else "1,8")).split(",")]
    names = (args.models or ("dinov2-s" if args.quick else ",".join(MODELS))).split(",")
    plans = [] if args.quick and args.plans is None else (default_plans() if args.plans is None else args.plans)
    machine0 = timing.machine()
    t0 = time.perf_counter()
    out = ["# Whole-model CPU latency (bench/bench_cpu_model.py)", "",
           f"Command: `python bench/bench_cpu_model.py {' '.join(os.sys.argv[1:])}`".rstrip() + "",
           f"Machine at the start: {machine0}", f"mixq CPU kernel family: `{latency.kernel_path()}`", "",
           "Every row of a table is timed in the same interleaved rounds (median of "
           f"{rounds} rounds); ratios: time of the reference / time of the row (above 1: the row is faster). "
           "'vs best baseline': against the fastest of float32, bfloat16 and torch int8 dynamic (fbgemm, oneDNN) "
           "of the same run.", ""]
    kinds = ("W8A8", "W4A8", "mixed")
    summary = ["| model | batch | " + " | ".join(f"{q} vs best baseline" for q in kinds) + " | "
               + " | ".join(f"{q} bf16 parts vs best baseline" for q in kinds) + " |", "|---|---:|" + "---:|" * 6]
    for name in names:
        bf16_parts = args.bf16_parts == "on" or (args.bf16_parts == "auto" and bf16_preferred())
        models, quant, calib = build_models(name, plans, args.act_quant, bf16_parts=bf16_parts)
        effect = bf16_parts_effect(models, calib) if bf16_parts else []
        for b in batches:
            rows = latency.compare(models, batch_of(calib, b), "cpu", iters=rounds)
            table = latency.markdown_table(rows, quant, caption=f" (batch {b})", backends=["cpu"])
            out += [f"## {name}, batch {b}", "", table, ""]
            if effect and b == batches[0]:
                out += [f"Accuracy effect of bf16 float parts ({name}, {calib.shape[0]} calibration images):"] + effect + [""]
            print(f"\n## {name}, batch {b}\n\n{table}", flush=True)
            by = {r["name"]: r for r in rows}
            cells = [f"{by[q]['vs_best_baseline']:.2f}x" for q in quant[:3]]
            cells += [f"{by[q + BF16_PARTS]['vs_best_baseline']:.2f}x" if q + BF16_PARTS in by else "–"
                      for q in quant[:3]]
            summary.append(f"| {name} | {b} | " + " | ".join(cells) + " |")
        del models
    load = os.getloadavg()[0]
    out += ["## Summary: each mixq model against the best baseline of its run", ""] + summary + [""]
    out.append(f"Machine at the end: {timing.machine()}; {time.perf_counter() - t0:.0f} s in all.")
    if load > args.threads + 0.5:
        out.append(f"\nWARNING: load average {load:.2f} above {args.threads} thread(s): other jobs shared the "
                   "cores (shared machine), so absolute figures are not quotable; the same-run ratios are the figure.")
    print("\n".join(out[-len(summary) - 4:]))
    if args.out:
        Path(args.out).write_text("\n".join(out) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
