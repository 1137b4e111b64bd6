"""The mixq command line, end to end on the tiny random `toy-vit` model."""

import json

import pytest

from mixq.cli import build_parser, main

SUBCOMMANDS = ["models", "quantize", "eval", "bench", "report", "demo"]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "toy6"
    assert main(["quantize", "toy-vit", "--budget", "6", "--bops", "0.6x", "--n-calib", "8",
                 "--out", str(out)]) == 0
    return out


def test_help_for_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert all(c in text for c in SUBCOMMANDS)
    for cmd in SUBCOMMANDS:
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert len(capsys.readouterr().out) > 200


def test_quantize_writes_checkpoint_and_plan(quantized):
    plan = json.loads((quantized / "plan.json").read_text())
    assert len(plan["layers"]) == 8
    bits = [(v["w_bits"], v["params"]) for v in plan["layers"].values()]
    assert sum(w * p for w, p in bits) / sum(p for _, p in bits) <= 6.0
    import mixq

    model = mixq.load(quantized / "model.safetensors")
    assert len([m for m in model.modules() if isinstance(m, mixq.QuantLinear)]) == 8


def test_uniform_quantize_bench_and_report(quantized, tmp_path, capsys):
    out = tmp_path / "u"
    assert main(["quantize", "toy-vit", "--uniform", "W8A8", "--n-calib", "4", "--out", str(out)]) == 0
    assert main(["bench", str(out / "model.safetensors"), "--iters", "2"]) == 0
    text = capsys.readouterr().out
    assert "torch int8 dynamic" in text and "speedup" in text
    rep = tmp_path / "rep"
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"points": [
        {"label": "W8A8", "kind": "uniform", "avg_bits": 8, "probe_top1": 70.0},
        {"label": "mixed", "kind": "mixed", "avg_bits": 6, "probe_top1": 69.0},
        {"label": "W4A4", "kind": "uniform", "avg_bits": 4, "probe_top1": 40.0}]}))
    assert main(["report", str(quantized / "plan.json"), "--results", str(results), "--out", str(rep)]) == 0
    for name in ("report.md", "report.html", "bits_per_layer.png", "scores_per_layer.png",
                 "size_bops_budget.png", "pareto.png"):
        assert (rep / name).stat().st_size > 500, name
    assert "blocks.0.attn.qkv" in (rep / "report.md").read_text()
    rep2 = tmp_path / "rep2"
    assert main(["report", str(out / "model.safetensors"), "--out", str(rep2)]) == 0
    assert (rep2 / "bits_per_layer.png").exists()


