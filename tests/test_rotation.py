"""Rotated QuantLinears: the kernel path equals the simulation bit for bit on every backend, the
rotation preserves the float function, the config part round-trips, and checkpoints keep it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mixq
from mixq import rotation
from mixq.backends import available_backends
from mixq.config import LinearConfig, QuantConfig, RotationConfig
from mixq.nn import QuantLinear
from mixq.quantize import quantize_, set_simulate


class TinyViTBlock(nn.Module):
    """LayerNorm -> fc1 -> GELU -> fc2 (K = 3 x 32: a block-diagonal Hadamard) with a residual."""

    def __init__(self, d=48):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        x = x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))
        return self.head(x.mean(1))


def _model():
    torch.manual_seed(0)
    m = TinyViTBlock().eval()
    with torch.no_grad():
        m.norm.weight[3] = 20.0  # an outlier channel after the norm
    return m


def _data(n=12, seed=1):
    return torch.randn(n, 9, 48, generator=torch.Generator().manual_seed(seed))


def _backends():
    names = ["reference"] + (["cpu"] if "cpu" in available_backends("cpu") else [])
    try:
        import triton  # noqa: F401

        names.append("triton")
    except ImportError:
        pass
    return names


@pytest.mark.parametrize("act_quant", ("dynamic", "smooth"))
@pytest.mark.parametrize("w_bits,a_bits", [(4, 4), (6, 6), (8, 8), (4, 8)])
def test_rotated_layer_is_the_float_layer_in_exact_arithmetic(act_quant, w_bits, a_bits):
    torch.manual_seed(2)
    lin = nn.Linear(96, 7)
    x = torch.randn(33, 96) * torch.linspace(0.1, 10, 96)
    q = QuantLinear.from_float(lin, 8, 8, act_quant, act_samples=x, rotation_seed=5)
    assert q.rot_signs is not None and q.rot_block == 32
    # the dequantized weight, un-rotated, is the float weight up to 8-bit rounding
    torch.testing.assert_close(q.dequantized_weight(), lin.weight.detach(), atol=0.02, rtol=0.02)
    q = QuantLinear.from_float(lin, w_bits, a_bits, act_quant, act_samples=x, rotation_seed=5)
    ref = lin(x).detach()
    err_rot = (q(x) - ref).pow(2).mean()
    assert torch.isfinite(err_rot)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("act_quant", ("auto", "dynamic"))
@pytest.mark.parametrize("bits", [(4, 4), (6, 6), (4, 8)])
def test_rotated_model_kernels_equal_simulation(backend, act_quant, bits):
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    model = _model()
    cfg = QuantConfig(LinearConfig(*bits, act_quant=act_quant, fold_layernorm=act_quant == "auto"),
                      backend=backend, rotation=RotationConfig(seed=3, skip=("head",)))
    quantize_(model, cfg, _data(), progress=False)
    assert model.fc1.rot_signs is not None and model.fc2.rot_signs is not None and model.head.rot_signs is None
    model.to(dev)
    x = _data(3, seed=7).to(dev)
    for dtype in (torch.float32, torch.bfloat16):  # a bf16 input into the fp32 model
        xd = x.to(dtype)
        kernel = model(xd)
        set_simulate(model, True)
        sim = model(xd)
        set_simulate(model, False)
        assert torch.equal(kernel, sim), f"{backend} {dtype}: max diff {(kernel - sim).abs().max()}"


def test_rotation_helps_an_outlier_channel_at_a4():
    """The point of rotating: one huge input channel ruins per-token A4; spread over the block it does not."""
    torch.manual_seed(4)
    lin = nn.Linear(128, 32)
    x = torch.randn(256, 128)
    x[:, 5] *= 60.0
    ref = lin(x).detach()
    plain = QuantLinear.from_float(lin, 8, 4, "dynamic")
    rotated = QuantLinear.from_float(lin, 8, 4, "dynamic", rotation_seed=0)
    assert (rotated(x) - ref).pow(2).mean() < 0.5 * (plain(x) - ref).pow(2).mean()


def test_gradients_flow_through_the_simulated_rotation():
    lin = nn.Linear(64, 8)
    q = QuantLinear.from_float(lin, 4, 4, "dynamic", rotation_seed=1, simulate=True)
    x = torch.randn(5, 64, requires_grad=True)
    q(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_config_part_round_trips_and_selects_layers():
    cfg = QuantConfig(LinearConfig(4, 4), rotation=RotationConfig(seed=9, layers=("blocks.*.fc2",), skip=("x",)))
    d = cfg.to_dict()
    assert d["version"] == QuantConfig.VERSION == 2 and d["rotation"]["version"] == 1
    assert QuantConfig.from_dict(d) == cfg
    assert cfg.rotation.rotates("blocks.3.fc2") and not cfg.rotation.rotates("blocks.3.fc1")
    old = QuantConfig(LinearConfig(4, 4)).to_dict()
    old["version"] = 1
    del old["rotation"]
    assert QuantConfig.from_dict(old).rotation is None  # version-1 dicts migrate: no rotation
    with pytest.raises(TypeError, match="RotationConfig has no keyword"):
        RotationConfig(block=128)


def test_rotation_refuses_static_modes():
    with pytest.raises(ValueError, match="rotation needs"):
        quantize_(_model(), QuantConfig(LinearConfig(4, 4, act_quant="channel"), rotation=RotationConfig()), _data(),
                  progress=False)
    with pytest.raises(ValueError, match="rotated QuantLinear needs"):
        QuantLinear(48, 8, act_quant="static", rotated=True)


def test_checkpoint_round_trip_keeps_the_rotation(tmp_path):
    model = _model()
    cfg = QuantConfig(LinearConfig(4, 4, fold_layernorm=True), rotation=RotationConfig(seed=2))
    quantize_(model, cfg, _data(), progress=False)
    x = _data(2, seed=3)
    want = model(x)
    path = tmp_path / "rot.mixq"
    mixq.save(model, path)
    loaded = mixq.load(path, _model())
    assert loaded.mixq_config == cfg
    assert torch.equal(loaded.fc2.rot_signs, model.fc2.rot_signs) and loaded.fc2.layer_config()["rotated"]
    assert torch.equal(loaded(x), want)
