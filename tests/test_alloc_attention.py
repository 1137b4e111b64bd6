"""Attention matmuls in the allocator: exact MACs/BOPs, plans that round-trip into quantize_, budgets."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import mixq
from mixq.alloc import AllocationProblem, InfeasibleBudgetError, Plan, solve_plan
from mixq.attention import quantized_attention
from mixq.config import AttentionConfig, LinearConfig, QuantConfig
from mixq.scores.inventory import build_inventory

timm = pytest.importorskip("timm")

HEADS, DIM, DEPTH, TOKENS = 2, 32, 2, 17  # 32x32 image, 8x8 patches: 16 patches + the class token
_CACHE = None  # set by _shared_cache


def _vit():
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, num_classes=5).eval()


def _x(n=4):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", autouse=True)
def _shared_cache(tmp_path_factory):
    """One score cache for the module: the same tiny ViT is scored by several tests (its Linear
    probes do not change with attention=True), so later allocations reuse the earlier scores."""
    global _CACHE
    _CACHE = tmp_path_factory.mktemp("scores")
    yield


def _allocate(model, **kw):
    kw = {"budget": 6.0, "progress": False, "cache_dir": _CACHE, **kw}
    return mixq.allocate(model, _x(), **kw)


def test_inventory_macs_exact_and_in_execution_order():
    layers = build_inventory(_vit(), _x(), attention=True)
    macs = HEADS * TOKENS * TOKENS * (DIM // HEADS)  # per image, for QK^T and for P.V alike
    att = [l for l in layers if l.op != "linear"]
    assert [(l.name, l.op, l.macs, l.weight_params) for l in att] == [
        (f"blocks.{b}.attn.{op}", op, macs, 0) for b in range(DEPTH) for op in ("qk", "pv")]
    names = [l.name for l in layers]
    assert names[:5] == ["blocks.0.attn.qkv", "blocks.0.attn.qk", "blocks.0.attn.pv", "blocks.0.attn.proj",
                         "blocks.0.mlp.fc1"]
    assert [l.order for l in layers] == list(range(len(layers)))
    assert [l.name for l in build_inventory(_vit(), _x())] == [n for n in names if not n.endswith((".qk", ".pv"))]


def test_inventory_macs_of_windowed_and_cross_attention():
    """Swin: per-window token counts; SAM's decoder attention: N queries, M keys (N != M)."""
    torch.manual_seed(0)
    swin = timm.models.swin_transformer.SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=16,
                                                        depths=(1, 1), num_heads=(2, 4), num_classes=3).eval()
    macs = {l.name: l.macs for l in build_inventory(swin, _x(2), attention=True) if l.op != "linear"}
    # stage 0: 8x8 tokens in 4 windows of 16, 2 heads of 8; stage 1: 4x4 tokens in 1 window, 4 heads of 8
    assert macs == {"layers.0.blocks.0.attn.qk": 4 * 2 * 16 * 16 * 8, "layers.0.blocks.0.attn.pv": 4 * 2 * 16 * 16 * 8,
                    "layers.1.blocks.0.attn.qk": 4 * 16 * 16 * 8, "layers.1.blocks.0.attn.pv": 4 * 16 * 16 * 8}
    transformer = pytest.importorskip("segment_anything.modeling.transformer")

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = transformer.Attention(16, 2)

        def forward(self, x):
            return self.attn(x[:, :3], x, x).mean(1)

    layers = build_inventory(Cross(), torch.randn(2, 10, 16), attention=True)
    assert [(l.name, l.macs) for l in layers if l.op != "linear"] == [("attn.qk", 2 * 3 * 10 * 8), ("attn.pv", 2 * 3 * 10 * 8)]
    assert [l.name for l in layers][-3:] == ["attn.qk", "attn.pv", "attn.out_proj"]


