"""A measured-latency budget on DINOv2-S: does the plan run as fast as asked, and is it as accurate?

One unattended command:

    PYTHONPATH=. .venv/bin/python bench/latency_budget.py            # -> bench/results/latency_budget.{md,json}
    PYTHONPATH=. .venv/bin/python bench/latency_budget.py --n-test 100 --scorer kl   # smaller, faster

Steps: build the latency table (``mixq.scores.latency``, cached per shape and machine key); quantize
the uniform points (W8A8, W6A8, W4A8, W8A4, W4A4 by default) and time every model end to end on one
inference batch, interleaved (``mixq.timing``); set the budget halfway between uniform W8A8 and the
fastest uniform point; allocate under that latency budget alone (no size or BOPs budget), quantize
the plan, time it with the others; evaluate every model with the DINOv2 harness (probe agreement with
FP and the rest of :data:`mixq.eval.harness.METRICS`, paired bootstrap intervals against the plan).
The report says whether the plan's measured latency is within 10% of the budget and whether its
probe agreement is at least that of every uniform point that is as slow or slower.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
UNIFORM = ((8, 8), (6, 8), (4, 8), (8, 4), (4, 4))


def log(msg: str) -> None:
    print(f"[latency_budget {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _subset_test(h, n: int) -> None:
    """Evaluate on a stratified subset of the test split; the cached FP reference is indexed, not rerun."""
    from mixq.models.textile import textile_split

    sub = textile_split("test").subset(n, 0)
    pos = {str(p): i for i, p in enumerate(h.splits.test)}
    idx = torch.tensor([pos[str(p)] for p in sub.paths])
    h.test_images = h.test_images[idx]
    h.ref.test_feats, h.ref.test_labels = h.ref.test_feats[idx], h.ref.test_labels[idx]
    h.splits.test = list(sub.paths)
    h.splits.described["evaluation"] = (f"{len(sub)} textile test images (stratified subset, seed 0) + "
                                        f"{len(h.splits.photos)} natural photos")


def _label(bits: tuple[int, int]) -> str:
    return f"W{bits[0]}A{bits[1]}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scorer", default="kl", help="allocate's scorer (default kl; measured is slower)")
    p.add_argument("--batch", type=int, default=1, help="images per inference call timed (default 1)")
    p.add_argument("--n-score", type=int, default=32,
                   help="calibration images the scorer runs on (default all 32; fewer is faster)")
    p.add_argument("--n-test", type=int, default=None, help="test images (default: the whole test split)")
    p.add_argument("--uniform", default=",".join(_label(b) for b in UNIFORM),
                   help="uniform points, comma-separated (default W8A8,W6A8,W4A8,W8A4,W4A4)")
    p.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds of the whole models")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latency_budget")
    p.add_argument("--note", default="", help="a line for the report (e.g. 'shared machine')")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from mixq import allocate, timing
    from mixq.data import run_model
    from mixq.eval.harness import METRICS, Dinov2Harness, compare, summarize
    from mixq.eval.quantized import QuantSpec, quantized_copy
    from mixq.formats import parse_bit_pair
    from mixq.models import get_adapter
    from mixq.models.dinov2 import cache_dir
    from mixq.models.images import load_batch
    from mixq.scores.latency import profile_latency

    t_start = time.perf_counter()
    machine = timing.machine()
    log(machine)
    adapter = get_adapter("dinov2-s")
    fp = adapter.build().eval()
    h = Dinov2Harness(fp, adapter, n_calib=32, n_score=32, cache=cache_dir(), log=log)
    if args.n_test is not None and args.n_test < len(h.splits.test):
        _subset_test(h, args.n_test)
    calib = load_batch(h.splits.calibration, adapter.transform)
    uniform = [parse_bit_pair(u) for u in args.uniform.split(",")]

    t0 = time.perf_counter()
    table = profile_latency(fp, calib, batch=args.batch, progress=True)
    table_s = time.perf_counter() - t0
    log(f"latency table: {len(table.shapes)} shapes, {table.measured} measured, {table.reused} cached, "
        f"{table_s:.1f} s")
    names = list(adapter.quantizable_linears(fp))

    models = {"fp32": fp}
    for bits in uniform:
        log(f"quantize uniform {_label(bits)}")
        models[_label(bits)] = quantized_copy(adapter, fp, QuantSpec(*bits), calib)
    x = calib[: args.batch]

    def time_models(ms: dict) -> dict:
        t = timing.interleaved_times({k: (lambda m=m: run_model(m, x)) for k, m in ms.items()}, rounds=args.rounds,
                                     min_round_s=0.05)
        return {k: v.median_s * 1e3 for k, v in t.items()}

    log("time the float and uniform models end to end, interleaved")
    first = time_models(models)
    fastest = min((k for k in first if k != "fp32"), key=first.get)
    budget_ms = (first["W8A8"] + first[fastest]) / 2 if "W8A8" in first else first[fastest]
    log(f"uniform measured: {', '.join(f'{k} {v:.2f} ms' for k, v in first.items())}; fastest {fastest}; "
        f"budget {budget_ms:.2f} ms")

    t0 = time.perf_counter()
    plan = allocate(fp, calib[: args.n_score], budget=None, scorer=args.scorer, filter_fn=adapter.quant_filter,
                    output_fn=adapter.output_fn, latency_budget=f"{budget_ms!r}ms", latency_batch=args.batch)
    alloc_s = time.perf_counter() - t0
    log(f"plan ({alloc_s:.0f} s): predicted {plan.latency['predicted_ms']:.2f} ms")
    models["plan"] = quantized_copy(adapter, fp, plan, calib)

    log("time every model again, the plan among them")
    measured = time_models(models)
    predicted = {"fp32": table.predict({})}
    for bits in uniform:
        predicted[_label(bits)] = table.predict({n: bits for n in names})
    predicted["plan"] = table.predict(dict(plan.layers))
    predicted = {k: v * 1e3 for k, v in predicted.items()}
    plan.latency["measured_ms"] = measured["plan"]

    log("evaluate")
    per_image = {"fp32": h.fp_metrics()}
    for k, m in models.items():
        if k != "fp32":
            per_image[k] = h.evaluate(m)
            log(f"{k}: probe agreement {np.mean(per_image[k]['probe_agree']):.2f}%")
    summary = {k: summarize(v) for k, v in per_image.items()}
    vs_plan = {k: compare(per_image["plan"], v) for k, v in per_image.items() if k not in ("plan", "fp32")}

    ratio = measured["plan"] / budget_ms
    slower = [k for k in measured if k not in ("plan", "fp32") and measured[k] >= measured["plan"]]
    at_least = all(vs_plan[k]["probe_agree"].value >= 0 for k in slower)
    choices: dict[str, int] = {}
    for bits in plan.layers.values():
        choices[_label(bits)] = choices.get(_label(bits), 0) + 1

    metrics = ["probe_agree", "knn_agree", "feat_cos", "sal_iou05"]
    lines = [
        "# Latency budget on DINOv2-S (CPU)", "",
        f"Machine: {machine}." + (f" {args.note}" if args.note else ""),
        "",
        f"Command: `PYTHONPATH=. .venv/bin/python bench/latency_budget.py"
        + (f" --scorer {args.scorer}" if args.scorer != "kl" else "")
        + (f" --n-test {args.n_test}" if args.n_test else "") + (f" --n-score {args.n_score}" if args.n_score != 32 else "") + (f" --batch {args.batch}" if args.batch != 1 else "")
        + "`",
        "",
        f"- latency table: {len(table.shapes)} Linear shapes x (fp32 + {len(table.times[next(iter(table.times))]) - 1} "
        f"candidates), {table.measured} measured and {table.reused} from the cache in {table_s:.1f} s "
        f"(kernel family {table.key.get('kernel_family', table.key.get('gpu'))}, {table.key['threads']} threads, "
        f"batch {table.batch}); non-Linear constant {table.other_s * 1e3:.2f} ms of the float model's "
        f"{table.model_s * 1e3:.2f} ms",
        f"- budget: halfway between uniform W8A8 ({measured_or(first, 'W8A8')}) and the fastest uniform point "
        f"{fastest} ({first[fastest]:.2f} ms), measured in the first timing pass: **{budget_ms:.2f} ms**",
        f"- plan ({args.scorer} scores on {min(args.n_score, len(calib))} calibration images, latency budget alone; "
        f"allocation {alloc_s:.0f} s): "
        + ", ".join(f"{k} x{v}" for k, v in sorted(choices.items()))
        + f"; {plan.avg_bits_per_weight:.2f} average weight bits",
        f"- plan latency: predicted {predicted['plan']:.2f} ms, measured {measured['plan']:.2f} ms; "
        f"measured / budget **{ratio:.3f}** ({'within' if abs(ratio - 1) <= 0.10 or ratio < 1 else 'outside'} "
        f"the 10% target), measured / predicted {measured['plan'] / predicted['plan']:.3f}",
        f"- accuracy target (probe agreement of the plan >= every uniform point as slow or slower: "
        f"{', '.join(slower) or 'none'}): **{'met' if at_least else 'not met'}** (point estimates; intervals below)",
        "",
        "Every model timed end to end on one inference batch, interleaved in the same rounds (median of "
        f"{args.rounds}); accuracy on {len(h.splits.test)} test images and {len(h.splits.photos)} photos, "
        "mean [bootstrap 95% interval]; the last column is the plan minus the row, paired over images.",
        "",
        "| model | measured ms | predicted ms | measured / predicted | "
        + " | ".join(METRICS[m][0] for m in metrics) + " | plan - row, probe agreement |",
        "|---|---:|---:|---:|" + "---:|" * len(metrics) + "---:|",
    ]
    for k in measured:
        cells = [summary[k][m].fmt(1.0, 2 if m not in ("feat_cos",) else 4) for m in metrics]
        diff = vs_plan[k]["probe_agree"].fmt(1.0, 2) if k in vs_plan else ""
        lines.append(f"| {k} | {measured[k]:.2f} | {predicted[k]:.2f} | {measured[k] / predicted[k]:.3f} | "
                     + " | ".join(cells) + f" | {diff} |")
    lines += ["", "Latency table (ms per call):", "", table.markdown(), "",
              f"Total time {time.perf_counter() - t_start:.0f} s.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines))
    args.out.with_suffix(".json").write_text(json.dumps({
        "machine": machine, "note": args.note, "scorer": args.scorer, "batch": args.batch,
        "n_test": len(h.splits.test), "budget_ms": budget_ms, "first_pass_ms": first, "measured_ms": measured,
        "predicted_ms": predicted, "plan": plan.to_dict(), "table": table.to_dict(), "table_s": table_s,
        "alloc_s": alloc_s, "summary": {k: {m: v.to_dict() for m, v in s.items()} for k, s in summary.items()},
        "plan_minus": {k: {m: v.to_dict() for m, v in d.items()} for k, d in vs_plan.items()},
        "ratio_to_budget": ratio, "accuracy_target_met": at_least,
    }, indent=1))
    log(f"wrote {args.out.with_suffix('.md')}")
    return 0


def measured_or(times: dict, key: str) -> str:
    return f"{times[key]:.2f} ms" if key in times else "not run"


if __name__ == "__main__":
    raise SystemExit(main())
