"""act_quant="smooth": SmoothQuant-style channel factors folded into the weights (and optionally
into the producer LayerNorm), with dynamic per-token activation scales."""

import warnings

import pytest
import torch
from torch import nn

import mixq
from mixq import formats
from mixq.nn import QuantLinear
from mixq.config import LinearConfig, QuantConfig
from mixq.quantize import quantize_

BITS = [4, 6, 8]
K, N, M = 37, 19, 13


def _outlier_scale(k=K, chans=(3, 17, 30), factor=50.0):
    s = torch.ones(k)
    s[list(chans)] = factor
    return s


def _layer(k=K, n=N, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# ----------------------------------------------------------------------------- smooth_factors


def test_smooth_factors_geometric_mean_one():
    torch.manual_seed(0)
    amax = torch.rand(K) * 10 + 0.1
    w = torch.randn(N, K)
    for alpha in (0.0, 0.3, 0.5, 0.85, 1.0):
        s = formats.smooth_factors(amax, w, alpha)
        assert s.shape == (K,) and s.dtype == torch.float32
        assert torch.isfinite(s).all() and (s > 0).all()
        assert abs(float(torch.log(s.double()).mean())) < 1e-5


def test_smooth_factors_alpha_one_equalizes_loud_channels_only():
    torch.manual_seed(1)
    amax = torch.rand(K) * 10 + 0.1
    amax[[2, 9]] = 300.0
    s = formats.smooth_factors(amax, torch.randn(N, K), 1.0)
    floor = amax.median()
    loud = amax >= floor
    r = amax / s
    # channels at or above the median all land on one range; quiet ones are never scaled up past it
    torch.testing.assert_close(r[loud], torch.full_like(r[loud], float(r[loud][0])), rtol=1e-5, atol=0)
    assert (r[~loud] < r[loud][0]).all()
    torch.testing.assert_close(s[~loud], torch.full_like(s[~loud], float(s[~loud][0])), rtol=1e-5, atol=0)


def test_smooth_factors_alpha_zero_ignores_activations():
    torch.manual_seed(2)
    w = torch.randn(N, K)
    wmax = torch.maximum(w.abs().amax(dim=0), w.abs().amax(dim=0).median())
    s = formats.smooth_factors(torch.rand(K) * 100 + 0.01, w, 0.0)
    prod = s * wmax  # s_k proportional to 1 / max(wmax_k, median wmax)
    torch.testing.assert_close(prod, torch.full_like(prod, float(prod[0])), rtol=1e-5, atol=0)
    # the activation amax plays no role
    s2 = formats.smooth_factors(torch.rand(K) + 5, w, 0.0)
    torch.testing.assert_close(s, s2, rtol=1e-6, atol=0)


def test_smooth_factors_never_blow_up_a_quiet_channel():
    # A channel silent in calibration must not get a tiny s_k (1/s_k would explode it on new data).
    amax = torch.ones(K)
    amax[3] = 1e-4
    s = formats.smooth_factors(amax, torch.ones(N, K), 0.5)
    torch.testing.assert_close(s, torch.ones(K), rtol=1e-6, atol=0)


@pytest.mark.parametrize("alpha", [1.5, -0.1])
def test_smooth_factors_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        formats.smooth_factors(torch.ones(K), torch.randn(N, K), alpha)


def test_smooth_factors_shape_mismatch():
    with pytest.raises(ValueError):
        formats.smooth_factors(torch.ones(K), torch.randn(N, K + 1), 0.5)
    with pytest.raises(ValueError):
        formats.smooth_factors(torch.ones(K), torch.randn(K), 0.5)


def test_smooth_factors_zero_channels_finite():
    torch.manual_seed(3)
    amax = torch.rand(K) + 0.5
    amax[[0, 5, 36]] = 0.0
    w = torch.randn(N, K)
    w[:, 7] = 0.0  # dead weight column too
    for alpha in (0.0, 0.5, 1.0):
        s = formats.smooth_factors(amax, w, alpha)
        assert torch.isfinite(s).all() and (s > 0).all()
    s = formats.smooth_factors(torch.zeros(K), torch.zeros(N, K), 0.5)
    assert torch.isfinite(s).all() and (s > 0).all()


# ----------------------------------------------------------------------------- QuantLinear


@pytest.mark.parametrize("w_bits", BITS)
@pytest.mark.parametrize("a_bits", BITS)
def test_smooth_paths_bit_identical(w_bits, a_bits):
    lin = _layer()
    scale = _outlier_scale()
    calib = torch.randn(200, K) * scale
    q = QuantLinear.from_float(lin, w_bits, a_bits, act_quant="smooth", act_samples=calib)
    q_ref = QuantLinear.from_float(lin, w_bits, a_bits, act_quant="smooth", act_samples=calib, backend="reference")
    q_sim = QuantLinear.from_float(lin, w_bits, a_bits, act_quant="smooth", act_samples=calib).set_simulate(True)
    assert torch.equal(q.qweight, q_ref.qweight) and torch.equal(q.smooth_inv, q_ref.smooth_inv)
    # s_k and 1/s_k as fp32 reciprocal of each other
    torch.testing.assert_close(q.smooth_inv * q.act_channel_factor, torch.ones(K), rtol=1e-6, atol=0)
    torch.manual_seed(10 * w_bits + a_bits)
    inputs = [torch.randn(M, K), torch.randn(M, K) * scale, torch.randn(2, 7, K) * scale * 3]
    for x in inputs:
        y = q(x)
        assert y.shape == (*x.shape[:-1], N)
        assert torch.equal(y, q_ref(x))
        assert torch.equal(y, q_sim(x))


def test_smooth_w8a8_close_to_float_and_beats_dynamic():
    lin = _layer(k=K, n=N, seed=4)
    scale = _outlier_scale()
    torch.manual_seed(5)
    calib = torch.randn(256, K) * scale
    x = torch.randn(M, K) * scale
    ref = lin(x).detach()
    q_s = QuantLinear.from_float(lin, 8, 8, act_quant="smooth", act_samples=calib)
    q_d = QuantLinear.from_float(lin, 8, 8, act_quant="dynamic")
    err_s, err_d = _rel(q_s(x), ref), _rel(q_d(x), ref)
    assert err_s < 2e-2
    assert err_s < 0.7 * err_d, (err_s, err_d)
    # Without outliers at run time smoothing only costs weight precision (outlier columns widen
    # each row's weight step, ~2% here), so the error stays bounded but above dynamic's.
    x0 = torch.randn(M, K)
    assert _rel(q_s(x0), lin(x0).detach()) < 5e-2


def test_smooth_dequantized_weight_in_original_basis():
    lin = _layer()
    calib = torch.randn(200, K) * _outlier_scale()
    q = QuantLinear.from_float(lin, 8, 8, act_quant="smooth", act_samples=calib)
    # widened by the smoothed outlier columns (~2% at W8), but in the original basis, not the folded one
    assert _rel(q.dequantized_weight(), lin.weight.detach()) < 5e-2
    folded = formats.unpack_weight(q.qweight, 8, K).float() * q.w_scale[:, None]
    assert _rel(folded, lin.weight.detach() * q.act_channel_factor) < 5e-2


@pytest.mark.parametrize("prescaled", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_smooth_half_inputs_bit_identical(prescaled, dtype):
    lin = _layer()
    calib = torch.randn(200, K) * _outlier_scale()
    q = QuantLinear.from_float(lin, 6, 8, act_quant="smooth", act_samples=calib)
    q.input_prescaled = prescaled
    x = (torch.randn(M, K) * _outlier_scale()).to(dtype)
    y = q(x)
    assert y.dtype == dtype
    assert torch.equal(y, q.set_simulate(True)(x))


def test_smooth_simulate_gradient_is_dequantized_weight():
    lin = _layer()
    calib = torch.randn(200, K) * _outlier_scale()
    q = QuantLinear.from_float(lin, 8, 8, act_quant="smooth", act_samples=calib, simulate=True)
    x = torch.randn(5, K, requires_grad=True)
    q(x).sum().backward()
    # straight-through: the gradient of the dequantized layer in the input's original basis
    want = q.dequantized_weight().sum(0).expand(5, K)
    torch.testing.assert_close(x.grad, want, rtol=1e-5, atol=1e-6)


def test_smooth_accepts_amax_vector():
    lin = _layer()
    calib = torch.randn(200, K) * _outlier_scale()
    q1 = QuantLinear.from_float(lin, 6, 8, act_quant="smooth", act_samples=calib)
    q2 = QuantLinear.from_float(lin, 6, 8, act_quant="smooth", act_samples=calib.abs().amax(dim=0))
    assert torch.equal(q1.act_channel_factor, q2.act_channel_factor)
    assert torch.equal(q1.qweight, q2.qweight)


def test_smooth_needs_samples():
    with pytest.raises(ValueError, match="calibration samples"):
        QuantLinear.from_float(_layer(), 8, 8, act_quant="smooth")
    with pytest.raises(ValueError):
        QuantLinear.from_float(_layer(), 8, 8, act_quant="smooth", act_samples=torch.randn(10, K + 1))


@pytest.mark.parametrize("mode", ["dynamic", "static", "channel"])
def test_input_prescaled_needs_smooth(mode):
    with pytest.raises(ValueError, match="smooth"):
        QuantLinear(K, N, act_quant=mode, input_prescaled=True)
    QuantLinear(K, N, act_quant="smooth", input_prescaled=True)  # fine


def test_prescale_producer_equivalence_and_guards():
    lin = _layer()
    torch.manual_seed(6)
    ln = nn.LayerNorm(K)
    with torch.no_grad():
        ln.weight.copy_(torch.rand(K) * 2 + 0.5)
        ln.bias.copy_(torch.randn(K) * 0.1)
    x = torch.randn(M, K) * 3 + 1
    calib = ln(torch.randn(200, K)).detach()
    q = QuantLinear.from_float(lin, 8, 8, act_quant="smooth", act_samples=calib)
    h = ln(x).detach()
    want_in = h * q.smooth_inv
    ln2 = nn.LayerNorm(K)
    ln2.load_state_dict(ln.state_dict())
    q.prescale_producer(ln2)
    assert q.input_prescaled
    torch.testing.assert_close(ln2(x).detach(), want_in, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        q.prescale_producer(nn.LayerNorm(K))  # already prescaled
    q2 = QuantLinear.from_float(lin, 8, 8, act_quant="dynamic")
    with pytest.raises(ValueError):
        q2.prescale_producer(nn.LayerNorm(K))


# ----------------------------------------------------------------------------- quantize_ + folding


def _model(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.LayerNorm(37), nn.Linear(37, 29), nn.GELU(), nn.Linear(29, 11))
    with torch.no_grad():
        m[0].weight.copy_(torch.rand(37) * 2 + 0.2)
        m[0].weight[[4, 20]] = 25.0  # outlier channels after the norm
        m[0].bias.copy_(torch.randn(37) * 0.2)
    return m.eval()


def _calib(seed=1):
    torch.manual_seed(seed)
    return torch.randn(32, 5, 37) * 2 + 0.5


def _quantized(fold, seed=0, **kw):
    m = _model(seed)
    cfg = QuantConfig(LinearConfig(act_quant="smooth", fold_layernorm=fold, **kw))
    return quantize_(m, cfg, _calib(), progress=False)


def test_quantize_smooth_folds_layernorm():
    orig_w = _model()[0].weight.detach().clone()
    folded = _quantized(True)
    plain = _quantized(False)
    assert isinstance(folded[0], nn.LayerNorm)
    assert not torch.equal(folded[0].weight.detach(), orig_w)
    assert torch.equal(plain[0].weight.detach(), orig_w)
    assert isinstance(folded[1], QuantLinear) and isinstance(folded[3], QuantLinear)
    assert folded[1].act_quant == "smooth" and folded[3].act_quant == "smooth"
    assert folded[1].input_prescaled and not folded[3].input_prescaled
    assert not plain[1].input_prescaled
    # the folded norm is the original divided by s_k
    torch.testing.assert_close(folded[0].weight.detach(), orig_w * folded[1].smooth_inv, rtol=1e-6, atol=0)
    assert torch.equal(folded[1].qweight, plain[1].qweight)

    torch.manual_seed(7)
    x = torch.randn(9, 37) * 2 + 0.5
    with torch.no_grad():
        # at the first QuantLinear's input, in the folded basis: equal to float rounding
        h_plain = plain[0](x) * plain[1].smooth_inv
        h_fold = folded[0](x)
        torch.testing.assert_close(h_fold, h_plain, rtol=1e-5, atol=1e-6)
        y_f, y_p = folded(x), plain(x)
    # end to end: equal up to float rounding (the per-token grid absorbs the tiny input differences)
    torch.testing.assert_close(y_f, y_p, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        ref = _model()(x)
    assert _rel(y_f, ref) < 5e-2


def test_quantize_smooth_folded_simulate_matches_integer():
    folded = _quantized(True)
    x = torch.randn(2, 6, 37)
    with torch.no_grad():
        y = folded(x)
        mixq.quantize.set_simulate(folded, True)
        assert torch.equal(folded(x), y)


def test_smooth_alpha_config():
    with pytest.raises(ValueError):
        LinearConfig(act_quant="smooth", smooth_alpha=1.5)
    a = _quantized(False, smooth_alpha=0.2)
    b = _quantized(False, smooth_alpha=0.8)
    assert not torch.equal(a[1].act_channel_factor, b[1].act_channel_factor)


def test_checkpoint_roundtrip_folded_smooth(tmp_path):
    folded = _quantized(True)
    path = mixq.save(folded, tmp_path / "smooth.safetensors")
    loaded = mixq.load(path, _model(seed=123))  # different float weights: everything must come from the file
    assert isinstance(loaded[0], nn.LayerNorm)
    assert torch.equal(loaded[0].weight, folded[0].weight)
    assert loaded[1].act_quant == "smooth" and loaded[1].input_prescaled
    assert loaded[3].act_quant == "smooth" and not loaded[3].input_prescaled
    assert torch.equal(loaded[1].smooth_inv, folded[1].smooth_inv)
    x = torch.randn(4, 3, 37)
    with torch.no_grad():
        assert torch.equal(loaded(x), folded(x))


class _TwoConsumers(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.ln = nn.LayerNorm(37)
        self.fc = nn.Linear(37, 11)
        with torch.no_grad():
            self.ln.weight.copy_(torch.rand(37) * 2 + 0.2)
            self.ln.weight[[4, 20]] = 25.0
            self.ln.bias.copy_(torch.randn(37) * 0.2)

    def forward(self, x):
        h = self.ln(x)
        return self.fc(h) + h.mean(-1, keepdim=True)


def test_second_consumer_not_folded():
    m = _TwoConsumers().eval()
    orig_w = m.ln.weight.detach().clone()
    with pytest.warns(UserWarning, match="LayerNorm"):
        quantize_(m, QuantConfig(LinearConfig(act_quant="smooth", fold_layernorm=True)), _calib(), progress=False)
    assert isinstance(m.ln, nn.LayerNorm)
    assert torch.equal(m.ln.weight.detach(), orig_w)
    assert isinstance(m.fc, QuantLinear) and m.fc.act_quant == "smooth"
    assert not m.fc.input_prescaled


def test_single_consumer_folds_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folded = _quantized(True)
    assert folded[1].input_prescaled


def test_fold_skips_layernorm_without_affine():
    torch.manual_seed(0)
    m = nn.Sequential(nn.LayerNorm(37, elementwise_affine=False), nn.Linear(37, 11)).eval()
    quantize_(m, QuantConfig(LinearConfig(act_quant="smooth", fold_layernorm=True)), _calib(), progress=False)
    assert isinstance(m[0], nn.LayerNorm) and not m[1].input_prescaled
