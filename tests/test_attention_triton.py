"""The triton backend's attention matmuls against the reference backend, bit for bit.

Without a GPU the kernels run under the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1); with one, on CUDA tensors. Shapes are small and odd (N != M, head dims that are
not powers of two, N = 1, several leading dims); inputs are fresh random draws, the seed in every
failure message.
"""

from __future__ import annotations

import secrets

import pytest
import torch

from mixq import formats, ops  # noqa: F401  (ops registers torch.ops.mixq.*)

triton = pytest.importorskip("triton")

from mixq.backends import get_backend  # noqa: E402
from mixq.backends.reference import attention_pv, attention_qk  # noqa: E402
from mixq.kernels import attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKEND = get_backend("triton")
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KINDS = ("log2", "uniform")
# (leading dims, N, M, D): N != M, D not a power of two, N = 1, no / one / two leading dims
SHAPES = [((2, 3), 17, 23, 40), ((), 1, 9, 24), ((3,), 5, 33, 64)]


def fresh_generator() -> tuple[torch.Generator, int]:
    seed = secrets.randbits(31)
    return torch.Generator().manual_seed(seed), seed


def codes(g: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)


def steps(g: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.rand(shape, generator=g) * 0.02 + 1e-4


def probability_codes(g: torch.Generator, lead, n: int, m: int, bits: int, kind: str) -> torch.Tensor:
    """quantize_probs of softmaxes from sharp to flat rows, so every code of the grid turns up."""
    temp = torch.logspace(-1, 1.5, n).reshape(n, 1)
    logits = torch.randn((*lead, n, m), generator=g) * temp
    return formats.quantize_probs(logits.softmax(-1), bits, kind)


def run_qk(q, q_scale, k, k_scale, out_dtype, **kw):
    d = lambda t: t.to(DEVICE)  # noqa: E731
    return attention.quantized_qk(d(q), d(q_scale), d(k), d(k_scale), out_dtype, **kw).cpu()


def run_pv(p, v, v_scale, bits, kind, out_dtype, **kw):
    d = lambda t: t.to(DEVICE)  # noqa: E731
    return attention.quantized_pv(d(p), d(v), d(v_scale), bits, kind, out_dtype, **kw).cpu()


# ----------------------------------------------------------------------------- Q K^T


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
def test_qk_is_bit_exact(out_dtype):
    g, seed = fresh_generator()
    for lead, n, m, d in SHAPES:
        q, k = codes(g, (*lead, n, d)), codes(g, (*lead, m, d))
        qs, ks = steps(g, (*lead, n)), steps(g, (*lead, m))
        got = run_qk(q, qs, k, ks, out_dtype)
        want = attention_qk(q, qs, k, ks, out_dtype)
        assert got.dtype == out_dtype and got.shape == want.shape
        assert torch.equal(got, want), f"seed={seed} shape={(lead, n, m, d)}"


def test_qk_at_the_extremes_and_on_strided_views():
    g, seed = fresh_generator()
    # -128 everywhere at the largest head dim: |acc| = 2**22, the int32 sum's worst case
    d = attention.MAX_HEAD_DIM
    q = torch.full((2, 3, d), -128, dtype=torch.int8)
    k = torch.cat([torch.full((2, 2, d), -128, dtype=torch.int8), torch.full((2, 3, d), 127, dtype=torch.int8)], 1)
    qs, ks = steps(g, (2, 3)), steps(g, (2, 5))
    assert torch.equal(run_qk(q, qs, k, ks, torch.float32), attention_qk(q, qs, k, ks, torch.float32)), seed
    # transposed / sliced views, as attention.py hands them over; and the 64-row tile
    q = codes(g, (2, 40, 7)).transpose(-2, -1)[:, :, :24]  # [2, 7, 24], strided along D
    k = codes(g, (2, 24, 70))[..., ::2].transpose(-2, -1)  # [2, 35, 24]
    qs, ks = steps(g, (2, 7)), steps(g, (2, 35))
    want = attention_qk(q, qs, k, ks, torch.bfloat16)
    assert torch.equal(run_qk(q, qs, k, ks, torch.bfloat16), want), f"seed={seed}"
    cfg = attention.AttentionConfig(64, 16, num_warps=4, num_stages=2)
    assert torch.equal(run_qk(q, qs, k, ks, torch.bfloat16, config=cfg), want), f"seed={seed}"


# ----------------------------------------------------------------------------- softmax . V


@pytest.mark.parametrize("bits", (4, 6, 8))
@pytest.mark.parametrize("kind", KINDS)
def test_pv_is_bit_exact(bits, kind):
    g, seed = fresh_generator()
    for i, (lead, n, m, d) in enumerate(SHAPES):
        p = probability_codes(g, lead, n, m, bits, kind)
        v, vs = codes(g, (*lead, m, d)), steps(g, (*lead, d))
        for out_dtype in OUT_DTYPES if i == 0 else (torch.float32,):
            got = run_pv(p, v, vs, bits, kind, out_dtype)
            want = attention_pv(p, v, vs, bits, kind, out_dtype)
            assert got.dtype == out_dtype and got.shape == want.shape
            assert torch.equal(got, want), f"seed={seed} shape={(lead, n, m, d)} {out_dtype}"


@pytest.mark.parametrize("bits", (4, 6, 8))
def test_pv_every_uint8_code_matches_the_reference(bits):
    # off-grid codes (above 2**bits - 1, or between cmax and the log2 zero code) too: the kernel
    # treats them as the reference does, so no uint8 input gives a different answer
    g, seed = fresh_generator()
    n, m, d = 9, 300, 24
    p = torch.randint(0, 256, (n, m), generator=g, dtype=torch.uint8)
    p[0, :256] = torch.arange(256, dtype=torch.uint8)
    v, vs = codes(g, (m, d)), steps(g, (d,))
    for kind in KINDS:
        want = attention_pv(p, v, vs, bits, kind, torch.float32)
        assert torch.equal(run_pv(p, v, vs, bits, kind, torch.float32), want), f"seed={seed} {kind}"


@pytest.mark.parametrize("kind", KINDS)
def test_pv_extreme_codes(kind):
    g, seed = fresh_generator()
    n, m, d = 3, 50, 40
    vs = steps(g, (2, d))
    for bits in (4, 8):
        zero, top = formats.prob_zero_code(bits, kind), 2**bits - 1 if kind == "uniform" else 0
        v = codes(g, (2, m, d))
        p = torch.full((2, n, m), zero, dtype=torch.uint8)  # all zero codes: nothing contributes
        got = run_pv(p, v, vs, bits, kind, torch.float32)
        assert torch.equal(got, attention_pv(p, v, vs, bits, kind, torch.float32)) and not got.any(), seed
        # every weight at its largest (log2 code 0 = 2**cmax, uniform 2**b - 1) against |v| = 127 and -128
        p = torch.full((2, n, m), top, dtype=torch.uint8)
        v = torch.where(torch.rand(2, m, d, generator=g) < 0.5, 127, -128).to(torch.int8)
        v[0] = 127
        want = attention_pv(p, v, vs, bits, kind, torch.bfloat16)
        assert torch.equal(run_pv(p, v, vs, bits, kind, torch.bfloat16), want), f"seed={seed} bits={bits}"


def test_pv_past_2_to_the_53_rounds_like_the_reference():
    # Past 2**53 the reference sums in int64 and rounds to float64, then to fp32: a double rounding.
    # Row 0, channel 0 is built to hit it: acc = 2**55 + 2**31 + 1 (just above an fp32 midpoint)
    # becomes 2**55 + 2**31 in float64, a tie that fp32 rounds to even: 2**55 (one rounding would give
    # 2**55 + 2**32). Row 1: random codes, bucket 3's weight 64 (code 4: 2**27 = 2**(21 + 6)) among them.
    g, seed = fresh_generator()
    big = 132_104  # 127 * 132104 + 9 = 2**24 + 1 tokens' worth of 2**31
    m, d = big + 2, 16
    p = torch.zeros(2, m, dtype=torch.uint8)
    p[0, -1] = 31  # weight 2**0
    p[1] = torch.tensor([0, 4, 1, 30, 31, 255], dtype=torch.uint8)[torch.randint(0, 6, (m,), generator=g)]
    v = codes(g, (m, d))
    v[:big, 0], v[big, 0], v[-1, 0] = 127, 9, 1
    order = torch.randperm(m, generator=g)
    p, v = p[:, order].contiguous(), v[order].contiguous()
    vs = steps(g, (d,))
    want = attention_pv(p, v, vs, 8, "log2", torch.float32)
    assert want[0, 0].item() == float(torch.tensor(2.0**24, dtype=torch.float32) * vs[0])  # the tie went to even
    cfg = attention.AttentionConfig(16, 1024, num_warps=4, num_stages=2)
    assert torch.equal(run_pv(p, v, vs, 8, "log2", torch.float32, config=cfg), want), f"seed={seed}"


def test_pv_reads_strided_views_and_larger_tiles():
    g, seed = fresh_generator()
    lead, n, m, d = (2, 2), 70, 45, 24
    p = probability_codes(g, lead, n, m, 6, "log2")
    v = codes(g, (*lead, d, m)).transpose(-2, -1)  # V per channel comes transposed from attention.py
    vs = steps(g, (*lead, d))
    want = attention_pv(p, v, vs, 6, "log2", torch.float16)
    for cfg in (None, attention.AttentionConfig(64, 64, num_warps=8, num_stages=3)):
        assert torch.equal(run_pv(p, v, vs, 6, "log2", torch.float16, config=cfg), want), f"seed={seed} {cfg}"


# ----------------------------------------------------------------------------- wiring and limits


def test_64_bit_offsets_give_the_same_bits(monkeypatch):
    g, seed = fresh_generator()
    monkeypatch.setattr(attention, "INT64_THRESHOLD", 0)
    # transposed views: D is the slow axis, so the D index multiplies a large stride
    q, k = codes(g, (2, 40, 5)).transpose(-2, -1), codes(g, (2, 11, 40))
    qs, ks = steps(g, (2, 5)), steps(g, (2, 11))
    assert torch.equal(run_qk(q, qs, k, ks, torch.float32), attention_qk(q, qs, k, ks, torch.float32)), seed
    p, v, vs = probability_codes(g, (2,), 5, 11, 8, "log2"), codes(g, (2, 40, 11)).transpose(-2, -1), steps(g, (2, 40))
    assert torch.equal(run_pv(p, v, vs, 8, "log2", torch.float32),
                       attention_pv(p, v, vs, 8, "log2", torch.float32)), f"seed={seed}"


def test_custom_ops_route_to_the_triton_kernels(monkeypatch):
    g, seed = fresh_generator()
    q, k, qs, ks = codes(g, (2, 7, 24)), codes(g, (2, 9, 24)), steps(g, (2, 7)), steps(g, (2, 9))
    p, v, vs = probability_codes(g, (2,), 7, 9, 8, "log2"), codes(g, (2, 9, 24)), steps(g, (2, 24))
    calls = []
    for name in ("quantized_qk", "quantized_pv"):
        real = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda *a, _r=real, _n=name, **kw: calls.append(_n) or _r(*a, **kw))
    d = lambda t: t.to(DEVICE)  # noqa: E731
    s = torch.ops.mixq.quantized_qk(d(q), d(qs), d(k), d(ks), torch.float32, "triton").cpu()
    o = torch.ops.mixq.quantized_pv(d(p), d(v), d(vs), 8, "log2", torch.bfloat16, "triton").cpu()
    assert calls == ["quantized_qk", "quantized_pv"]
    assert torch.equal(s, attention_qk(q, qs, k, ks, torch.float32)), f"seed={seed}"
    assert torch.equal(o, attention_pv(p, v, vs, 8, "log2", torch.bfloat16)), f"seed={seed}"


