"""Pareto-sweep support: measured costs with cached prefixes, plans from them, budgets, the plot."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mixq.eval.dinov2_tasks import LinearProbe
from mixq.eval.pareto import (
    Planner, _distortions, cost_table, dinov2_blocks, is_uniform, measured_costs, plan_mix, plot_frontier,
    uniform_budget,
)
from mixq.models.dinov2 import Dinov2Backbone, Dinov2Saliency, SaliencyDecoder
from mixq.modules import set_module


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = Dinov2Saliency(Dinov2Backbone(embed_dim=32, depth=2, num_heads=2, pos_grid=4),
                           SaliencyDecoder(32, (8,))).eval()
    calib, score = torch.randn(4, 3, 56, 56), torch.randn(3, 3, 56, 56)
    probe = LinearProbe(torch.zeros(64, dtype=torch.float64), torch.ones(64, dtype=torch.float64),
                        torch.randn(3, 64, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "blocks" in n]
    return model, calib, score, probe, names


def test_uniform_budget_is_exact():
    assert uniform_budget(4, 6) == (4.0, "0.375x")
    assert uniform_budget(8, 8) == (8.0, "1x")


def test_measured_costs_equal_a_full_forward(tiny, tmp_path):
    """Starting at the perturbed block on cached FP inputs gives exactly the full model's numbers."""
    from mixq.nn import QuantLinear
    from mixq.config import CalibrationConfig
    from mixq.quantize import calibrate, find_linears

    model, calib, score, probe, names = tiny
    cands = [(4, 4), (8, 8)]
    c = measured_costs(model, calib, score, names, cands, probe, cache=tmp_path, log=lambda s: None)
    assert np.asarray(c["feat"]).shape == (len(names), 2, len(score))
    li = names.index("backbone.vit.blocks.1.attn.proj")
    keep = set(names)
    samples, _ = calibrate(model, find_linears(model, lambda n, m: n in keep), calib,
                           CalibrationConfig(), progress=False)
    original = model.get_submodule(names[li])
    with torch.no_grad():
        ref = model.backbone(score)
        set_module(model, names[li], QuantLinear.from_float(original, 4, 4, act_quant="smooth", act_samples=samples[names[li]],
                                                      simulate=True, weight_method="gptq"))
        try:
            got = _distortions(model.backbone(score), ref, probe)
        finally:
            set_module(model, names[li], original)
    for o in ("feat", "patch", "cls", "probe_kl"):
        assert np.allclose(c[o][li][0], got[o].numpy(), rtol=1e-5, atol=1e-12), o
    # W8A8 distorts less than W4A4 on average, and the first block's layers were measured too
    feat = np.asarray(c["feat"]).mean(axis=2)
    assert (feat[:, 1] < feat[:, 0]).mean() > 0.7
    # the second call is a cache hit
    assert measured_costs(model, calib, score, names, cands, probe, cache=tmp_path, log=lambda s: None) == json.loads(
        json.dumps(c))


def test_cost_table_and_plan(tiny, tmp_path):
    model, calib, score, probe, names = tiny
    cands = [(w, a) for w in (4, 6, 8) for a in (4, 6, 8)]
    c = measured_costs(model, calib, score, names, cands, probe, cache=None, log=lambda s: None)
    table, per_image = cost_table(c, ["feat", "patch"])
    assert table.shape == (len(names), 9) and per_image.shape == (len(names), len(score))
    assert np.allclose(per_image.sum(axis=0), 2.0)  # shares per image, one set per output
    t2, _ = cost_table(c, ["feat"], n_images=2)
    assert t2.shape == table.shape
    with pytest.raises(ValueError, match="unknown outputs"):
        cost_table(c, ["logits"])
    planner = Planner(model, calib, lambda n, m: n in set(names))
    w, f = uniform_budget(6, 6)
    plan = planner.solve(table, cands, w, f, per_image, lam=0.05)
    assert plan.avg_bits_per_weight <= 6.0 + 1e-9
    assert plan.bops <= planner.macs_total * 36
    one = planner.solve(table, cands, 4.0, "0.25x", per_image)
    assert is_uniform(one) and plan_mix(one) == f"{len(names)}xW4A4"


def test_plot_frontier(tmp_path):
    pts = [{"kind": "uniform", "label": "W4A4", "bops": 0.25, "wbits": 4, "metrics": {"m": {"value": 1, "lo": 0.5, "hi": 1.5}}},
           {"kind": "uniform", "label": "W8A8", "bops": 1.0, "wbits": 8, "metrics": {"m": {"value": 3, "lo": 2.5, "hi": 3.5}}},
           {"kind": "mixed", "label": "5b", "bops": 0.4, "wbits": 5, "metrics": {"m": {"value": 2.5, "lo": 2, "hi": 3}}}]
    for x in ("bops", "wbits"):
        p = plot_frontier(pts, "m", tmp_path / f"f_{x}.png", x=x)
        assert p.is_file() and p.stat().st_size > 1000
    with pytest.raises(ValueError, match="no point"):
        plot_frontier(pts, "other", tmp_path / "x.png")


def test_memoized_quantization_is_exact(tiny):
    """Reusing GPTQ results and calibration rows gives the same quantized model as quantize_ alone."""
    import copy

    from mixq.eval.pareto import memoized_quantization
    from mixq.config import LinearConfig, QuantConfig
    from mixq.quantize import quantize_

    model, calib, score, probe, names = tiny
    keep = set(names)
    cfg = QuantConfig(LinearConfig(4, 6, fold_layernorm=True))
    only = dict(filter_fn=lambda n, m: n in keep, progress=False)
    plain = quantize_(copy.deepcopy(model), cfg, calib, **only)
    with memoized_quantization() as memo:
        first = quantize_(copy.deepcopy(model), cfg, calib, **only)
        again = quantize_(copy.deepcopy(model), cfg, calib, **only)
    assert memo["gptq_hits"] == len(names) and memo["calib_hits"] == 1
    with torch.no_grad():
        ref = plain(score)
        assert torch.equal(first(score), ref) and torch.equal(again(score), ref)
