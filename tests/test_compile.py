import pytest
import torch
from torch import nn

from mixq.nn import QuantLinear
from mixq.config import LinearConfig, QuantConfig
from mixq.quantize import quantize_


@pytest.mark.parametrize("mode", ["channel", "smooth"])
@pytest.mark.parametrize("fold", [False, True])
def test_torch_compile_fullgraph_traces_quantlinear_model(fold, mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 8)).eval()
    x = torch.randn(5, 16)
    cfg = QuantConfig(LinearConfig(layer_bits={"0": (4, 8), "3": (6, 6)}, fold_layernorm=fold, act_quant=mode))
    quantize_(model, cfg, torch.randn(20, 16), progress=False)
    assert isinstance(model[3], QuantLinear) and model[3].act_quant == mode
    assert model[3].folded_norm == (fold and mode == "channel")
    assert model[3].input_prescaled == (fold and mode == "smooth")
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), eager)
    graph = torch.export.export(model, (x,)).graph_module.code
    # A dynamic (smooth) layer is one op whatever the backend fuses; a static (channel) one quantizes, then multiplies.
    assert ("mixq.linear_dynamic.default" in graph) == (mode == "smooth")
    assert ("mixq.linear.default" in graph) == (mode == "channel")
    assert "mixq.quantize_act_dynamic" not in graph
    assert ("mixq.layernorm_quantize" in graph) == (fold and mode == "channel")


def test_inductor_compiles_with_grad_enabled_and_changes_only_float_rounding():
    """torch.compile with inductor, outside no_grad, with a float LayerNorm (parameters requiring grad)
    feeding a quantized layer, as in every ViT at default settings.

    What inductor changes: it generates its own GELU and LayerNorm code, whose fp32 rounding differs
    from eager's by an ulp. A dynamic (smooth) layer's per-token step moves by an ulp with it, so whole
    rows move by float rounding; a static (channel) step does not, but an activation sitting at a
    rounding tie can flip by one integer step, which moves that row's outputs by at most one step times
    the largest weight per flipped value. Rows without a flip are identical.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 8),
                          nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 8)).eval()
    calib = torch.randn(64, 16)
    quantize_(model, QuantConfig(LinearConfig(layer_bits={"0": (4, 8), "3": (6, 6)}, skip=("6",))), calib,
              progress=False)
    quantize_(model, QuantConfig(LinearConfig(8, 8, act_quant="channel", fold_layernorm=True)), calib,
              progress=False)
    assert model[3].act_quant == "smooth" and model[6].folded_norm
    assert model[2].weight.requires_grad and torch.is_grad_enabled()
    x = torch.randn(512, 16)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)(x)
    assert compiled.shape == eager.shape and torch.isfinite(compiled).all()
    diff = (compiled - eager).abs()
    last = model[6]
    one_step = float(last.act_scale) * float(last.w_scale.max()) * 127  # one activation step, largest weight
    assert diff.max() <= 2 * one_step
    flipped_rows = (diff > 1e-5 * eager.abs().max()).any(dim=1)
    assert flipped_rows.float().mean() < 0.02  # ties are rare; everything else is float rounding


@pytest.mark.parametrize("mode", ["dynamic", "smooth"])
def test_fused_dynamic_linear_traces_and_compiles_with_inductor(mode):
    """Small-M dynamic/smooth layers on triton (under the interpreter on CPU) run its fused kernel behind
    mixq::linear_dynamic: opaque to dynamo, export shows it, and inductor (fullgraph) reproduces eager
    bit for bit."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    lin = nn.Linear(24, 10)
    samples = torch.randn(20, 24) if mode == "smooth" else None
    q = QuantLinear.from_float(lin, 4, 6, act_quant=mode, act_samples=samples, backend="triton").to(device)
    x = torch.randn(3, 24, device=device)
    eager = q(x)
    assert torch.equal(eager.cpu(), QuantLinear.from_float(lin, 4, 6, act_quant=mode, act_samples=samples,
                                                           backend="reference")(x.cpu()))
    graph = torch.export.export(nn.Sequential(q), (x,)).graph_module.code
    assert "mixq.linear_dynamic.default" in graph and "mixq.linear.default" not in graph
    assert torch.equal(torch.compile(q, fullgraph=True, backend="eager")(x), eager)
    with torch.no_grad():
        assert torch.equal(torch.compile(q, fullgraph=True)(x), eager)
