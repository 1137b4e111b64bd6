"""Issue 15, phase 1: quantized attention matmuls (QK^T, softmax.V) — formats, ops, module, wiring."""

import copy
import math

import pytest
import torch
from torch import nn

from mixq import formats, ops
from mixq.attention import QuantAttention, quantized_attention, wrap_attention
from mixq.backends import available_backends
from mixq.config import AttentionConfig, LinearConfig, QuantConfig
from mixq.quantize import quantize_, set_simulate

timm = pytest.importorskip("timm")
_DYNAMIC = LinearConfig(act_quant="dynamic", weight_method="rtn")

BITS = (4, 6, 8)
# (batch, heads, N query tokens, M key tokens, head dim): odd sizes on purpose
SHAPES = [(1, 1, 1, 1, 1), (2, 3, 7, 5, 9), (1, 2, 13, 17, 33), (2, 1, 31, 31, 64)]


def _backends():
    return available_backends("cpu")


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize("bits", BITS)
def test_log2_codes_match_float64_rounding(bits):
    g = torch.Generator().manual_seed(bits)
    p = torch.exp2(-torch.rand(20000, generator=g, dtype=torch.float64) * 40).to(torch.float32)
    p = torch.cat([p, torch.tensor([0.0, 1.0, 1.5, float("nan"), -0.1, 2.0 ** -31, 2.0 ** -31.4, 2.0 ** -31.6])])
    c = formats.quantize_probs(p, bits, "log2").to(torch.int64)
    x = -torch.log2(p.to(torch.float64))
    want = torch.floor(x + 0.5).clamp_min(0)
    cmax = formats.log2_max_code(bits)
    zero = 2**bits - 1
    want = torch.where(torch.isnan(x) | (p <= 0) | (want > cmax), torch.full_like(want, zero), want).to(torch.int64)
    far_from_tie = ((x - torch.floor(x)) - 0.5).abs() > 1e-6
    assert torch.equal(c[far_from_tie | ~torch.isfinite(x)], want[far_from_tie | ~torch.isfinite(x)])
    assert cmax == min(2**bits - 2, 31)
    v = formats.prob_values(c, bits, "log2", torch.float64)
    assert torch.equal(v[c == zero], torch.zeros_like(v[c == zero]))
    assert torch.equal(v[c != zero], torch.exp2(-c[c != zero].to(torch.float64)))
    # the integer form is exact: w * step == value
    w, step = formats.prob_integer_weights(c, bits, "log2")
    assert torch.equal(w.to(torch.float64) * step, v)


@pytest.mark.parametrize("bits", BITS)
def test_uniform_codes_match_float64(bits):
    p = torch.rand(5000, generator=torch.Generator().manual_seed(1))
    lim = 2**bits - 1
    c = formats.quantize_probs(p, bits, "uniform").to(torch.int64)
    x = p.to(torch.float64) * lim
    ok = ((x - torch.floor(x)) - 0.5).abs() > 1e-4
    assert torch.equal(c[ok], torch.round(x)[ok].to(torch.int64))
    assert int(c.max()) <= lim and formats.prob_zero_code(bits, "uniform") == 0
    v = formats.prob_values(c, bits, "uniform", torch.float64)
    assert (v - p.to(torch.float64)).abs().max() <= 0.5 / lim + 1e-7


def test_grid_and_bit_names_are_checked():
    with pytest.raises(ValueError, match="p_grid='log'.*log2"):
        formats.quantize_probs(torch.rand(3), 8, "log")
    with pytest.raises(ValueError, match="p_bits=5"):
        AttentionConfig(p_bits=5)
    with pytest.raises(ValueError, match="qk_bits=3"):
        AttentionConfig(qk_bits=3)
    with pytest.raises(ValueError, match="v_bits=7"):
        AttentionConfig(v_bits=7)
    with pytest.raises(ValueError, match="unknown probability grid p_grid='log_sqrt2'"):
        AttentionConfig(p_grid="log_sqrt2")


# ----------------------------------------------------------------------------- ops, fuzzed


