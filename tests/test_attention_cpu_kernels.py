"""The C++ attention kernels (csrc/attention.cpp) against the reference backend, bit for bit: QK^T and
softmax.V on codes, every probability width and grid, odd and empty shapes, saturated codes at the
largest allowed key count, every kernel family this CPU has, non-contiguous inputs, clear errors,
the custom ops, and whole QuantAttention modules in a small timm ViT. Skipped when mixq._C is not built."""

from __future__ import annotations

import pytest
import torch

from mixq import formats, ops
from mixq.attention import QuantAttention

_C = pytest.importorskip("mixq._C", reason="mixq._C (the C++ CPU kernels) is not built; run setup.py build_ext")

from mixq.backends import reference  # noqa: E402
from mixq.backends.cpu import CpuBackend  # noqa: E402

BITS = [4, 6, 8]
KINDS = list(formats.P_GRIDS)
OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CPU = CpuBackend()
MAX_KEYS = _C.attention_max_keys

# (leading dims, N, M, D): N != M, odd and unit D, one query, several leading dims, > 1 row block
SHAPES = [
    ((2, 3), 7, 11, 64),
    ((1,), 1, 5, 1),
    ((2,), 17, 9, 33),
    ((), 13, 13, 16),
    ((2, 2, 2), 5, 3, 7),
    ((3,), 70, 45, 18),
]
EMPTY_SHAPES = [((0,), 4, 5, 8), ((2,), 0, 5, 8), ((2,), 4, 0, 8), ((2,), 4, 5, 0), ((1, 0), 3, 3, 3)]


