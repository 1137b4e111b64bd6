"""`mixq report --pareto`: the Pareto frontier of a sweep JSON, drawn into the report."""

import json

import numpy as np
import pytest

from mixq.cli import frontier_from_sweep, main


def _point(kind, label, wbits, bops, agree, n=40, seed=0, **extra):
    rng = np.random.default_rng(seed)
    per_image = {m: ((rng.random(n) < agree) * 100.0).tolist() for m in ("knn_agree", "probe_agree", "knn_top1")}
    return {"kind": kind, "label": label, "wbits": wbits, "bops": bops, "per_image": per_image, **extra}


def _sweep():
    pts = {"fp": _point("fp", "FP32", 32.0, 1.0, 1.0),
           "u-w4a8": _point("uniform", "W4A8", 4.0, 0.5, 0.85, seed=1),
           "u-w6a6": _point("uniform", "W6A6", 6.0, 0.5625, 0.86, seed=2),
           "u-w8a8": _point("uniform", "W8A8", 8.0, 1.0, 0.98, seed=3),
           "u-w4a8-channel": _point("uniform", "W4A8 channel", 4.0, 0.5, 0.5, seed=4),
           "m-5.0@0.5625x": _point("mixed", "mixed 5.0b@0.5625x", 4.7, 0.5625, 0.96, seed=5, variant="default"),
           "m-5.0@0.5625x-lrp": _point("mixed", "mixed 5.0b@0.5625x [lrp]", 5.0, 0.56, 0.9, seed=6, variant="lrp")}
    for p in pts.values():
        if p["kind"] == "fp":
            del p["wbits"], p["bops"]
    return {"v1": {"points": {}}, "v1-test300": {"points": pts, "meta": {}}}


def test_frontier_from_sweep_skips_fp_variants_and_channel_points():
    points, settings = frontier_from_sweep(_sweep())
    assert settings == "v1-test300"
    assert sorted(p["label"] for p in points) == ["5.0b@0.5625x", "W4A8", "W6A6", "W8A8"]
    iv = next(p for p in points if p["label"] == "W6A6")["metrics"]["probe_agree"]
    assert iv["lo"] <= iv["value"] <= iv["hi"] and iv["n"] == 40


def test_report_pareto_draws_the_frontier(tmp_path, capsys):
    src = tmp_path / "pareto.json"
    src.write_text(json.dumps(_sweep()))
    out = tmp_path / "rep"
    assert main(["report", "--pareto", str(src), "--out", str(out)]) == 0
    for m in ("knn_agree", "probe_agree"):
        for x in ("bops", "wbits"):
            assert (out / f"frontier_{m}_{x}.png").stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "## Pareto frontier" in md and "| W6A6 | uniform | 6.000 | 0.5625 |" in md
    assert "[lo" not in md and "FP32" not in md and "[lrp]" not in md
    assert "frontier_probe_agree_bops.png" in (out / "report.html").read_text()


def test_report_pareto_with_a_plan(tmp_path):
    src = tmp_path / "pareto.json"
    src.write_text(json.dumps(_sweep()))
    plan = {"layers": {"a": {"w_bits": 4, "a_bits": 8, "params": 100, "macs": 1000},
                       "b": {"w_bits": 8, "a_bits": 8, "params": 100, "macs": 1000}}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    out = tmp_path / "rep"
    assert main(["report", str(tmp_path / "plan.json"), "--pareto", str(src), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "## Layers" in md and "## Pareto frontier" in md and (out / "bits_per_layer.png").is_file()


@pytest.mark.parametrize("content, says", [(None, "does not exist"), ("{", "not valid JSON"),
                                           ('{"v1": {"meta": {}}}', "not a Pareto sweep JSON"),
                                           ('[1, 2]', "not a Pareto sweep JSON"),
                                           ('{"v1-test300": {"points": {"fp": {"kind": "fp"}}}}', "no uniform")])
def test_report_pareto_errors_are_one_line_exit_2(tmp_path, capsys, content, says):
    src = tmp_path / "pareto.json"
    if content is not None:
        src.write_text(content)
    out = tmp_path / "rep"
    assert main(["report", "--pareto", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mixq report: error:") and says in err and "\n" not in err
    assert not out.exists()


def test_report_without_source_or_pareto_is_an_error(capsys):
    assert main(["report"]) == 2
    assert "--pareto" in capsys.readouterr().err


def test_plot_frontier_still_importable_from_eval_pareto():
    from mixq.eval.pareto import plot_frontier
    from mixq.report import plot_frontier as moved

    assert plot_frontier is moved