def _qkv(shape, bits, seed):
    b, h, n, m, d = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g) * torch.rand(b, h, n, 1, generator=g) * 4
    k = torch.randn(b, h, m, d, generator=g) * torch.rand(b, h, m, 1, generator=g) * 4
    v = torch.randn(b, h, m, d, generator=g) * torch.rand(b, h, 1, d, generator=g) * 4
    qc, qs = formats.quantize_act_dynamic(q, bits)
    kc, ks = formats.quantize_act_dynamic(k, bits)
    vc, vs = formats.quantize_act_dynamic(v.transpose(-2, -1), bits)
    return qc, qs, kc, ks, vc.transpose(-2, -1).contiguous(), vs, g


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantized_qk_fuzz(shape, bits, backend):
    qc, qs, kc, ks, *_ = _qkv(shape, bits, seed=bits * 7 + shape[3])
    out = ops.quantized_qk(qc, qs, kc, ks, torch.float32, backend)
    assert out.shape == (*qc.shape[:-1], kc.shape[-2]) and out.dtype == torch.float32
    acc = qc.to(torch.int64) @ kc.to(torch.int64).transpose(-2, -1)  # exact integers
    # bit for bit: the contract's epilogue on the exact accumulator
    want = (acc.to(torch.float32) * qs[..., :, None]) * ks[..., None, :]
    assert torch.equal(out, want)
    ref64 = acc.to(torch.float64) * qs.double()[..., :, None] * ks.double()[..., None, :]
    assert torch.allclose(out.double(), ref64, rtol=4 * 2.0**-24, atol=0)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("kind", formats.P_GRIDS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantized_pv_fuzz(shape, bits, kind, backend):
    *_, vc, vs, g = _qkv(shape, bits, seed=bits * 11 + shape[2])
    b, h, n, m, d = shape
    temp = torch.tensor([0.1, 1.0, 10.0])[torch.randint(0, 3, (b, h, n, 1), generator=g)]
    p = (torch.randn(b, h, n, m, generator=g) * temp).softmax(-1)
    pc = formats.quantize_probs(p, bits, kind)
    out = ops.quantized_pv(pc, vc, vs, bits, kind, torch.float32, backend)
    assert out.shape == (b, h, n, d) and out.dtype == torch.float32
    w, step = formats.prob_integer_weights(pc, bits, kind)
    if kind == "log2":  # the shift form, written out: V's integers shifted left by cmax - c
        cmax = formats.log2_max_code(bits)
        c = pc.to(torch.int64)[..., :, :, None]
        shifted = vc.to(torch.int64)[..., None, :, :] << (cmax - c.clamp(max=cmax))
        acc = torch.where(c == 2**bits - 1, torch.zeros_like(shifted), shifted).sum(-2)
    else:
        acc = w @ vc.to(torch.int64)
    assert torch.equal(out, (acc.to(torch.float32) * step) * vs[..., None, :])
    if kind == "log2":  # 2^-c is exact in float64
        ref64 = formats.prob_values(pc, bits, kind, torch.float64) @ vc.double() * vs.double()[..., None, :]
    else:  # c / L is not: divide after the (exact) sum, or cancellation leaves 1e-17 where the truth is 0
        ref64 = (pc.double() @ vc.double()) / (2**bits - 1) * vs.double()[..., None, :]
    assert torch.allclose(out.double(), ref64, rtol=(3 if kind == "log2" else 5) * 2.0**-24, atol=1e-30)


def test_ops_trace_with_fake_tensors():
    qc, qs, kc, ks, vc, vs, _ = _qkv((2, 3, 7, 5, 9), 8, 0)
    pc = torch.zeros(2, 3, 7, 5, dtype=torch.uint8)
    for name, args in (("quantized_qk", (qc, qs, kc, ks, torch.float16, "reference")),
                       ("quantized_pv", (pc, vc, vs, 8, "log2", torch.float16, "reference"))):
        torch.library.opcheck(getattr(torch.ops.mixq, name).default, args)


# ----------------------------------------------------------------------------- module


def _float64_attention(attn: nn.Module, x: torch.Tensor, bits: int, sbits: int, kind: str) -> torch.Tensor:
    """Independent float64 fake-quant attention: the quantizers of formats, everything else in float64."""
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    qc, qs = formats.quantize_act_dynamic(q, bits)
    kc, ks = formats.quantize_act_dynamic(k, bits)
    vc, vs = formats.quantize_act_dynamic(v.transpose(-2, -1), bits)
    qf, kf = qc.double() * qs.double()[..., None], kc.double() * ks.double()[..., None]
    vf = (vc.double() * vs.double()[..., None]).transpose(-2, -1)
    s = ((qf @ kf.transpose(-2, -1)).float() * attn.scale).softmax(-1)
    pf = formats.prob_values(formats.quantize_probs(s, sbits, kind), sbits, kind, torch.float64)
    o = (pf @ vf).transpose(1, 2).reshape(b, n, -1)
    return attn.proj(o.float())


@pytest.mark.parametrize("kind", formats.P_GRIDS)
@pytest.mark.parametrize("bits", BITS)
def test_module_matches_float64_fake_quant_and_simulation(bits, kind):
    from timm.models.vision_transformer import Attention

    torch.manual_seed(bits)
    attn = Attention(dim=48, num_heads=3, qkv_bias=True).eval()
    with torch.no_grad():
        attn.qkv.weight.mul_(4)  # peaked attention, as in trained models
    x = torch.randn(2, 11, 48)
    with torch.no_grad():
        ref = _float64_attention(attn, x, bits, bits, kind)
        qa = QuantAttention(attn, bits, p_grid=kind)
        out = qa(x)
        sim = qa.set_simulate(True)(x)
    assert torch.equal(out, sim)
    # float rounding only (an ulp-moved score can flip a probability code: allow a rare such element)
    err = (out - ref).abs()
    assert (err > 1e-4 * ref.abs().max()).float().mean() < 0.02
    assert not torch.equal(out, attn(x))


def test_simulation_gives_gradients():
    from timm.models.vision_transformer import Attention

    torch.manual_seed(0)
    qa = QuantAttention(Attention(dim=32, num_heads=2), 8, simulate=True)
    x = torch.randn(1, 9, 32, requires_grad=True)
    qa(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert qa.qkv.weight.grad.abs().sum() > 0


def _deit(**kw):
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, **kw).eval()


def test_deit_tiny_end_to_end(tmp_path):
    import mixq

    model = _deit()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp = model(x)

    def run(attention=None):
        m = quantize_(copy.deepcopy(model), QuantConfig(LinearConfig(act_quant="dynamic", weight_method="rtn"),
                                                        attention), progress=False)
        with torch.no_grad():
            return m, m(x)

    lin, out_lin = run()
    assert quantized_attention(lin) == {}  # default off: every existing result unchanged
    rel = {}
    for bits in (8, 4):
        m, out = run(AttentionConfig(qk_bits=bits))
        assert len(quantized_attention(m)) == 12
        assert all((a.p_grid, a.qk_bits, a.v_bits, a.p_bits) == ("log2", bits, bits, bits)
                   for a in quantized_attention(m).values())
        rel[bits] = float((out - fp).norm() / fp.norm())
        assert not torch.equal(out, out_lin)  # the attention matmuls really are quantized
        path = mixq.save(m, tmp_path / f"deit{bits}.safetensors")  # the checkpoint records the attention
        loaded = mixq.load(path, _deit())
        assert {n: a.layer_config() for n, a in quantized_attention(loaded).items()} == {
            n: a.layer_config() for n, a in quantized_attention(m).items()}
        sim = set_simulate(m, True)
        with torch.no_grad():
            assert torch.equal(sim(x), out)
            assert torch.equal(loaded(x), out)
    rel_lin = float((out_lin - fp).norm() / fp.norm())
    # random weights give near-uniform attention (p ~ 1/197, between two log2 levels): the probability
    # grid costs ~8% here; trained models have peaked attention
    assert rel_lin < rel[8] < 0.15 and rel[8] < rel[4] < 0.3, (rel_lin, rel)


def test_compile_fullgraph_traces_quantized_attention():
    model = _deit(depth=2)
    quantize_(model, QuantConfig(_DYNAMIC, AttentionConfig(qk_bits=6)), progress=False)
    x = torch.randn(1, 3, 224, 224)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, backend=record)(x)
    assert len(graphs) == 1
    assert graphs[0].count("mixq.quantized_qk") == 2 and graphs[0].count("mixq.quantized_pv") == 2
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_skip_keeps_attention_float():
    model = _deit(depth=2)
    quantize_(model, QuantConfig(_DYNAMIC, AttentionConfig(skip=("blocks.1.attn",))), progress=False)
    assert list(quantized_attention(model)) == ["blocks.0.attn"]


