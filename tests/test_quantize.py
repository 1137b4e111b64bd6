import pytest
import torch
from torch import nn

import mixq
from mixq.nn import QuantLinear
from mixq.config import LinearConfig, QuantConfig
from mixq.quantize import find_linears, quantize_


class TinyBlock(nn.Module):
    def __init__(self, d=24):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        x = x + self.fc2(torch.relu(self.fc1(self.norm(x))))
        return self.head(x.mean(1))


def _model():
    torch.manual_seed(0)
    return TinyBlock().eval()


def _data(n=16):
    return torch.randn(n, 10, 24)


def test_quantize_in_place_with_per_layer_bits_and_auto_modes():
    model = _model()
    x = _data(4)
    ref = model(x)
    cfg = QuantConfig(LinearConfig(8, 8, layer_bits={"fc2": (4, 6)}, skip=("head",)))
    out = quantize_(model, cfg, _data(), progress=False)
    assert out is model
    assert isinstance(model.fc1, QuantLinear) and isinstance(model.fc2, QuantLinear)
    assert type(model.head) is nn.Linear
    assert (model.fc2.w_bits, model.fc2.a_bits) == (4, 6)
    assert model.fc1.act_quant == model.fc2.act_quant == "smooth"  # auto
    torch.testing.assert_close(model(x), ref, rtol=0.1, atol=0.1)


def test_filter_fn_selects_the_linears():
    model = quantize_(_model(), QuantConfig(LinearConfig(6, 8)), _data(), filter_fn=lambda n, m: n.startswith("fc"),
                      progress=False)
    assert [n for n, m in model.named_modules() if isinstance(m, QuantLinear)] == ["fc1", "fc2"]
    assert model.fc1.w_bits == 6


def test_a_plan_quantizes_exactly_its_layers():
    from mixq.alloc import Plan

    plan = Plan(layers={"fc1": (4, 8), "fc2": (6, 6)}, size_bits=0, weight_bits=0, weight_params=0, bops=0)
    model = quantize_(_model(), plan, _data(), progress=False)
    assert type(model.head) is nn.Linear
    assert {n: (m.w_bits, m.a_bits) for n, m in model.named_modules() if isinstance(m, QuantLinear)} == plan.layers
    assert model.mixq_config == plan.to_config() and model.mixq_config.linear.layer_bits_only


def test_an_object_with_to_config_is_not_a_plan():
    class PlanLike:
        def to_config(self):
            return QuantConfig()

    with pytest.raises(TypeError, match="QuantConfig or a mixq.Plan, got PlanLike"):
        quantize_(_model(), PlanLike(), _data(), progress=False)


def test_dynamic_needs_no_calibration_data():
    model = quantize_(_model(), QuantConfig(LinearConfig(act_quant="dynamic")), None, progress=False)
    assert isinstance(model.head, QuantLinear)


@pytest.mark.parametrize(
    "data,match",
    [
        (torch.zeros(0, 10, 24), "empty"),
        ([], "empty"),
        (None, "needs calibration data"),
        (torch.full((4, 10, 24), float("nan")), "NaN"),
        ([torch.randn(2, 10, 24), torch.tensor([[[float("inf")] * 24] * 10])], "NaN/Inf"),
    ],
)
def test_bad_calibration_data(data, match):
    model = _model()
    with pytest.raises(ValueError, match=match):
        quantize_(model, QuantConfig(), data, progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_unknown_layer_names_are_named():
    with pytest.raises(KeyError, match="'fc3'.*did you mean"):
        quantize_(_model(), QuantConfig(LinearConfig(layer_bits={"fc3": (8, 8)})), _data(), progress=False)
    with pytest.raises(KeyError, match="not a quantizable"):
        quantize_(_model(), QuantConfig(LinearConfig(layer_bits={"norm": (8, 8)})), _data(), progress=False)
    with pytest.raises(ValueError, match="supports"):
        LinearConfig(layer_bits={"fc1": (5, 8)})


def test_layers_that_never_run_are_reported():
    model = _model()
    model.unused = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="never ran"):
        quantize_(model, QuantConfig(), _data(), progress=False)


def test_find_linears_and_lazy_public_api():
    assert list(find_linears(_model())) == ["fc1", "fc2", "head"]
    assert mixq.quantize_ is quantize_ and mixq.QuantLinear is QuantLinear


def test_fold_layernorm_fuses_and_matches_unfused():
    x = _data(4)
    unfused = quantize_(_model(), QuantConfig(LinearConfig(act_quant="channel")), _data(), progress=False)
    folded = quantize_(_model(), QuantConfig(LinearConfig(act_quant="channel", fold_layernorm=True)), _data(),
                       progress=False)
    assert isinstance(folded.norm, nn.Identity) and folded.fc1.folded_norm
    assert folded.fc1.static_inv_scale.shape == (1,)
    torch.testing.assert_close(folded(x), unfused(x), rtol=2e-2, atol=2e-2)
    sim = folded(x)
    folded.fc1.set_simulate(True)
    torch.testing.assert_close(folded(x), sim, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["channel", "smooth"])
def test_fold_layernorm_is_skipped_when_output_has_another_consumer(mode):
    class Shared(TinyBlock):
        def forward(self, x):
            h = self.norm(x)
            return self.head((h + self.fc2(torch.relu(self.fc1(h)))).mean(1))

    torch.manual_seed(0)
    fp = Shared().eval()
    gamma = fp.norm.weight.detach().clone()
    with pytest.warns(UserWarning, match="not folded: \\['norm'\\]"):
        model = quantize_(fp, QuantConfig(LinearConfig(act_quant=mode, fold_layernorm=True)), _data(), progress=False)
    assert isinstance(model.norm, nn.LayerNorm) and torch.equal(model.norm.weight, gamma)
    assert not model.fc1.folded_norm and not model.fc1.input_prescaled


@pytest.mark.parametrize("fold", [False, True])
def test_whole_model_simulation_is_bit_identical_to_kernels(fold):
    # Any float difference between the two paths would flip activation roundings and grow block after
    # block, so whole-model agreement must be exact, not approximate.
    from mixq.quantize import set_simulate

    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=7).eval()
    x = torch.randn(6, 3, 32, 32)
    cfg = QuantConfig(LinearConfig(6, 6, layer_bits={"blocks.1.mlp.fc2": (4, 8)}, fold_layernorm=fold))
    quantize_(model, cfg, x, progress=False)
    y_kernel = model(x)
    y_sim = set_simulate(model, True)(x)
    assert torch.equal(y_kernel, y_sim)


def test_fold_layernorm_through_a_container():
    # The norm's output is handed to a submodule that passes it to the Linear: still a sole consumer.
    class Mlp(nn.Module):
        def __init__(self, d=24):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    class Block(nn.Module):
        def __init__(self, d=24):
            super().__init__()
            self.norm, self.mlp = nn.LayerNorm(d), Mlp(d)

        def forward(self, x):
            return x + self.mlp(self.norm(x))

    torch.manual_seed(0)
    model = quantize_(Block().eval(), QuantConfig(LinearConfig(fold_layernorm=True)), _data(), progress=False)
    assert model.mlp.fc1.input_prescaled and isinstance(model.norm, nn.LayerNorm)