def test_plan_with_attention_roundtrips_and_quantizes_as_planned(tmp_path):
    model = _vit()
    with pytest.raises(ValueError, match=r"not among its candidates \[\(4, 4\), \(6, 6\), \(8, 8\)\]"):
        _allocate(model, attention=True, pinned={"blocks.0.attn.qk": (4, 8)})
    plan = _allocate(model, bops_budget="0.5x", attention=True, pinned={"blocks.1.attn.pv": 8})
    att = plan.attention_layers
    assert att["blocks.1.attn.pv"] == (8, 8)
    assert len(att) == 2 * DEPTH and all(b1 == b2 for b1, b2 in att.values())
    macs = HEADS * TOKENS * TOKENS * (DIM // HEADS)
    # BOPs: every planned layer, the attention matmuls at MACs x b1 x b2; "0.5x" counts them at 8x8
    assert plan.bops == sum(plan.layer_info[n]["macs"] * w * a for n, (w, a) in plan.layers.items())
    assert plan.attention_bops == sum(macs * b1 * b2 for b1, b2 in att.values())
    assert plan.bops_budget == math.floor(0.5 * 64 * sum(i["macs"] for i in plan.layer_info.values()))
    assert plan.quantized_ops == "Linears + attention matmuls (QK^T, softmax.V)"
    assert "QK^T" in str(plan) and "softmax.V" in str(plan) and "BOPs share" in str(plan)
    plan.save(tmp_path / "plan.json")
    d = json.loads((tmp_path / "plan.json").read_text())
    assert d["layers"]["blocks.0.attn.qk"]["op"] == "qk" and "q_bits" in d["layers"]["blocks.0.attn.qk"]
    assert "p_bits" in d["layers"]["blocks.1.attn.pv"] and "w_bits" not in d["layers"]["blocks.1.attn.pv"]
    again = Plan.load(tmp_path / "plan.json")
    assert again == plan
    config = again.to_config(linear=LinearConfig(act_quant="dynamic", weight_method="rtn"))
    assert config.attention.layer_bits == att and config.linear.layer_bits == plan.linear_layers
    assert config.linear.layer_bits_only and config.linear.act_quant == "dynamic"
    q = mixq.quantize_(model, config, progress=False)
    for name, m in quantized_attention(q).items():
        c = m.layer_config()
        assert c["ops"] == ["qk", "pv"] and c["p_grid"] == plan.p_grid == "log2"
        assert (c["qk_bits"], c["qk_bits"]) == att[f"{name}.qk"]
        assert (c["p_bits"], c["v_bits"]) == att[f"{name}.pv"]
    assert set(quantized_attention(q)) == {f"blocks.{b}.attn" for b in range(DEPTH)}
    with torch.no_grad():
        assert torch.isfinite(q(_x(2))).all()

    from mixq.report import ReportData, write_report

    data = ReportData.from_plan("t", d)
    assert data.bops == plan.bops and data.attention_bops == plan.attention_bops
    assert data.avg_a_bits == pytest.approx(plan.avg_act_bits)
    text = write_report(data, tmp_path / "report").read_text()
    assert "Linears + attention matmuls (QK^T, softmax.V)" in text and "softmax.V" in text
    linear_only = ReportData.from_plan("t", json.loads(_allocate(_vit()).to_json()))
    assert "quantized ops: Linears only" in write_report(linear_only, tmp_path / "r2").read_text()
    from mixq.cli import main

    assert main(["report", str(tmp_path / "plan.json"), "--out", str(tmp_path / "r3")]) == 0
    assert "QK^T" in (tmp_path / "r3" / "report.md").read_text()


def test_config_quantizes_only_the_listed_matmuls():
    model = _vit()
    cfg = QuantConfig(LinearConfig(act_quant="dynamic", weight_method="rtn"),
                      AttentionConfig(layer_bits={"blocks.0.attn.pv": (4, 6)}))
    q = mixq.quantize_(model, cfg, progress=False)
    att = quantized_attention(q)
    assert list(att) == ["blocks.0.attn"]
    c = att["blocks.0.attn"].layer_config()
    assert c["ops"] == ["pv"] and (c["p_bits"], c["v_bits"]) == (4, 6)


@pytest.mark.parametrize("bits, match", [
    ({"blocks.0.attn.qkv": (8, 8)}, "does not name an attention matmul"),
    ({"blocks.0.attn.qk": (4, 8)}, "Q and K share one bit-width"),
    ({"blocks.0.attn.pv": (5, 8)}, "P bits"),
    ({"blocks.0.attn.pv": 8}, "pair"),
])
def test_bad_attention_layer_bits_are_refused(bits, match):
    with pytest.raises(ValueError, match=match):
        AttentionConfig(layer_bits=bits)


def test_attention_layer_bits_need_real_modules():
    def config(bits):
        return QuantConfig(LinearConfig(act_quant="dynamic", weight_method="rtn"), AttentionConfig(layer_bits=bits))

    with pytest.raises(KeyError, match="did you mean"):
        mixq.quantize_(_vit(), config({"blocks.0.atn.qk": (8, 8)}), progress=False)
    with pytest.raises(KeyError, match="not an attention module"):
        mixq.quantize_(_vit(), config({"blocks.0.mlp.qk": (8, 8)}), progress=False)


def test_size_budget_unchanged_by_attention():
    model = _vit()
    plain = _allocate(model, budget=5.0, synergy=False)
    with_att = _allocate(model, budget=5.0, synergy=False, attention=True)
    assert with_att.weight_params == plain.weight_params and with_att.size_budget_bits == plain.size_budget_bits
    assert with_att.linear_layers.keys() == plain.layers.keys()
    assert with_att.weight_bits <= with_att.size_budget_bits
    assert all(with_att.layer_info[n]["params"] == 0 for n in with_att.attention_layers)


def _problem_with_attention(att_macs=1000):
    """Two Linears pinned at W8A8 and one attention matmul: lowering the matmul is the only way down."""
    cands = [(8, 8), (4, 4), (6, 6), (4, 8)]
    costs = np.array([[0.0, 1.0, 0.5, 0.7], [0.0, 1.0, 0.5, 0.7], [0.0, 1.0, 0.2, 0.0]])
    return AllocationProblem(["a", "m.qk", "b"], cands, costs, [10, 0, 10], [1, 0, 1], [False] * 3,
                             [100, att_macs, 100], pinned={0: 0, 2: 0}, allowed=[None, [0, 1, 2], None],
                             ops=["linear", "qk", "linear"])


def test_solver_lowers_attention_bits_to_meet_bops():
    p = _problem_with_attention()
    linear = 2 * 100 * 64
    plan = solve_plan(p, None, linear + 1000 * 36)  # (6, 6) fits, (8, 8) does not
    assert plan.layers["m.qk"] == (6, 6) and plan.layer_info["m.qk"]["op"] == "qk"
    plan = solve_plan(p, None, linear + 1000 * 16)  # only (4, 4); (4, 8) is cheaper but not an attention choice
    assert plan.layers["m.qk"] == (4, 4)
    with pytest.raises(InfeasibleBudgetError, match=f"smallest feasible {linear + 16000:,}"):
        solve_plan(p, None, linear + 1000 * 16 - 1)
    assert Plan.from_json(plan.to_json()) == plan


def _brute(problem, rhs):
    import itertools

    mask = problem.allowed_mask()
    best = math.inf
    for choice in itertools.product(*[np.flatnonzero(mask[i]) for i in range(len(problem.names))]):
        if problem.bops()[np.arange(len(choice)), list(choice)].sum() <= rhs:
            best = min(best, problem.objective(choice))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_solver_respects_per_layer_choices_against_brute_force(seed):
    from mixq.alloc import DEFAULT_CANDIDATES, parse_bops_budget

    rng = np.random.default_rng(seed)
    ops = ["linear", "qk", "pv", "linear", "linear", "qk", "pv"]
    cands = list(DEFAULT_CANDIDATES)
    equal = [cands.index((b, b)) for b in (4, 6, 8)]
    L = len(ops)
    p = AllocationProblem([f"l{i}" for i in range(L)], cands, rng.uniform(0, 1, (L, len(cands))),
                          [0 if op != "linear" else int(rng.integers(1, 50)) for op in ops], [1] * L, [False] * L,
                          [int(v) for v in rng.integers(1, 200, L)], [(i, i + 1) for i in range(L - 1)],
                          [float(v) for v in rng.uniform(0, 1, L - 1)], 0.02,
                          allowed=[None if op == "linear" else equal for op in ops], ops=ops)
    rhs = parse_bops_budget(f"{rng.uniform(0.3, 0.9):.3f}x", p)
    best = _brute(p, rhs)
    if math.isinf(best):
        with pytest.raises(InfeasibleBudgetError):
            solve_plan(p, None, rhs)
        return
    plan = solve_plan(p, None, rhs)
    assert plan.bops <= rhs and plan.objective == pytest.approx(best, abs=1e-9)
    assert all(plan.layers[f"l{i}"][0] == plan.layers[f"l{i}"][1] for i, op in enumerate(ops) if op != "linear")


def test_cli_quantize_attention(tmp_path, capsys):
    from mixq.cli import main

    assert main(["quantize", "toy-vit", "--quantize-attention", "--scorer", "combined", "--out",
                 str(tmp_path / "q")]) == 2
    assert "cannot score attention" in capsys.readouterr().err and not (tmp_path / "q").exists()
    assert main(["quantize", "toy-vit", "--quantize-attention", "--uniform", "W8A8", "--n-calib", "4", "--out",
                 str(tmp_path / "q")]) == 0
    assert "Linears + attention matmuls" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "q" / "model.safetensors"), "--out", str(tmp_path / "r")]) == 0
    text = (tmp_path / "r" / "report.md").read_text()
    assert "quantized ops: Linears + attention matmuls (QK^T, softmax.V)" in text and "Q8K8 x2" in text