# ----------------------------------------------------------------------------- refusals


class _MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.mha(x, x, x)[0])


@pytest.mark.parametrize("cls, name, kind", [(_MHA, "mha", "MultiheadAttention")])
def test_unsupported_attention_is_refused_by_name(cls, name, kind):
    model = cls()
    with pytest.raises(NotImplementedError, match=rf"'{name}' is .*{kind}.*supported: timm"):
        quantize_(model, QuantConfig(LinearConfig(act_quant="dynamic"), AttentionConfig()), progress=False)
    assert isinstance(model.head, nn.Linear)  # refused before anything was replaced
    with pytest.raises(NotImplementedError, match=rf"{kind}; supported: .*WindowAttention"):
        wrap_attention(model.get_submodule(name), 8)
    # a filter_fn that selects none of the module's Linears leaves it float, unrefused
    kept = quantize_(cls(), QuantConfig(LinearConfig(act_quant="dynamic"), AttentionConfig()),
                     filter_fn=lambda n, m: n == "head", progress=False)
    assert type(kept.get_submodule(name)).__name__ == kind
    # skip keeps it float on purpose; without an attention part nothing is checked
    kept = quantize_(cls(), QuantConfig(LinearConfig(act_quant="dynamic"), AttentionConfig(skip=(name,))),
                     progress=False)
    assert type(kept.get_submodule(name)).__name__ == kind
    quantize_(cls(), QuantConfig(LinearConfig(act_quant="dynamic")), progress=False)


