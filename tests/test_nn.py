import pytest
import torch
from torch import nn

from mixq import formats
from mixq.nn import QuantLinear

BITS = [4, 6, 8]
MODES = ["dynamic", "static", "channel"]


def _layer(k=37, n=19, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias)


@pytest.mark.parametrize("w_bits", BITS)
@pytest.mark.parametrize("a_bits", BITS)
@pytest.mark.parametrize("mode", MODES)
def test_simulation_equals_integer_path(w_bits, a_bits, mode):
    lin = _layer()
    x = torch.randn(3, 5, 37)
    q = QuantLinear.from_float(lin, w_bits, a_bits, act_quant=mode, act_samples=torch.randn(200, 37))
    y_int = q(x)
    y_sim = q.set_simulate(True)(x)
    assert y_int.shape == (3, 5, 19)
    # Bit for bit: a float difference would flip roundings downstream and compound through a model.
    assert torch.equal(y_int, y_sim)


@pytest.mark.parametrize("mode", MODES)
def test_integer_path_matches_float64_formula(mode):
    lin = _layer(k=29, n=7)
    x = torch.randn(11, 29)
    q = QuantLinear.from_float(lin, 6, 8, act_quant=mode, act_samples=torch.randn(100, 29))
    if mode == "dynamic":
        xq, a_scale = formats.quantize_act_dynamic(x, 8)
    else:
        xq, a_scale = formats.quantize_with_inv_scale(x, q.static_inv_scale, 8), q.act_scale
    wq = formats.unpack_weight(q.qweight, 6, 29)
    want = (xq.double() @ wq.double().T) * a_scale.double().reshape(-1, 1) * q.w_scale.double() + lin.bias.double()
    torch.testing.assert_close(q(x).double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_input_dtypes_and_no_bias(dtype):
    lin = _layer(bias=False)
    q = QuantLinear.from_float(lin, 8, 8)
    x = torch.randn(4, 37)
    y = q(x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), lin(x), rtol=0.05, atol=0.05)


def test_quantization_accuracy_improves_with_bits():
    lin = _layer(k=128, n=64)
    x = torch.randn(64, 128)
    ref = lin(x)
    errs = [(QuantLinear.from_float(lin, b, b)(x) - ref).pow(2).mean().item() for b in BITS]
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 1e-3 * ref.pow(2).mean().item()


def test_dequantized_weight_unfolds_channel_factors():
    lin = _layer(k=16, n=8)
    samples = torch.randn(300, 16) * torch.logspace(-1, 1, 16)
    q = QuantLinear.from_float(lin, 8, 8, act_quant="channel", act_samples=samples)
    s = q.act_channel_factor
    assert not torch.allclose(s, torch.ones(16))
    # Folding W[:, k] * s_k before quantization makes column k's error at most half a step / s_k.
    err = (q.dequantized_weight() - lin.weight.detach()).abs()
    bound = q.w_scale[:, None] / (2 * s[None, :])
    assert (err <= bound * (1 + 1e-5) + 1e-7).all()


def test_bad_inputs():
    lin = _layer()
    with pytest.raises(ValueError, match=r"supports \[4, 6, 8\]"):
        QuantLinear.from_float(lin, 3, 8)
    with pytest.raises(ValueError, match=r"supports \[4, 6, 8\]"):
        QuantLinear.from_float(lin, 8, 16)
    with pytest.raises(ValueError, match="unknown act_quant"):
        QuantLinear.from_float(lin, 8, 8, act_quant="per-channel")
    with pytest.raises(ValueError, match="needs calibration samples"):
        QuantLinear.from_float(lin, 8, 8, act_quant="static")
    with pytest.raises(ValueError, match="NaN"):
        QuantLinear.from_float(lin, 8, 8, act_quant="static", act_samples=torch.full((4, 37), float("nan")))
    with pytest.raises(ValueError, match="empty"):
        QuantLinear.from_float(lin, 8, 8, act_quant="channel", act_samples=torch.zeros(0, 37))
    with pytest.raises(ValueError, match="last dim 37"):
        QuantLinear.from_float(lin, 8, 8, act_quant="channel", act_samples=torch.zeros(5, 36))
    q = QuantLinear.from_float(lin, 8, 8)
    with pytest.raises(ValueError, match="last dim 37"):
        q(torch.randn(2, 36))
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantLinear.from_float(nn.Conv1d(3, 3, 1), 8, 8)