def test_problem_refuses_a_pin_outside_the_allowed_choices():
    with pytest.raises(ValueError, match="may not take"):
        AllocationProblem(["m.qk"], [(8, 8), (4, 8)], np.zeros((1, 2)), [0], [0], [False], [10],
                          pinned={0: 1}, allowed=[[0]], ops=["qk"])


def test_measured_and_sensitivity_scorers_cost_every_attention_choice():
    model = _vit()
    for scorer in ("measured", "sensitivity"):
        plan = _allocate(model, budget=8.0, scorer=scorer, attention=True, bops_budget="0.7x",
                         candidates=[(8, 8), (4, 4)])
        assert set(plan.attention_layers.values()) <= {(8, 8), (4, 4)}
        assert all(np.isfinite(plan.layer_info[n]["cost"]) for n in plan.layers)


def test_attention_pairs_are_added_when_the_linears_have_none():
    from mixq.alloc.attention import problem_candidates

    full, allowed = problem_candidates([(8, 4), (8, 8)], ["linear", "qk", "pv"])
    assert full == [(8, 4), (8, 8), (4, 4)] and allowed == [[0, 1], [2, 1], [2, 1]]
    # at 0.5x the Linears' least (W8A4) uses half of their W8A8 BOPs, so the attention matmuls must drop too
    plan = _allocate(_vit(), budget=8.0, bops_budget="0.5x", candidates=[(8, 4), (8, 8)], attention=True)
    assert set(plan.linear_layers.values()) <= {(8, 4), (8, 8)}
    assert set(plan.attention_layers.values()) <= {(4, 4), (8, 8)} and (4, 4) in plan.attention_layers.values()


def test_clear_errors():
    with pytest.raises(ValueError, match="cannot score attention"):
        _allocate(_vit(), scorer="lrp", attention=True)
    mlp = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4))
    with pytest.raises(ValueError, match="no attention module"):
        mixq.allocate(mlp, torch.randn(8, 16), attention=True, progress=False, cache_dir=False)
    with pytest.raises(TypeError, match="attention must be True or False"):
        _allocate(_vit(), attention="yes")

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.fc = nn.Linear(16, 4)

        def forward(self, x):
            return self.fc(self.attn(x, x, x)[0]).mean(1)

    with pytest.raises(NotImplementedError, match="MultiheadAttention"):
        mixq.allocate(Block(), torch.randn(4, 5, 16), attention=True, progress=False, cache_dir=False)
