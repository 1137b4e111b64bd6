"""W4A4 that holds up: uniform DINOv2-S points with and without Hadamard rotation and block reconstruction.

Each configuration is quantized once with ``mixq.quantize_`` (32 calibration images, GPTQ, smooth
activations, LayerNorms folded), optionally block-reconstructed (:mod:`mixq.reconstruct`), then judged
by the accuracy harness (:class:`mixq.eval.harness.Dinov2Harness`: per-image metrics, paired bootstrap
95% intervals) against FP and against the same bits without the extra step. Each quantized model also
runs once in simulation on the photos: the largest kernel-vs-simulation token difference is reported.

    .venv/bin/python bench/w4a4.py --configs w4a4,w4a4-rot         # rows cached in bench/results/w4a4.json
    .venv/bin/python bench/w4a4.py --render-only                   # -> bench/results/w4a4.md
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.accuracy import machine  # noqa: E402
from mixq.config import LinearConfig, QuantConfig, RotationConfig  # noqa: E402
from mixq.eval.harness import METRICS, PERCENT, Dinov2Harness, compare, dinov2_tokens, summarize  # noqa: E402
from mixq.quantize import quantize_, set_simulate  # noqa: E402

BITS = {"w4a4": (4, 4), "w4a6": (4, 6), "w6a6": (6, 6), "w4a8": (4, 8)}
SHOWN = ("probe_top1", "probe_agree", "knn_top1", "knn_agree", "feat_cos", "sal_iou05", "cls_cos")
SETTINGS = "v1-cal32"


def parse(name: str) -> tuple[tuple[int, int], bool, bool]:
    """'w4a4-rot-rec' -> ((4, 4), rotated, reconstructed)."""
    base, *flags = name.split("-")
    if base not in BITS or any(f not in ("rot", "rec") for f in flags):
        raise SystemExit(f"unknown config {name!r}: <{'|'.join(BITS)}>[-rot][-rec]")
    return BITS[base], "rot" in flags, "rec" in flags


def run(args) -> None:
    from mixq.models import get_adapter
    from mixq.models.dinov2 import cache_dir
    from mixq.models.images import load_batch

    store = json.loads(args.json.read_text()) if args.json.is_file() else {}
    points = store.setdefault(SETTINGS, {})
    adapter = get_adapter("dinov2-s")
    fp = adapter.build().eval()
    h = Dinov2Harness(fp, adapter, n_calib=32, n_score=32, cache=cache_dir())
    calib = load_batch(h.splits.calibration, adapter.transform)
    points["fp"] = {"per_image": {k: np.asarray(v).tolist() for k, v in h.fp_metrics().items()}}
    store["meta"] = {"machine": machine() + " (shared with other jobs: times are indicative)",
                     "splits": h.splits.described}
    for name in args.configs:
        if name in points and not args.redo:
            continue
        (w, a), rot, rec = parse(name)
        model = copy.deepcopy(fp)
        t0 = time.perf_counter()
        cfg = QuantConfig(LinearConfig(w, a, fold_layernorm=True), backend=args.backend,
                          rotation=RotationConfig(seed=0) if rot else None)
        with torch.no_grad():
            quantize_(model, cfg, calib, filter_fn=adapter.quant_filter, progress=False)
        t_quant = time.perf_counter() - t0
        rec_info = None
        if rec:
            from mixq.reconstruct import ReconstructConfig, reconstruct_blocks

            t1 = time.perf_counter()
            rec_info = reconstruct_blocks(model, fp, calib, ReconstructConfig(iters=args.rec_iters, seed=0),
                                          blocks=lambda m: list(m.backbone.vit.blocks), progress=True)
            rec_info = {"seconds": time.perf_counter() - t1, "blocks": rec_info}
        t_cal = time.perf_counter() - t0
        per_image = h.evaluate(model)
        tok_k, _ = dinov2_tokens(model, h.photo_images[:4])
        set_simulate(model, True)
        tok_s, _ = dinov2_tokens(model, h.photo_images[:4])
        points[name] = {"per_image": {k: np.asarray(v).tolist() for k, v in per_image.items()},
                        "calibration_seconds": t_cal, "quantize_seconds": t_quant, "reconstruction": rec_info,
                        "kernel_vs_sim_max_abs": float((tok_k - tok_s).abs().max()), "backend": args.backend}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(store))
        s = summarize(per_image)
        print(f"{name}: probe {s['probe_top1'].fmt()} agree {s['probe_agree'].fmt()} "
              f"(calibration {t_cal / 60:.1f} min, kernel-vs-sim {points[name]['kernel_vs_sim_max_abs']:.3g})",
              flush=True)


SHAPES = {"qkv": (384, 1152), "proj": (384, 384), "fc1": (384, 1536), "fc2": (1536, 384)}


def timing(args) -> None:
    """The online rotation's cost: rotated vs plain W4A4 QuantLinear (cpu kernels) on DINOv2-S shapes, one
    image (257 tokens), interleaved medians (mixq.timing), and the Hadamard op alone."""
    from torch import nn

    from mixq import ops, timing as timer
    from mixq.nn import QuantLinear

    store = json.loads(args.json.read_text()) if args.json.is_file() else {}
    rows = {}
    torch.manual_seed(0)
    for name, (k, n) in SHAPES.items():
        lin = nn.Linear(k, n)
        x = torch.randn(257, k)
        plain = QuantLinear.from_float(lin, 4, 4, "dynamic", backend=args.backend)
        rot = QuantLinear.from_float(lin, 4, 4, "dynamic", backend=args.backend, rotation_seed=0)
        t = timer.interleaved_times({
            "plain": lambda: plain(x), "rotated": lambda: rot(x),
            "hadamard": lambda: ops.hadamard_transform(x, rot.rot_signs, rot.rot_block, args.backend)}, rounds=9)
        rows[name] = {key: v.median_ms for key, v in t.items()}
        print(name, {key: f"{v:.3f} ms" for key, v in rows[name].items()}, flush=True)
    store.setdefault("timing", {})[args.backend] = {"machine": timer.machine() + " (shared, loaded by other jobs)",
                                                    "rows": rows}
    args.json.write_text(json.dumps(store))


def baseline_of(name: str) -> str | None:
    """The same bits without the last extra step (rec before rot), for the paired difference."""
    if name.endswith("-rec"):
        return name[: -len("-rec")]
    if name.endswith("-rot"):
        return name[: -len("-rot")]
    return None


def render(args) -> None:
    store = json.loads(args.json.read_text())
    points = store[SETTINGS]
    fp = points["fp"]["per_image"]
    order = [n for b in BITS for n in (b, f"{b}-rot", f"{b}-rec", f"{b}-rot-rec") if n in points]
    lines = ["## DINOv2 ViT-S/14: uniform W4A4 / W6A6 with Hadamard rotation and block reconstruction", "",
             f"Machine: {store['meta']['machine']}.",
             f"Command: `.venv/bin/python bench/w4a4.py --configs {','.join(order)}` (rows cached in "
             "bench/results/w4a4.json; `--render-only` writes this file).", "",
             "Splits: " + "; ".join(f"{k}: {v}" for k, v in store["meta"]["splits"].items()) + ".",
             "Every point: the 48 backbone Linears quantized (GPTQ weights, smooth per-token activations, "
             "LayerNorms folded as the default run does); `-rot`: randomized Hadamard rotation of every Linear's "
             "input (block-diagonal, blocks of 128 for K=384 and 512 for K=1536, online transform, W R^T "
             "folded into the weights); `-rec`: block reconstruction after GPTQ (mixq.reconstruct). Values: mean "
             "over images [paired bootstrap 95% interval]; Δ columns are paired differences.", "",
             "| config | " + " | ".join(METRICS[m][0] for m in SHOWN) + " | Δ probe agree vs FP | "
             "Δ probe agree vs base | calibration (min) | kernel vs sim max abs |",
             "|---|" + "---:|" * (len(SHOWN) + 4)]
    for name in ["fp"] + order:
        p = points[name]["per_image"]
        s = summarize(p)
        cells = [s[m].fmt(1.0, 2 if m in PERCENT else 4) for m in SHOWN]
        if name == "fp":
            lines.append("| FP32 | " + " | ".join(cells) + " | | | | |")
            continue
        d_fp = compare(p, fp)["probe_agree"].fmt()
        base = baseline_of(name)
        d_base = compare(p, points[base]["per_image"])["probe_agree"].fmt() if base in points else ""
        pt = points[name]
        lines.append(f"| {name.upper()} | " + " | ".join(cells) + f" | {d_fp} | {d_base} | "
                     f"{pt['calibration_seconds'] / 60:.1f} | {pt['kernel_vs_sim_max_abs']:.3g} |")
    recs = [(n, points[n]) for n in order if points[n].get("reconstruction")]
    if recs:
        lines += ["", "Block reconstruction (mixq.reconstruct, defaults: Adam, 4 calibration images per step, "
                  "rounding lr 1e-2, weight-step lr 1e-4, rounding regularizer 0.01 after 20% warm-up, QDrop "
                  "p = 0.5 in training, off at evaluation; the per-block MSE below is the hardened kernel path "
                  "on all 32 calibration images against the FP block output):", "",
                  "| config | steps per block | blocks kept reconstructed | block MSE after / before (mean over "
                  "blocks) | reconstruction (min) |", "|---|---:|---:|---:|---:|"]
        for n, pt in recs:
            blocks = pt["reconstruction"]["blocks"]
            ratio = float(np.mean([b["mse_after"] / b["mse_before"] for b in blocks]))
            kept = sum(b["kept"] == "reconstructed" for b in blocks)
            lines.append(f"| {n.upper()} | {blocks[0]['steps']} | {kept}/{len(blocks)} | {ratio:.3f} | "
                         f"{pt['reconstruction']['seconds'] / 60:.1f} |")
    tm = store.get("timing", {}).get("cpu")
    if tm:
        lines += ["", "Online rotation cost (W4A4 QuantLinear on the cpu kernels, one 224x224 image = 257 tokens, "
                  "interleaved medians; `bench/w4a4.py --timing`). Machine: " + tm["machine"] + ".", "",
                  "| layer (K -> N) | plain (ms) | rotated (ms) | ratio | Hadamard op alone (ms) |",
                  "|---|---:|---:|---:|---:|"]
        for name, r in tm["rows"].items():
            k, n = SHAPES[name]
            lines.append(f"| {name} ({k} -> {n}) | {r['plain']:.3f} | {r['rotated']:.3f} | "
                         f"{r['rotated'] / r['plain']:.2f}x | {r['hadamard']:.3f} |")
    args.out.write_text("\n".join(lines) + "\n")
    print(args.out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="w4a4,w4a4-rot")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--rec-iters", type=int, default=200, help="optimizer steps per block in reconstruction")
    ap.add_argument("--json", type=Path, default=ROOT / "bench/results/w4a4.json")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/w4a4.md")
    ap.add_argument("--redo", action="store_true", help="re-measure configs already in the json")
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--timing", action="store_true", help="only time the online rotation (cpu kernels)")
    args = ap.parse_args()
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in args.configs:
        parse(c)
    if args.timing:
        timing(args)
        return
    if not args.render_only:
        run(args)
    render(args)


if __name__ == "__main__":
    main()
