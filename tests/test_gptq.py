"""GPTQ weight rounding: beats round-to-nearest on the layer output, same format and scales, clear errors,
and it is what QuantLinear.from_float / quantize_ use when asked (or, by default, when data is given)."""

import pytest
import torch
from torch import nn

import mixq.gptq as gptq
from mixq import formats
from mixq.gptq import hessian, quantize_weight_gptq
from mixq.nn import QuantLinear
from mixq.config import LinearConfig, QuantConfig
from mixq.quantize import quantize_


def _correlated(rows: int, k: int, seed: int, outliers: int = 3) -> torch.Tensor:
    """X = Z A (correlated channels) with a few outlier channels, like a ViT's LayerNorm output."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, k, generator=g)
    a = torch.randn(k, k, generator=g) / k**0.5
    x = z @ a
    x[:, :outliers] *= 20.0
    return x


def _weights(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def _out_err(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> float:
    wq = q.to(torch.float64) * scale.to(torch.float64)[:, None]
    return float((x.double() @ w.double().T - x.double() @ wq.T).norm())


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("k", [48, 200])  # 200: not a multiple of the 128-column block
def test_gptq_beats_rtn_with_the_same_scales(bits, k):
    x, w = _correlated(512, k, seed=1), _weights(23, k, seed=2)
    q, scale = quantize_weight_gptq(w, bits, hessian(x))
    q_rtn, scale_rtn = formats.quantize_weight(w, bits)
    assert q.dtype == torch.int8 and q.shape == (23, k)
    assert scale.dtype == torch.float32 and scale.shape == (23,)
    assert torch.equal(scale, scale_rtn)  # the same per-channel scales (same MSE clip search)
    lim = formats.qmax(bits)
    assert int(q.abs().max()) <= lim
    err, err_rtn = _out_err(x, w, q, scale), _out_err(x, w, q_rtn, scale_rtn)
    assert err < 0.9 * err_rtn, (err, err_rtn)  # clearly better (about 0.4-0.6x in practice)
    # the integers pack in the canonical layout like any other weights
    assert torch.equal(formats.unpack_weight(formats.pack_weight(q, bits), bits, k), q)


def test_gptq_without_clip_search_uses_minmax_scales():
    x, w = _correlated(256, 48, seed=3), _weights(16, 48, seed=4)
    q, scale = quantize_weight_gptq(w, 4, hessian(x), clip_search=False)
    assert torch.allclose(scale, w.abs().amax(dim=1) / formats.qmax(4))
    assert int(q.abs().max()) <= formats.qmax(4)
    q_rtn, s_rtn = formats.quantize_weight(w, 4, clip_search=False)
    assert _out_err(x, w, q, scale) < 0.9 * _out_err(x, w, q_rtn, s_rtn)


def test_diagonal_hessian_is_round_to_nearest():
    """Uncorrelated inputs: no error to spread, so GPTQ rounds exactly like RTN."""
    w = _weights(12, 40, seed=5)
    g = torch.Generator().manual_seed(6)
    for bits in (4, 6, 8):
        q_rtn, s_rtn = formats.quantize_weight(w, bits)
        for h in (torch.eye(40) * 3.0, torch.diag(torch.rand(40, generator=g) + 0.1)):
            q, s = quantize_weight_gptq(w, bits, h)
            assert torch.equal(q, q_rtn) and torch.equal(s, s_rtn)


def test_result_does_not_depend_on_block_size(monkeypatch):
    x, w = _correlated(300, 150, seed=7), _weights(9, 150, seed=8)
    h = hessian(x)
    q_ref, s_ref = quantize_weight_gptq(w, 4, h)
    monkeypatch.setattr(gptq, "BLOCK", 7)  # blocks that straddle nothing in particular
    q, s = quantize_weight_gptq(w, 4, h)
    assert torch.equal(s, s_ref)
    assert (q != q_ref).float().mean() < 0.01  # float64 reassociation may flip a near-tie, no more


def test_dead_input_channels_get_zero_weights():
    x, w = _correlated(256, 32, seed=9), _weights(10, 32, seed=10)
    dead = torch.tensor([0, 5, 17, 31])  # 0 is also an outlier channel before it dies
    x[:, dead] = 0.0
    h = hessian(x)
    assert (torch.diagonal(h)[dead] == 0).all()
    for bits in (4, 8):
        q, scale = quantize_weight_gptq(w, bits, h)
        assert torch.isfinite(scale).all() and (scale > 0).all()
        assert (q[:, dead] == 0).all()
        live = torch.ones(32, dtype=torch.bool)
        live[dead] = False
        q_rtn, _ = formats.quantize_weight(w, bits)
        assert _out_err(x, w, q, scale) < _out_err(x, w, q_rtn, scale)
        assert int(q.abs().max()) <= formats.qmax(bits)
    # the damping follows the live channels, so scaling the inputs does not change the rounding
    assert torch.equal(quantize_weight_gptq(w, 4, hessian(x * 1e-3))[0], quantize_weight_gptq(w, 4, h)[0])
    # every channel dead: all-zero H still factors (after the dead-channel fix), weights all zero
    q, scale = quantize_weight_gptq(w, 4, torch.zeros(32, 32))
    assert (q == 0).all() and torch.isfinite(scale).all()


def test_zero_weight_rows_and_float16_inputs():
    x = _correlated(128, 24, seed=11)
    w = _weights(6, 24, seed=12)
    w[2] = 0.0
    q, scale = quantize_weight_gptq(w.half(), 4, hessian(x.half()))
    assert (q[2] == 0).all() and torch.isfinite(scale).all()
    _, s_rtn = formats.quantize_weight(w.half(), 4)
    assert torch.equal(scale, s_rtn)


def test_bad_inputs_are_refused():
    w, x = _weights(4, 8, seed=13), _correlated(32, 8, seed=14)
    h = hessian(x)
    with pytest.raises(ValueError, match="H"):
        quantize_weight_gptq(w, 4, torch.eye(9, dtype=torch.float64))
    with pytest.raises(ValueError):
        quantize_weight_gptq(w, 4, torch.eye(8)[:, :7])
    with pytest.raises(ValueError):
        quantize_weight_gptq(w[0], 4, h)  # 1-D weights
    bad = w.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize_weight_gptq(bad, 4, h)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_weight_gptq(bad, 4, h)
    with pytest.raises(ValueError, match="unsupported"):
        quantize_weight_gptq(w, 5, h)
    with pytest.raises(ValueError, match="unsupported"):
        quantize_weight_gptq(w, 16, h)
    xs = x.clone()
    xs[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        hessian(xs)
    with pytest.raises(ValueError, match="R > 0"):
        hessian(torch.empty(0, 8))
    with pytest.raises(ValueError):
        hessian(x.reshape(4, 8, 8))  # not [R, K]


def test_hessian_value():
    x = _correlated(64, 6, seed=15)
    h = hessian(x)
    assert h.dtype == torch.float64 and h.shape == (6, 6)
    assert torch.allclose(h, (x.double().T @ x.double()) / 64)


# ----------------------------------------------------------------------------- QuantLinear.from_float


def _linear(k: int, n: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n)


def test_from_float_gptq_is_closer_on_held_out_rows():
    k = 64
    x = _correlated(1024, k, seed=16)
    calib, held_out = x[:512], x[512:]
    lin = _linear(k, 24, seed=17)
    with torch.no_grad():
        ref = lin(held_out)
    errs = {}
    for method in ("gptq", "rtn"):
        q = QuantLinear.from_float(lin, 4, 8, act_quant="smooth", act_samples=calib, weight_method=method)
        assert q.w_bits == 4 and q.act_quant == "smooth"
        with torch.no_grad():
            out = q(held_out)
        assert torch.isfinite(out).all()
        errs[method] = float((out - ref).norm())
    assert errs["gptq"] < 0.9 * errs["rtn"], errs
    # the simulation path agrees with the kernels on a GPTQ layer too
    q = QuantLinear.from_float(lin, 4, 8, act_quant="smooth", act_samples=calib, weight_method="gptq")
    sim = QuantLinear.from_float(lin, 4, 8, act_quant="smooth", act_samples=calib, weight_method="gptq",
                                 simulate=True)
    assert torch.equal(q.qweight, sim.qweight)
    with torch.no_grad():
        assert torch.allclose(q(held_out), sim(held_out), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act_quant", ["dynamic", "static", "channel"])
def test_from_float_gptq_other_act_modes(act_quant):
    """GPTQ works in every activation mode (its Hessian in the basis the folded weights see)."""
    k = 32
    x = _correlated(512, k, seed=18)
    lin = _linear(k, 12, seed=19)
    with torch.no_grad():
        ref = lin(x[256:])
    errs = {}
    for method in ("gptq", "rtn"):
        q = QuantLinear.from_float(lin, 4, 8, act_quant=act_quant, act_samples=x[:256], weight_method=method)
        with torch.no_grad():
            errs[method] = float((q(x[256:]) - ref).norm())
    assert errs["gptq"] < errs["rtn"], errs


def test_from_float_weight_method_errors():
    lin = _linear(16, 8, seed=20)
    x = _correlated(64, 16, seed=21)
    with pytest.raises(ValueError, match="weight_method"):
        QuantLinear.from_float(lin, 4, 8, act_quant="smooth", act_samples=x, weight_method="bogus")
    with pytest.raises(ValueError, match="act_samples"):
        QuantLinear.from_float(lin, 4, 8, act_quant="dynamic", act_samples=None, weight_method="gptq")
    # dynamic + gptq with samples is fine; dynamic + rtn needs none
    QuantLinear.from_float(lin, 4, 8, act_quant="dynamic", act_samples=x, weight_method="gptq")
    QuantLinear.from_float(lin, 4, 8, act_quant="dynamic", act_samples=None, weight_method="rtn")
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        QuantLinear.from_float(lin, 4, 8, act_quant="dynamic", act_samples=bad, weight_method="gptq")


# ----------------------------------------------------------------------------- quantize_ / QuantConfig


class _Tiny(nn.Module):
    def __init__(self, k: int = 48):
        super().__init__()
        self.fc1 = nn.Linear(k, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _qweights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.qweight.clone() for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_quantize_auto_uses_gptq_with_calibration_data():
    torch.manual_seed(22)
    base = _Tiny()
    x = _correlated(256, 48, seed=23)

    def run(**kw):
        model = _Tiny()
        model.load_state_dict(base.state_dict())
        cfg = QuantConfig(LinearConfig(4, 8, **{k: v for k, v in kw.items() if k != "calib"}))
        return quantize_(model, cfg, kw.get("calib"), progress=False)

    auto = run(weight_method="auto", calib=x)
    explicit = run(weight_method="gptq", calib=x)
    rtn = run(weight_method="rtn", calib=x)
    qa, qg, qr = _qweights(auto), _qweights(explicit), _qweights(rtn)
    assert set(qa) == {"fc1", "fc2"}
    for name in qa:
        assert torch.equal(qa[name], qg[name])  # auto + data == gptq
    assert not torch.equal(qa["fc1"], qr["fc1"])  # ... which is not round-to-nearest
    with torch.no_grad():
        ref = base(x)
        assert float((auto(x) - ref).norm()) < float((rtn(x) - ref).norm())


def test_quantize_auto_without_data_is_rtn():
    torch.manual_seed(24)
    model = _Tiny()
    lins = {"fc1": model.fc1, "fc2": model.fc2}
    expect = {n: QuantLinear.from_float(m, 4, 8, act_quant="dynamic", weight_method="rtn").qweight for n, m in lins.items()}
    quantize_(model, QuantConfig(LinearConfig(4, 8, act_quant="dynamic", weight_method="auto")), None, progress=False)
    got = _qweights(model)
    assert set(got) == set(expect)
    for name in expect:
        assert torch.equal(got[name], expect[name])
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(4, 48))).all()
    # explicit GPTQ without data is refused, naming what is missing
    with pytest.raises(ValueError, match="calib"):
        quantize_(_Tiny(), QuantConfig(LinearConfig(4, 8, act_quant="dynamic", weight_method="gptq")), None,
                  progress=False)


def test_quant_config_rejects_unknown_weight_method():
    with pytest.raises(ValueError, match="weight_method"):
        LinearConfig(weight_method="x")
    for ok in ("auto", "gptq", "rtn"):
        assert LinearConfig(weight_method=ok).weight_method == ok