def test_eval_classify_on_an_image_folder(quantized, tmp_path, capsys):
    from PIL import Image

    for cls in ("a", "b", "c"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 40), (80 * i, 60, 30)).save(tmp_path / "imgs" / cls / f"{i}.png")
    (tmp_path / "imgs" / "a" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "res.json"
    assert main(["eval", str(quantized / "model.safetensors"), "--task", "classify",
                 "--images", str(tmp_path / "imgs"), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n_images"] == 6 and res["skipped"] == 1
    assert set(res["top1"]) == {"FP32", "quantized"}


@pytest.mark.parametrize("argv,message", [
    (["quantize", "no-such-model", "--out", "{tmp}/x"], "Known models"),
    (["quantize", "toy-vit", "--budget", "3", "--out", "{tmp}/x"], "out of range"),
    (["quantize", "toy-vit", "--budget", "9.5", "--out", "{tmp}/x"], "[4, 8]"),
    (["quantize", "toy-vit", "--uniform", "W5A8", "--out", "{tmp}/x"], "bits in 4, 6, 8"),
    (["quantize", "toy-vit", "--calib", "{tmp}/missing", "--out", "{tmp}/x"], "not a readable directory"),
    (["quantize", "sam-vit-b:{tmp}/missing.pth", "--out", "{tmp}/x"], "missing.pth"),
    (["quantize", "toy-vit", "--out", "{tmp}/exists"], "--force"),
    (["eval", "{tmp}/missing.safetensors"], "does not exist"),
    (["bench", "{tmp}/exists/user.txt"], "not a readable safetensors"),
    (["bench", "{tmp}/exists/user.txt", "--device", "nonsense"], "is not a torch device"),
    (["bench", "{tmp}/exists/user.txt", "--threads", "-1"], "--threads must be >= 0"),
    (["report", "{tmp}/missing.json"], "does not exist"),
    (["quantize", "toy-vit", "--budget", "4", "--bops", "0.1x", "--n-calib", "4", "--out", "{tmp}/y"],
     "smallest feasible"),
])
def test_bad_input_errors(argv, message, tmp_path, capsys):
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "user.txt").write_text("keep me")
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert (tmp_path / "exists" / "user.txt").read_text() == "keep me"


def test_parser_defaults_match_the_docs():
    args = build_parser().parse_args(["quantize"])
    assert args.model == "dinov2-s" and args.budget == 6.0 and args.n_calib == 32 and args.scorer == "measured"


def test_force_keeps_the_old_output_when_the_new_run_fails(tmp_path, capsys):
    """--force replaces the output only once the new one is complete: bad arguments or a failing run
    leave the old folder as it was, and no partial folder beside it."""
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "user.txt").write_text("keep me")
    assert main(["quantize", "toy-vit", "--budget", "9", "--out", str(keep), "--force"]) == 2
    assert main(["quantize", "toy-vit", "--budget", "6", "--bops", "1e-9x", "--n-calib", "4",
                 "--out", str(keep), "--force"]) == 2
    assert (keep / "user.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]
    assert main(["quantize", "toy-vit", "--uniform", "W8A8", "--n-calib", "4", "--weights", "rtn",
                 "--out", str(keep), "--force"]) == 0
    assert sorted(p.name for p in keep.iterdir()) == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]
    assert ".partial" not in capsys.readouterr().out  # the summary names the final paths


@pytest.mark.parametrize("argv,message", [
    (["--scorer", "nope"], "invalid choice"),
    (["--bops", "garbage"], "--bops: cannot read bops_budget 'garbage'"),
    (["--bops", "1e400"], "finite"),
    (["--n-calib", "0"], "whole number >= 1"),
    (["--budget", "1e400MB"], "--budget: cannot read size budget"),
    (["--budget", "twelve"], "--budget: cannot read size budget"),
])
def test_user_errors_exit_2_with_one_line(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        code = main(["quantize", "toy-vit", *argv, "--out", str(tmp_path / "x")])
        raise SystemExit(code)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err, err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_combined_scorer_sums_all_three(tmp_path, monkeypatch):
    import mixq.alloc

    seen = {}

    def fake_allocate(model, calib, **kw):
        seen.update(kw)
        raise mixq.alloc.InfeasibleBudgetError("stop here")

    monkeypatch.setattr(mixq.alloc, "allocate", fake_allocate)
    assert main(["quantize", "toy-vit", "--scorer", "combined", "--n-calib", "2", "--out", str(tmp_path / "x")]) == 2
    assert seen["scorer"] == ["kl", "lrp", "sensitivity"]
    mixq.alloc.api._scorer_weights(seen["scorer"])  # a scorer allocate accepts


def test_demo_summary_shows_dash_for_untimed_rows_and_the_torch_int8_row(capsys):
    from mixq.console import table
    from mixq.demo import SUMMARY_COLUMNS, summary_rows

    points = [{"label": "FP32", "avg_bits": 32, "probe_top1": 90.0, "saliency_iou": 1.0},
              {"label": "W8A8", "avg_bits": 8, "probe_top1": 89.0, "same_as_fp": 98.0, "saliency_iou": 0.97},
              {"label": "mixed-6", "avg_bits": 6, "probe_top1": 88.5, "same_as_fp": 97.0, "saliency_iou": 0.95}]
    latency = [{"name": "float32", "median_ms": 40.0}, {"name": "mixed-6", "median_ms": 25.0},
               {"name": "torch int8 dynamic", "median_ms": 30.0}]
    rows = summary_rows(points, latency)
    assert [r[0] for r in rows] == ["FP32", "W8A8", "mixed-6", "torch int8 dynamic"]
    assert [r[-1] for r in rows] == [40.0, None, 25.0, 30.0]
    table("summary", SUMMARY_COLUMNS, rows)
    text = capsys.readouterr().out
    assert "nan" not in text and "–" in text and "torch int8" in text  # (rich may wrap the name)


def test_demo_mixed_budgets_lie_between_uniform_points():
    from mixq.demo import MIXED_PLANS, UNIFORM
    from mixq.eval.pareto import uniform_budget

    (l5, b5, f5), (l45, b45, f45) = MIXED_PLANS
    assert (b5, f5) == (5.0, uniform_budget(6, 6)[1]) == (5.0, "0.5625x")  # 5 bits at W6A6's BOPs
    assert (b45, f45) == (4.5, uniform_budget(4, 8)[1]) == (4.5, "0.5x")  # 4.5 bits at W4A8's BOPs
    assert (6, 6) in UNIFORM and (4, 8) in UNIFORM
    # both strictly smaller than the uniform point whose BOPs they get
    assert b5 < 6 and 4 < b45


def test_demo_frontier_points_and_plot(tmp_path):
    from types import SimpleNamespace

    import torch

    from mixq.demo import (FRONTIER_CAPTION, FRONTIER_METRICS, MIXED_PLANS, UNIFORM, frontier_point,
                           per_image_values, plan_bops_fraction)
    from mixq.report import LayerRow, ReportData, write_report

    # per-image values from an evaluator's state after evaluate() (tiny stand-in)
    probe = SimpleNamespace(logits=lambda f: f)
    ev = SimpleNamespace(probe=probe, _last_features=torch.eye(4)[[0, 1, 2, 2]], _fp_pred=torch.tensor([0, 1, 2, 3]),
                         test_labels=torch.tensor([0, 0, 2, 2]), fp_maps=torch.ones(3, 4, 4))
    row = SimpleNamespace(maps=torch.stack([torch.ones(4, 4), torch.zeros(4, 4), torch.ones(4, 4)]))
    v = per_image_values(ev, row)
    assert v == {"probe_agree": [100.0, 100.0, 100.0, 0.0], "probe_top1": [100.0, 0.0, 100.0, 100.0],
                 "sal_iou05": [1.0, 0.0, 1.0]}
    assert plan_bops_fraction({"a": (4, 8), "b": (8, 8)}, {"a": {"macs": 1}, "b": {"macs": 3}}) == (32 + 3 * 64) / 256

    frontier = [frontier_point(f"W{w}A{a}", "uniform", w, w * a / 64, v) for w, a in UNIFORM]
    frontier += [frontier_point(label, "mixed", bits - 0.3, float(f.rstrip("x")), v) for label, bits, f in MIXED_PLANS]
    iv = frontier[0]["metrics"]["probe_agree"]
    assert iv["value"] == 75.0 and iv["lo"] <= 75.0 <= iv["hi"]
    data = ReportData("demo", [LayerRow("a", 4, 8, 16, 64, None, 4)], frontier=frontier,
                      frontier_metrics=dict(FRONTIER_METRICS), frontier_caption=FRONTIER_CAPTION.format(n_test=4))
    md = write_report(data, tmp_path).read_text()
    assert (tmp_path / "frontier_probe_agree_bops.png").stat().st_size > 1000
    assert "| mixed-5b | mixed |" in md and "the 4 test images" in md
