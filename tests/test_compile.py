import pytest
import torch
from torch import nn

from mixq.nn import QuantLinear
from mixq.quantize import QuantConfig, quantize_


@pytest.mark.parametrize("mode", ["channel", "smooth"])
@pytest.mark.parametrize("fold", [False, True])
def test_torch_compile_fullgraph_traces_quantlinear_model(fold, mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 8)).eval()
    x = torch.randn(5, 16)
    cfg = QuantConfig(layer_bits={"0": (4, 8), "3": (6, 6)}, fold_layernorm=fold, act_quant=mode)
    quantize_(model, cfg, torch.randn(20, 16), progress=False)
    assert isinstance(model[3], QuantLinear) and model[3].act_quant == mode
    assert model[3].fused_norm == (fold and mode == "channel")
    assert model[3].input_prescaled == (fold and mode == "smooth")
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), eager)
    graph = torch.export.export(model, (x,)).graph_module.code
    assert "mixq.packed_linear" in graph
    assert ("mixq.quantize_act_dynamic" in graph) == (mode == "smooth")
    assert ("mixq.layernorm_quantize" in graph) == (fold and mode == "channel")