def test_empty_batch_and_gradient_through_simulation():
    q = QuantLinear.from_float(_layer(), 4, 4, simulate=True)
    assert q(torch.randn(0, 37)).shape == (0, 19)
    x = torch.randn(3, 37, requires_grad=True)
    q(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_backend_is_reported():
    q = QuantLinear.from_float(_layer(), 8, 8, backend="reference")
    assert q.backend == "reference"
    assert "backend=reference" in repr(q)


def test_fused_layernorm_kernel_and_simulation_agree_on_every_row():
    """The fused LayerNorm+quantize path and its simulation use one LayerNorm definition
    (formats.layer_norm_fp32): identical outputs on 20,000 rows, including |x| ~ 1e20 where fp32
    statistics overflow."""
    import copy

    from mixq.config import LinearConfig, QuantConfig
    from mixq.quantize import quantize_

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.LayerNorm(48), torch.nn.Linear(48, 16)).eval()
    with torch.no_grad():
        model[0].weight.uniform_(0.5, 1.5)
        model[0].bias.normal_(0, 0.1)
    quantize_(model, QuantConfig(LinearConfig(act_quant="channel", fold_layernorm=True, weight_method="rtn")),
              torch.randn(256, 48), progress=False)
    assert model[1].folded_norm
    sim = copy.deepcopy(model)
    sim[1].set_simulate(True)
    x = torch.randn(20000, 48) * 3 + torch.randn(20000, 1) * 5
    x[:50] *= 1e20
    with torch.no_grad():
        kernel, simulated = model(x), sim(x)
    assert torch.isfinite(kernel).all()
    assert torch.equal(kernel, simulated)
    for backend in ("reference", "cpu"):
        from mixq.backends import get_backend

        try:
            b = get_backend(backend)
        except (KeyError, ValueError):
            continue
        if not b.available(torch.device("cpu")):
            continue
        q = b.layernorm_quantize(x, model[1].norm_weight, model[1].norm_bias, model[1].norm_eps,
                                 model[1].static_inv_scale, 8)
        assert torch.equal(q, get_backend("reference").layernorm_quantize(
            x, model[1].norm_weight, model[1].norm_bias, model[1].norm_eps, model[1].static_inv_scale, 8)), backend


def _cpu_kernel_paths() -> list[str]:
    try:
        import mixq._C as C
    except ImportError:
        return []
    return (["vnni"] if C.has_vnni() else []) + (["avx2"] if C.has_avx2() else []) + ["scalar"]


@pytest.mark.parametrize("path", _cpu_kernel_paths())
@pytest.mark.parametrize("w_bits,a_bits", [(4, 8), (6, 8), (8, 8), (4, 4), (6, 6)])
@pytest.mark.parametrize("mode", ["dynamic", "smooth", "smooth-prescaled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cpu_dynamic_layers_run_one_fused_op_at_every_m_bit_identical_to_the_reference(
    monkeypatch, path, w_bits, a_bits, mode, dtype
):
    """cpu dynamic/smooth QuantLinears run the whole layer in one C++ call at every M (above triton's
    fused bound too): smooth multiply, quantize, GEMM and overflow headroom, the reference backend's
    composed numbers bit for bit, huge and NaN rows included."""
    import secrets

    import mixq._C as C
    from mixq.backends import get_backend

    seed = secrets.randbits(31)
    gen = torch.Generator().manual_seed(seed)
    k, n = 45, 21
    lin = nn.Linear(k, n)
    act = mode.split("-")[0]
    samples = torch.randn(64, k, generator=gen) * torch.linspace(0.2, 4, k)
    layers = {b: QuantLinear.from_float(lin, w_bits, a_bits, act_quant=act, act_samples=samples, backend=b)
              for b in ("cpu", "reference")}
    if mode == "smooth-prescaled":  # the producer already divides by s_k: no multiply at run time
        for q in layers.values():
            q.prescale_producer(nn.LayerNorm(k))
    calls = []
    cpu = get_backend("cpu")
    real = cpu.quantize_dynamic
    monkeypatch.setattr(cpu, "quantize_dynamic", lambda *a: calls.append(a) or real(*a))
    C.set_kernel_path(path)
    try:
        for m in (1, 71, 200):
            x = torch.randn(2, m, k, generator=gen) * torch.logspace(-2, 2, k)
            x[0, 0] *= 1e37 if dtype != torch.float16 else 100.0  # fp32: headroom f < 1
            x[1, -1, 3] = float("nan")
            x = x.to(dtype)
            with torch.no_grad():
                got, want = layers["cpu"](x), layers["reference"](x)
            assert got.dtype == dtype and got.shape == (2, m, n)
            assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(0), want.nan_to_num(0)), (
                f"m={m} seed={seed}")
    finally:
        C.set_kernel_path("auto")
    assert not calls  # no separate quantize call on the cpu backend, at any M