def test_no_attention_to_quantize_is_an_error():  # the flag would silently do nothing
    with pytest.raises(ValueError, match="no attention module"):
        quantize_(nn.Sequential(nn.Linear(4, 4)), QuantConfig(LinearConfig(act_quant="dynamic"), AttentionConfig()),
                  progress=False)


def test_log2_grid_constants():
    assert [formats.log2_max_code(b) for b in BITS] == [14, 31, 31]
    assert [formats.prob_zero_code(b) for b in BITS] == [15, 63, 255]
    assert formats._SQRT_HALF_F32 == float(torch.tensor(math.sqrt(0.5), dtype=torch.float32))


def test_dinov2_architecture_with_smooth_linears_and_folding():
    from mixq.models.dinov2 import Dinov2Backbone, Dinov2Saliency, SaliencyDecoder

    torch.manual_seed(0)
    model = Dinov2Saliency(Dinov2Backbone(embed_dim=32, depth=2, num_heads=2, pos_grid=4),
                           SaliencyDecoder(32, (8,))).eval()
    calib, x = torch.randn(4, 3, 56, 56), torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        fp = model(x)
    quantize_(model, QuantConfig(LinearConfig(fold_layernorm=True), AttentionConfig()), calib, progress=False)
    assert sorted(quantized_attention(model)) == ["backbone.vit.blocks.0.attn", "backbone.vit.blocks.1.attn"]
    with torch.no_grad():
        out = model(x)
        assert torch.equal(set_simulate(model, True)(x), out)
    assert float((out - fp).norm() / fp.norm()) < 0.2


def test_masks_mean_what_timm_means():
    from timm.models.vision_transformer import Attention

    torch.manual_seed(3)
    qa = QuantAttention(Attention(dim=32, num_heads=2), 8).eval()
    x = torch.randn(2, 7, 32)
    keep = torch.ones(7, 7, dtype=torch.bool).tril()
    with torch.no_grad():
        causal = qa(x, is_causal=True)
        assert torch.equal(qa(x, attn_mask=keep), causal)
        assert torch.equal(qa(x, attn_mask=torch.zeros(7, 7).masked_fill(~keep, float("-inf"))), causal)
        assert torch.equal(qa(x, attn_mask=torch.ones(7, 7, dtype=torch.bool)), qa(x))
        assert not torch.equal(causal, qa(x))


# ----------------------------------------------------------------------------- the phase-2 interface


def test_interface_names_each_operand_and_reports_per_matmul_bits():
    from timm.models.vision_transformer import Attention

    attn = Attention(dim=32, num_heads=2)
    qa = QuantAttention(attn, 6, p_grid="uniform", backend="reference")
    assert (qa.qk_bits, qa.v_bits, qa.p_bits, qa.p_grid) == (6, 6, 6, "uniform")
    assert qa.layer_config() == {"ops": ["qk", "pv"], "qk_bits": 6, "v_bits": 6, "p_bits": 6, "p_grid": "uniform"}
    qa = QuantAttention(attn, 8, v_bits=4)  # p_bits follows v_bits
    assert (qa.qk_bits, qa.v_bits, qa.p_bits) == (8, 4, 4)
    qa = wrap_attention(attn, 4, p_bits=8, v_bits=6, float_ops=["qk"])
    assert type(qa) is QuantAttention
    assert qa.layer_config() == {"ops": ["pv"], "qk_bits": 4, "v_bits": 6, "p_bits": 8, "p_grid": "log2"}