def test_quant_attention_on_the_triton_backend_equals_the_reference():
    timm = pytest.importorskip("timm")
    from mixq.attention import QuantAttention

    g, seed = fresh_generator()
    torch.manual_seed(seed)
    attn = timm.models.vision_transformer.Attention(dim=48, num_heads=2).to(DEVICE)  # head dim 24
    x = torch.randn(2, 13, 48, generator=g).to(DEVICE)
    for bits, kind in ((8, "log2"), (4, "uniform")):
        fast = QuantAttention(attn, qk_bits=bits, p_grid=kind, backend="triton")
        slow = QuantAttention(attn, qk_bits=bits, p_grid=kind, backend="reference")
        with torch.no_grad():
            assert torch.equal(fast(x), slow(x)), f"seed={seed} {bits} {kind}"


def test_bad_input_is_refused_with_a_clear_error():
    q, qs = torch.zeros(2, 3, 8, dtype=torch.int8), torch.ones(2, 3)
    with pytest.raises(ValueError, match="int8"):
        attention.quantized_qk(q.float(), qs, q, qs, torch.float32)
    with pytest.raises(ValueError, match="leading dims"):
        attention.quantized_qk(q, qs, q[:1], qs[:1], torch.float32)
    with pytest.raises(ValueError, match="q_scale"):
        attention.quantized_qk(q, qs[:, :2], q, qs, torch.float32)
    with pytest.raises(ValueError, match="out_dtype"):
        attention.quantized_qk(q, qs, q, qs, torch.int32)
    wide = torch.zeros(1, 2, attention.MAX_HEAD_DIM + 1, dtype=torch.int8)
    with pytest.raises(ValueError, match="head dim"):
        attention.quantized_qk(wide, torch.ones(1, 2), wide, torch.ones(1, 2), torch.float32)
    p, v, vs = torch.zeros(2, 3, 5, dtype=torch.uint8), torch.zeros(2, 5, 8, dtype=torch.int8), torch.ones(2, 8)
    with pytest.raises(ValueError, match="uint8"):
        attention.quantized_pv(p.to(torch.int8), v, vs, 8, "log2", torch.float32)
    with pytest.raises(ValueError, match="leading dims and M"):
        attention.quantized_pv(p, v[:, :4], vs, 8, "log2", torch.float32)
    with pytest.raises(ValueError, match="v_scale"):
        attention.quantized_pv(p, v, vs[:, :3], 8, "log2", torch.float32)
    with pytest.raises(ValueError, match="p_grid"):
        attention.quantized_pv(p, v, vs, 8, "log3", torch.float32)
    with pytest.raises(ValueError, match="bits"):
        attention.quantized_pv(p, v, vs, 5, "log2", torch.float32)
    m = attention.MAX_PV_TOKENS + 1
    with pytest.raises(ValueError, match="tokens"):
        attention.quantized_pv(torch.zeros(1, m, dtype=torch.uint8), torch.zeros(m, 16, dtype=torch.int8),
                               torch.ones(16), 8, "log2", torch.float32)
    with pytest.raises(ValueError, match="different devices|on"):
        BACKEND.quantized_pv(p, v, vs.to("meta"), 8, "log2", torch.float32)


def test_empty_inputs_give_empty_outputs():
    q, qs = torch.zeros(2, 0, 8, dtype=torch.int8), torch.ones(2, 0)
    k, ks = torch.zeros(2, 4, 8, dtype=torch.int8), torch.ones(2, 4)
    assert run_qk(q, qs, k, ks, torch.float32).shape == (2, 0, 4)
    p, v, vs = torch.zeros(2, 0, 4, dtype=torch.uint8), torch.zeros(2, 4, 8, dtype=torch.int8), torch.ones(2, 8)
    assert run_pv(p, v, vs, 8, "log2", torch.float32).shape == (2, 0, 8)
