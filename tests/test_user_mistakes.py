"""What a new user runs into: models and inputs at the edges, each with a clear error or a right answer."""

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

import mixq
from mixq.nn import QuantLinear
from mixq.config import LinearConfig, QuantConfig
from mixq.quantize import quantize_


def test_mixq_nn_is_reachable_after_a_bare_import():
    code = "import mixq; print(mixq.nn.QuantLinear.__name__, mixq.formats.SUPPORTED_BITS)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["QuantLinear", "(4,", "6,", "8)"]


@pytest.mark.parametrize("mode", ["dynamic", "smooth", "channel"])
def test_float64_model_runs_as_float32_and_returns_float64(mode):
    torch.manual_seed(0)
    model32 = nn.Sequential(nn.Linear(16, 4))  # one layer: the float parts between would run in fp64
    model64 = copy.deepcopy(model32).double()
    calib = torch.randn(32, 16)
    cfg = dict(act_quant=mode, weight_method="rtn")
    quantize_(model32, QuantConfig(LinearConfig(**cfg)), calib, progress=False)
    quantize_(model64, QuantConfig(LinearConfig(**cfg)), calib.double(), progress=False)
    x = torch.randn(6, 16)
    out = model64(x.double())
    assert out.dtype == torch.float64
    assert torch.equal(out, model32(x).double())


def test_nan_weight_is_blamed_on_the_model_not_the_calibration_data():
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        model[2].weight[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"layer '2'.*model's weight contains NaN"):
        quantize_(model, QuantConfig(), torch.randn(20, 16), progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    with pytest.raises(ValueError, match="fix the model"):
        QuantLinear.from_float(model[2], 8, 8, act_samples=torch.randn(20, 8), weight_method="gptq")


def test_meta_device_model_gets_a_clear_error():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(16, 8))
    with pytest.raises(ValueError, match="meta device.*load its weights"):
        quantize_(model, QuantConfig(LinearConfig(act_quant="dynamic")), None, progress=False)


@pytest.mark.parametrize("simulate", [False, True])
@pytest.mark.parametrize("mode", ["dynamic", "smooth"])
def test_huge_inputs_stay_finite_like_nn_linear(mode, simulate):
    torch.manual_seed(0)
    lin = nn.Linear(64, 8)
    q = QuantLinear.from_float(lin, 8, 8, act_quant=mode, act_samples=torch.randn(32, 64), simulate=simulate)
    x = torch.randn(3, 64)
    small = q(x)
    for scale in (1e30, 1e36, 1e37):
        big = q(x * scale)
        expected = lin(x * scale)
        assert torch.isfinite(expected).all() and torch.isfinite(big).all(), scale
        assert ((big - expected).abs().max() / expected.abs().max()) < 0.05
        # Same integers as at normal scale: the output scales with the input (bias aside).
        torch.testing.assert_close(big / scale, (small - q.bias) / 1, rtol=1e-5, atol=1e-6 * big.abs().max() / scale)


def test_kernel_and_simulation_agree_exactly_on_huge_inputs():
    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(64, 8), 6, 8, act_quant="dynamic")
    x = torch.randn(5, 64) * torch.tensor([1.0, 1e10, 1e25, 1e36, 3e37])[:, None]
    assert torch.equal(q(x), q.set_simulate(True)(x))


def test_output_fn_with_the_wrong_signature_fails_up_front():
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(TypeError, match=r"output_fn\(model, batch\)"):
        mixq.allocate(model, torch.randn(8, 16), output_fn=lambda batch: torch.softmax(batch, -1), progress=False,
                      cache_dir=False)
    with pytest.raises(TypeError, match="callable"):
        mixq.allocate(model, torch.randn(8, 16), output_fn="softmax", progress=False, cache_dir=False)