@pytest.mark.parametrize("old, new", [("attn_bits", "qk_bits"), ("pv_bits", "v_bits"), ("softmax_bits", "p_bits"),
                                      ("softmax_quant", "p_grid")])
def test_the_old_keywords_fail_naming_the_new_ones(old, new):
    from timm.models.vision_transformer import Attention

    value = "log2" if old == "softmax_quant" else 8
    for make in (QuantAttention, wrap_attention):
        with pytest.raises(TypeError, match=f"{old}= is now {new}="):
            make(Attention(dim=16, num_heads=2), **{old: value})
    with pytest.raises(TypeError, match="positional"):  # the old positional (bits, softmax_bits, ...) form
        QuantAttention(Attention(dim=16, num_heads=2), 6, None, "uniform")


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(v_bits=5), ValueError, "v_bits=5"),
    (dict(p_bits=2), ValueError, "p_bits=2"),
    (dict(p_grid="log10"), ValueError, "unknown probability grid p_grid='log10'"),
    (dict(float_ops="qk"), TypeError, "float_ops must be a tuple"),
    (dict(float_ops=("qk", "softmax")), ValueError, r"unknown op\(s\) \['softmax'\]"),
    (dict(float_ops=("pv", "qk")), ValueError, "nothing is left to quantize"),
    (dict(simulate=1), TypeError, "simulate must be True or False"),
    (dict(backend="cuda_magic"), ValueError, "unknown mixq backend 'cuda_magic'"),
])
def test_interface_validates_its_arguments(kwargs, err, match):
    from timm.models.vision_transformer import Attention

    with pytest.raises(err, match=match):
        QuantAttention(Attention(dim=16, num_heads=2), 8, **kwargs)
    with pytest.raises(ValueError, match="qk_bits=7"):
        wrap_attention(Attention(dim=16, num_heads=2), 7)
    with pytest.raises(NotImplementedError, match="wrap_attention picks"):
        QuantAttention(nn.MultiheadAttention(16, 2))


@pytest.mark.parametrize("float_op", ["qk", "pv"])
def test_float_ops_keep_one_matmul_float(float_op):
    """float_ops=(op,) is exactly the quantized module with that one matmul in plain fp32 (checked
    against a float64 re-implementation), in simulate mode too."""
    from timm.models.vision_transformer import Attention

    torch.manual_seed(5)
    attn = Attention(dim=32, num_heads=2, qkv_bias=True).eval()
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        qa = QuantAttention(attn, 6, v_bits=4, float_ops=(float_op,))
        out = qa(x)
        assert torch.equal(qa.set_simulate(True)(x), out)
        full = QuantAttention(attn, 6, v_bits=4)(x)
        b, n, _ = x.shape
        q, k, v = attn.qkv(x).reshape(b, n, 3, 2, 16).permute(2, 0, 3, 1, 4).unbind(0)
        if float_op == "qk":
            s = q @ k.transpose(-2, -1)
        else:
            qc, qs = formats.quantize_act_dynamic(q, 6)
            kc, ks = formats.quantize_act_dynamic(k, 6)
            s = ((qc.double() * qs.double()[..., None]) @ (kc.double() * ks.double()[..., None]).transpose(-2, -1))
        p = (s.float() * attn.scale).softmax(-1)
        if float_op == "pv":
            o = p.double() @ v.double()
        else:
            vc, vs = formats.quantize_act_dynamic(v.transpose(-2, -1), 4)
            pf = formats.prob_values(formats.quantize_probs(p, 4, "log2"), 4, "log2", torch.float64)
            o = pf @ (vc.double() * vs.double()[..., None]).transpose(-2, -1)
        ref = attn.proj(o.transpose(1, 2).reshape(b, n, -1).float())
    err = (out - ref).abs()
    assert (err > 1e-4 * ref.abs().max()).float().mean() < 0.02
    assert not torch.equal(out, full)