def _bits_of(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns: equal patterns mean equal floats, NaN payloads and signed zeros included."""
    return t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16)


def assert_bit_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    assert torch.equal(_bits_of(got), _bits_of(want)), (got - want).abs().max()


def _codes(shape, gen: torch.Generator, lo: int = -128, hi: int = 127) -> torch.Tensor:
    return torch.randint(lo, hi + 1, shape, dtype=torch.int8, generator=gen)


def _steps(shape, gen: torch.Generator) -> torch.Tensor:
    """Positive fp32 steps over several decades (so the two multiplies round differently)."""
    return torch.rand(shape, generator=gen) * torch.exp2(torch.randint(-12, 4, shape, generator=gen).float())


def _prob_codes(lead, n, m, bits, kind, gen) -> torch.Tensor:
    """Codes of softmax rows from peaked and flat logits (every code from 0 to the zero code occurs)."""
    logits = torch.randn(*lead, n, m, generator=gen) * torch.rand(*lead, n, 1, generator=gen) * 12
    return formats.quantize_probs(logits.softmax(-1), bits, kind)


def _qk_both(q, qs, k, ks, out_dtype):
    return CPU.quantized_qk(q, qs, k, ks, out_dtype), reference.attention_qk(q, qs, k, ks, out_dtype)


def _pv_both(p, v, vs, bits, kind, out_dtype):
    return CPU.quantized_pv(p, v, vs, bits, kind, out_dtype), reference.attention_pv(p, v, vs, bits, kind, out_dtype)


# ----------------------------------------------------------------------------- QK^T


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("lead,n,m,d", SHAPES + EMPTY_SHAPES)
def test_qk_bit_exact(kernel_path, lead, n, m, d, out_dtype):
    gen = torch.Generator().manual_seed(n * 1000 + m * 10 + d)
    q, k = _codes((*lead, n, d), gen), _codes((*lead, m, d), gen)
    assert_bit_equal(*_qk_both(q, _steps((*lead, n), gen), k, _steps((*lead, m), gen), out_dtype))


@pytest.mark.parametrize("bits", BITS)
def test_qk_extreme_codes(kernel_path, bits):
    """All +-qmax, all -128 (the int8 minimum: the largest products), all zero; big head dims."""
    qmax = formats.qmax(bits)
    gen = torch.Generator().manual_seed(bits)
    for d in (64, 1023):
        for qv, kv in [(qmax, qmax), (qmax, -qmax), (-128, -128), (-128, 127), (0, 5)]:
            q = torch.full((2, 5, d), qv, dtype=torch.int8)
            k = torch.full((2, 6, d), kv, dtype=torch.int8)
            k[1, ::2] = -k[1, ::2]  # mixed signs in one head
            got, want = _qk_both(q, _steps((2, 5), gen), k, _steps((2, 6), gen), torch.float32)
            assert_bit_equal(got, want)
    # |acc| = 2^14 * D at the head-dim bound: still exact in int32, 2^30
    d = _C.attention_max_head_dim
    q, k = torch.full((1, 1, d), -128, dtype=torch.int8), torch.full((1, 2, d), -128, dtype=torch.int8)
    got, want = _qk_both(q, torch.ones(1, 1), k, torch.ones(1, 2), torch.float32)
    assert_bit_equal(got, want)
    assert got[0, 0, 0].item() == 2.0**30


# ----------------------------------------------------------------------------- softmax . V


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("lead,n,m,d", SHAPES + EMPTY_SHAPES)
def test_pv_bit_exact(kernel_path, lead, n, m, d, bits, kind, out_dtype):
    gen = torch.Generator().manual_seed(n * 1000 + m * 10 + d + bits)
    p = _prob_codes(lead, n, m, bits, kind, gen)
    v, vs = _codes((*lead, m, d), gen), _steps((*lead, d), gen)
    assert_bit_equal(*_pv_both(p, v, vs, bits, kind, out_dtype))
    # any uint8 code, including the unused ones above cmax on the 6/8-bit log2 grid
    p_any = torch.randint(0, 256, p.shape, dtype=torch.uint8, generator=gen)
    assert_bit_equal(*_pv_both(p_any, v, vs, bits, kind, out_dtype))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", BITS)
def test_pv_several_chunks(kernel_path, bits, kind):
    """Key counts past the int32 chunk of the log2 planes (512 keys), every shift class in one row."""
    gen = torch.Generator().manual_seed(bits)
    for m in (511, 512, 513, 1300):
        p = _prob_codes((2,), 9, m, bits, kind, gen)
        p[:, 0, :] = torch.arange(m) % (2**bits)  # every code, the zero code included
        v, vs = _codes((2, m, 20), gen), _steps((2, 20), gen)
        assert_bit_equal(*_pv_both(p, v, vs, bits, kind, torch.float32))


def _saturating_codes(bits: int, kind: str) -> list[int]:
    """Codes with the largest integer weight of each part of the kernel's split."""
    if kind == "uniform":
        return [2**bits - 1, 1]
    cmax = formats.log2_max_code(bits)
    # shifts cmax (code 0), 30, 29 (the top of plane 1), 15, 14 (the top of plane 0), 0
    return sorted({cmax - s for s in (cmax, 30, 29, 15, 14, 0) if 0 <= s <= cmax})


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", BITS)
def test_pv_saturated_at_max_keys(kernel_path, bits, kind):
    """One code everywhere, |V| at its limits (-128, 127, +-qmax), at the largest key count allowed:
    the sums reach 128 * 2^31 * 65536 = 2^54 (log2) and 255 * 128 * 65536 (uniform) and stay exact."""
    m = MAX_KEYS
    qmax = formats.qmax(bits)
    for code in _saturating_codes(bits, kind):
        p = torch.full((1, 2, m), code, dtype=torch.uint8)
        p[0, 1, ::3] = formats.prob_zero_code(bits, kind)
        v = torch.empty(1, m, 4, dtype=torch.int8)
        v[..., 0], v[..., 1], v[..., 2], v[..., 3] = -128, 127, qmax, -qmax
        vs = torch.tensor([[1.0, 1.0, 0.37, 3.0e-3]])
        got, want = _pv_both(p, v, vs, bits, kind, torch.float32)
        assert_bit_equal(got, want)
    if kind == "log2" and formats.log2_max_code(bits) == 31:  # code 0 everywhere: -128 * 2^31 * 2^16 = -2^54
        p = torch.zeros(1, 1, m, dtype=torch.uint8)
        v = torch.full((1, m, 1), -128, dtype=torch.int8)
        got = CPU.quantized_pv(p, v, torch.ones(1, 1), bits, kind, torch.float32)
        assert got.item() == -(2.0**54) * 2.0**-31


def test_pv_int64_sum_rounds_like_reference(kernel_path):
    """Sums beyond 2^53 with low bits set: fp32 rounding from int64 must match the reference's."""
    gen = torch.Generator().manual_seed(7)
    m = MAX_KEYS
    p = torch.where(torch.rand(3, 1, m, generator=gen) < 0.9, 0, torch.randint(0, 31, (3, 1, m), generator=gen))
    v = _codes((3, m, 3), gen, 100, 127)
    v[:, ::7] = _codes((3, len(range(0, m, 7)), 3), gen)
    for bits in (6, 8):
        got, want = _pv_both(p.to(torch.uint8), v, torch.ones(3, 3), bits, "log2", torch.float32)
        assert_bit_equal(got, want)


def test_pv_all_zero_codes(kernel_path):
    gen = torch.Generator().manual_seed(3)
    v, vs = _codes((2, 3, 40, 9), gen), _steps((2, 3, 9), gen)
    for bits in BITS:
        for kind in KINDS:
            p = torch.full((2, 3, 6, 40), formats.prob_zero_code(bits, kind), dtype=torch.uint8)
            got, want = _pv_both(p, v, vs, bits, kind, torch.float32)
            assert_bit_equal(got, want)
            assert not got.any()


# ----------------------------------------------------------------------------- layouts


def test_non_contiguous_inputs(kernel_path):
    """Q, K, V as attention.py makes them (a permute of [B, N, 3, H, D]), V's codes transposed back."""
    gen = torch.Generator().manual_seed(11)
    b, n, h, d = 2, 19, 3, 24
    qkv = _codes((b, n, 3, h, d), gen).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    assert not q.is_contiguous()
    qs, ks = _steps((b, h, n), gen), _steps((b, h, n * 2), gen)[..., ::2]
    assert_bit_equal(*_qk_both(q, qs, k, ks, torch.float32))
    vs = _steps((b, h, d), gen)
    for bits in BITS:
        for kind in KINDS:
            p = _prob_codes((b, h), n * 2, n, bits, kind, gen)[..., ::2, :]
            assert not p.is_contiguous()
            assert_bit_equal(*_pv_both(p, v, vs, bits, kind, torch.bfloat16))


def test_custom_ops_run_the_cpu_kernels(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    q, k, v = _codes((2, 4, 9, 16), gen), _codes((2, 4, 12, 16), gen), _codes((2, 4, 12, 16), gen)
    qs, ks, vs = _steps((2, 4, 9), gen), _steps((2, 4, 12), gen), _steps((2, 4, 16), gen)
    p = _prob_codes((2, 4), 9, 12, 6, "log2", gen)
    s_op = torch.ops.mixq.quantized_qk(q, qs, k, ks, torch.float16, "cpu")
    o_op = torch.ops.mixq.quantized_pv(p, v, vs, 6, "log2", torch.float32, "cpu")
    assert_bit_equal(s_op, CPU.quantized_qk(q, qs, k, ks, torch.float16))
    assert_bit_equal(s_op, ops.quantized_qk(q, qs, k, ks, torch.float16, "reference"))
    assert_bit_equal(o_op, CPU.quantized_pv(p, v, vs, 6, "log2", torch.float32))
    assert_bit_equal(o_op, ops.quantized_pv(p, v, vs, 6, "log2", torch.float32, "reference"))
    # the op really dispatches to the C++ kernel, not the reference fallback
    calls = []
    monkeypatch.setattr(_C, "attention_qk", lambda *a: calls.append("qk") or torch.zeros(8, 9, 12))
    torch.ops.mixq.quantized_qk(q, qs, k, ks, torch.float32, "cpu")
    assert calls == ["qk"]


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors():
    gen = torch.Generator().manual_seed(0)
    q, k = _codes((2, 5, 8), gen), _codes((2, 6, 8), gen)
    qs, ks = torch.ones(2, 5), torch.ones(2, 6)
    f32 = torch.float32
    with pytest.raises(ValueError, match="q must be a torch.int8"):
        CPU.quantized_qk(q.float(), qs, k, ks, f32)
    with pytest.raises(ValueError, match="k must be a torch.int8"):
        CPU.quantized_qk(q, qs, k.to(torch.uint8), ks, f32)
    with pytest.raises(ValueError, match="at least 2-D"):
        CPU.quantized_qk(q[0, 0], qs, k, ks, f32)
    with pytest.raises(ValueError, match="head dim 8"):
        CPU.quantized_qk(q, qs, k[..., :4], ks, f32)
    with pytest.raises(ValueError, match="leading dims"):
        CPU.quantized_qk(q, qs, k[:1], ks, f32)
    with pytest.raises(ValueError, match=r"q_scale must be a float tensor of shape \(2, 5\)"):
        CPU.quantized_qk(q, qs[:, :4], k, ks, f32)
    with pytest.raises(ValueError, match="k_scale must be a float"):
        CPU.quantized_qk(q, qs, k, ks.to(torch.int32), f32)
    with pytest.raises(ValueError, match="out_dtype must be"):
        CPU.quantized_qk(q, qs, k, ks, torch.int32)
    with pytest.raises(ValueError, match="must be on the CPU"):
        CPU.quantized_qk(q.to("meta"), qs, k, ks, f32)
    with pytest.raises(ValueError, match="head dim .* above"):
        big = _C.attention_max_head_dim + 1
        CPU.quantized_qk(torch.zeros(1, 1, big, dtype=torch.int8), torch.ones(1, 1),
                         torch.zeros(1, 1, big, dtype=torch.int8), torch.ones(1, 1), f32)

    p, v, vs = torch.zeros(2, 5, 6, dtype=torch.uint8), _codes((2, 6, 8), gen), torch.ones(2, 8)
    with pytest.raises(ValueError, match="p \\(probability codes\\) must be a torch.uint8"):
        CPU.quantized_pv(p.to(torch.int8), v, vs, 8, "log2", f32)
    with pytest.raises(ValueError, match="v must be a torch.int8"):
        CPU.quantized_pv(p, v.to(torch.int16), vs, 8, "log2", f32)
    with pytest.raises(ValueError, match="M = 6 keys"):
        CPU.quantized_pv(p, v[:, :5], vs, 8, "log2", f32)
    with pytest.raises(ValueError, match=r"v_scale must be a float tensor of shape \(2, 8\)"):
        CPU.quantized_pv(p, v, vs[:, :1], 8, "log2", f32)
    with pytest.raises(ValueError, match="unsupported p_bits=5"):
        CPU.quantized_pv(p, v, vs, 5, "log2", f32)
    with pytest.raises(ValueError, match="unknown probability grid p_grid='log10'"):
        CPU.quantized_pv(p, v, vs, 8, "log10", f32)
    with pytest.raises(ValueError, match="out_dtype must be"):
        CPU.quantized_pv(p, v, vs, 8, "uniform", torch.float64)
    with pytest.raises(ValueError, match="must be on the CPU"):
        CPU.quantized_pv(p, v, vs.to("meta"), 8, "uniform", f32)
    with pytest.raises(ValueError, match=f"{MAX_KEYS + 1} keys above {MAX_KEYS}"):
        CPU.quantized_pv(torch.zeros(1, 1, MAX_KEYS + 1, dtype=torch.uint8),
                         torch.zeros(1, MAX_KEYS + 1, 1, dtype=torch.int8), torch.ones(1, 1), 8, "log2", f32)


# ----------------------------------------------------------------------------- the module


@pytest.mark.parametrize("qk_bits,p_bits,p_grid", [(8, 8, "log2"), (4, 6, "log2"), (6, 4, "uniform"),
                                                          (8, 8, "uniform")])
def test_quant_attention_in_vit_cpu_equals_reference_and_simulation(qk_bits, p_bits, p_grid):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2,
                              num_classes=10).eval()
    with torch.no_grad():  # peaked attention, as in trained models (random weights give near-uniform rows)
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(3)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))

    def run(**kw):
        import copy

        m = copy.deepcopy(model)
        for blk in m.blocks:
            blk.attn = QuantAttention(blk.attn, qk_bits, p_bits=p_bits, p_grid=p_grid, **kw)
        with torch.no_grad():
            return m(x)

    cpu = run(backend="cpu")
    assert_bit_equal(cpu, run(backend="reference"))
    assert_bit_equal(cpu, run(simulate=True))
    with torch.no_grad():
        assert not torch.equal(cpu, model(x))
