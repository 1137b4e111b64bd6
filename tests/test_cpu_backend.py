"""The C++ CPU backend (mixq._C) against the reference backend: bit-exact integers, float
results within float rounding, every (w_bits, a_bits), odd shapes, extreme values, and both
the AVX2 and the portable scalar path. Skipped only when the extension is not built."""

from __future__ import annotations

import importlib
import secrets
import sys
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mixq import formats, ops

_C = pytest.importorskip("mixq._C", reason="mixq._C (the C++ CPU kernels) is not built; run setup.py build_ext")

from mixq import backends  # noqa: E402
from mixq.backends.cpu import CpuBackend  # noqa: E402

BITS = [4, 6, 8]
PAIRS = [(w, a) for w in BITS for a in BITS]
CPU = CpuBackend()


def _weights(n: int, k: int, bits: int, gen: torch.Generator) -> torch.Tensor:
    lim = formats.qmax(bits)
    return torch.randint(-lim, lim + 1, (n, k), dtype=torch.int8, generator=gen)


def _acts(m: int, k: int, bits: int, gen: torch.Generator) -> torch.Tensor:
    lim = formats.qmax(bits)
    return torch.randint(-lim, lim + 1, (m, k), dtype=torch.int8, generator=gen)


def _packed(backend, canonical, bits, k, n, scale=None, bias=None, smooth_inv=None) -> backends.PackedWeight:
    """The runtime weights on ``backend`` (a name or an instance), unit scales unless given."""
    b = backends.get_backend(backend) if isinstance(backend, str) else backend
    return b.pack(canonical, torch.ones(n) if scale is None else scale, bias, bits, k, n, smooth_inv)


def _fused(x, smooth_inv, w, w_scale, bias, w_bits, a_bits, k, n, out_dtype, a_scale_mul=None, headroom=False):
    """The C++ dynamic Linear itself (CpuBackend.linear_dynamic calls it with headroom=True): (out, steps)."""
    return _C.linear_dynamic(x, smooth_inv, w, w_scale, bias, w_bits, a_bits, k, n, out_dtype, a_scale_mul, headroom)


def _gemm_both(xq: torch.Tensor, wq: torch.Tensor, w_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = wq.shape
    canonical = formats.pack_weight(wq, w_bits)
    ref = ops.int_gemm(xq, _packed("reference", canonical, w_bits, k, n))
    got = ops.int_gemm(xq, _packed(CPU, canonical, w_bits, k, n))
    return ref, got


# ----------------------------------------------------------------------------- registration


def test_cpu_backend_is_registered_and_selected():
    assert backends.get_backend("cpu").available(torch.device("cpu"))
    assert not backends.get_backend("cpu").available(torch.device("meta"))
    assert backends.select_backend("cpu") == "cpu"


# ----------------------------------------------------------------------------- int GEMM


@pytest.mark.parametrize("w_bits,a_bits", PAIRS)
@pytest.mark.parametrize("m", [1, 7, 197])
@pytest.mark.parametrize("k,n", [(37, 13), (100, 70), (2053, 9)])  # 2053: several K panels
def test_int_gemm_bit_exact(kernel_path, w_bits, a_bits, m, k, n):
    if kernel_path == "scalar" and m * k * n > 2_000_000:
        pytest.skip("the scalar path is checked on the smaller shapes")
    gen = torch.Generator().manual_seed(1000 * w_bits + 10 * a_bits + m + k + n)
    ref, got = _gemm_both(_acts(m, k, a_bits, gen), _weights(n, k, w_bits, gen), w_bits)
    assert got.dtype == torch.int32 and got.shape == (m, n)
    assert torch.equal(got, ref)


@given(
    m=st.integers(1, 40),
    k=st.integers(1, 90),
    n=st.integers(1, 40),
    w_bits=st.sampled_from(BITS),
    a_bits=st.sampled_from(BITS + [0]),  # 0: the full int8 range, -128 included
    seed=st.integers(0, 2**31 - 1),
)
def test_int_gemm_hypothesis_shapes(m, k, n, w_bits, a_bits, seed):
    gen = torch.Generator().manual_seed(seed)
    if a_bits:
        xq = _acts(m, k, a_bits, gen)
    else:
        xq = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)
    ref, got = _gemm_both(xq, _weights(n, k, w_bits, gen), w_bits)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("w_bits", BITS)
@pytest.mark.parametrize("a_bits", BITS + [0])
def test_int_gemm_extremes_do_not_overflow(kernel_path, w_bits, a_bits):
    """Every int16 partial sum of the kernels at its largest: all weights at +-qmax times
    all activations at +-qmax (and -128 for the full int8 range), over a long K. On the VNNI
    path the offset codes reach 255 (int8 weights) and the whole K sits in one int32 register."""
    k = 4099 if kernel_path != "scalar" else 515
    lw = formats.qmax(w_bits)
    la = formats.qmax(a_bits) if a_bits else 127
    lo_a = -la if a_bits else -128
    xq = torch.tensor([[la] * k, [lo_a] * k, [la, lo_a] * (k // 2) + [la]], dtype=torch.int8)[:, :k]
    wq = torch.tensor([[lw] * k, [-lw] * k, [lw, -lw] * (k // 2) + [lw]], dtype=torch.int8)[:, :k]
    ref, got = _gemm_both(xq, wq, w_bits)
    assert torch.equal(got, ref)
    assert int(ref[1, 1]) == lw * abs(lo_a) * k  # the exact extreme itself, e.g. 127 * 128 * 4099


def test_prepack_rejects_bad_input():
    wq = torch.zeros(4, 10, dtype=torch.int8)
    canonical = formats.pack_weight(wq, 4)
    with pytest.raises(RuntimeError, match="k=11 at 4 bits"):
        CPU.prepack(canonical, 4, 11)
    with pytest.raises(ValueError, match="unsupported w_bits"):
        CPU.prepack(canonical, 5, 10)
    bad8 = torch.full((2, 3), 0x80, dtype=torch.uint8)  # -128: outside the symmetric format
    with pytest.raises(RuntimeError, match="-128"):
        CPU.prepack(bad8, 8, 3)
    xq = torch.zeros(2, 10, dtype=torch.int8)
    with pytest.raises(ValueError, match="prepacked for 'reference'"):
        CPU.int_gemm(xq, _packed("reference", canonical, 4, 10, 4))  # canonical, not prepacked
    with pytest.raises(RuntimeError, match="CpuBackend.prepack"):
        _C.int_gemm(xq, canonical, 4, 10, 4)
    with pytest.raises(RuntimeError, match="K=9"):
        CPU.int_gemm(xq[:, :9].contiguous(), _packed(CPU, canonical, 4, 10, 4))


# ----------------------------------------------------------------------------- packed linear


@pytest.mark.parametrize("w_bits,a_bits", PAIRS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_token", [True, False])
def test_linear_matches_reference(kernel_path, w_bits, a_bits, out_dtype, per_token):
    m, k, n = 9, 83, 21  # N: two full tiles of 8 and a partial one
    gen = torch.Generator().manual_seed(w_bits * 7 + a_bits)
    xq, wq = _acts(m, k, a_bits, gen), _weights(n, k, w_bits, gen)
    a_scale = torch.rand(m if per_token else 1, generator=gen) * 0.1 + 1e-3
    w_scale = torch.rand(n, generator=gen) * 0.01 + 1e-4
    bias = torch.randn(n, generator=gen)
    canonical = formats.pack_weight(wq, w_bits)
    ref = ops.linear(xq, a_scale, _packed("reference", canonical, w_bits, k, n, w_scale, bias), out_dtype)
    got = ops.linear(xq, a_scale, _packed(CPU, canonical, w_bits, k, n, w_scale, bias), out_dtype)
    assert got.dtype == out_dtype and got.shape == (m, n)
    # Same fp32 operations in the same order as the reference: identical bits.
    assert torch.equal(got, ref)
    exact = (xq.double() @ wq.double().T) * a_scale.double().reshape(-1, 1) * w_scale.double() + bias.double()
    tol = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[out_dtype]
    torch.testing.assert_close(got.double(), exact, rtol=tol, atol=tol)


@pytest.mark.parametrize("w_bits,a_bits", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("m,k,n", [(1, 64, 16), (19, 83, 21), (200, 96, 40)])
def test_linear_dynamic_fused_equals_two_ops(kernel_path, w_bits, a_bits, dtype, smooth, m, k, n):
    """The fused call gives the bits of quantize (after x * 1/s in fp32) + linear, on the
    reference backend too (NaN rows included)."""
    gen = torch.Generator().manual_seed(m + k + n + w_bits * 3 + a_bits)
    x = (torch.randn(m, k, generator=gen) * 3).to(dtype)
    if m > 1:
        x[1, 7] = float("nan")
    inv = torch.rand(k, generator=gen) + 0.5 if smooth else None
    wq = _weights(n, k, w_bits, gen)
    w_scale = torch.rand(n, generator=gen) * 0.01 + 1e-4
    bias = torch.randn(n, generator=gen)
    canonical = formats.pack_weight(wq, w_bits)
    xs = x.to(torch.float32) * inv if smooth else x
    out_dtype = torch.float32 if dtype == torch.float32 else torch.bfloat16
    xq, a_scale = ops.quantize_act_dynamic(xs, a_bits, "reference")
    ref = ops.linear(xq, a_scale, _packed("reference", canonical, w_bits, k, n, w_scale, bias), out_dtype)
    w = CPU.prepack(canonical, w_bits, k)
    got, got_scale = _fused(x, inv, w, w_scale, bias, w_bits, a_bits, k, n, out_dtype)
    assert got.dtype == out_dtype and got.shape == (m, n)
    assert torch.equal(got.isnan(), ref.isnan())
    assert torch.equal(got.nan_to_num(0), ref.nan_to_num(0))
    assert torch.equal(got_scale.isnan(), a_scale.isnan())
    assert torch.equal(got_scale.nan_to_num(0), a_scale.nan_to_num(0))
    if not smooth:  # an explicit epilogue factor on the steps
        f = torch.tensor([2.0**-3])
        ref_f = ops.linear(xq, a_scale * f, _packed("reference", canonical, w_bits, k, n, w_scale, bias), out_dtype)
        got_f, _ = _fused(x, None, w, w_scale, bias, w_bits, a_bits, k, n, out_dtype, f)
        assert torch.equal(got_f.nan_to_num(0), ref_f.nan_to_num(0))


@pytest.mark.parametrize("w_bits", BITS)
def test_gemm_many_chunks_and_threads(kernel_path, w_bits):
    """A shape that splits into several row chunks and tile chunks over the threads (each thread
    prepares the chunks it meets), with padding (K = 1000) and tails in M and N."""
    if kernel_path == "scalar":
        pytest.skip("the scalar path is checked on the smaller shapes")
    m, k, n = 301, 1000, 203
    gen = torch.Generator().manual_seed(w_bits)
    ref, got = _gemm_both(_acts(m, k, 8, gen), _weights(n, k, w_bits, gen), w_bits)
    assert torch.equal(got, ref)
    x = torch.randn(m, k, generator=gen)
    wq = _weights(n, k, w_bits, gen)
    canonical = formats.pack_weight(wq, w_bits)
    w_scale, bias = torch.rand(n, generator=gen) * 0.01, torch.randn(n, generator=gen)
    xq, a_scale = ops.quantize_act_dynamic(x, 8, "reference")
    ref = ops.linear(xq, a_scale, _packed("reference", canonical, w_bits, k, n, w_scale, bias), torch.float32)
    got, got_scale = _fused(x, None, CPU.prepack(canonical, w_bits, k), w_scale, bias, w_bits, 8, k, n, torch.float32)
    assert torch.equal(got, ref) and torch.equal(got_scale, a_scale)


def _fresh_gen() -> tuple[torch.Generator, int]:
    seed = secrets.randbits(31)
    return torch.Generator().manual_seed(seed), seed


def _headroom_rows(m: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Rows from ordinary to fp32's top (steps far beyond 2**64, so the headroom factor is < 1), rows
    whose outputs are tiny (they land near the subnormals once scaled by f), a NaN and an inf row."""
    x = torch.randn(m, k, generator=gen)
    mags = torch.tensor([1.0, 1e-30, 1e10, 1e25, 1e36, 3e37, 1e-3])
    x = x * mags[torch.randint(0, len(mags), (m,), generator=gen)][:, None]
    x[0, k // 2] = 1.0e38  # the largest step of the call (times 1/s < 1.5 in smooth mode: still finite)
    if m > 3:
        x[1, 0] = float("nan")
        x[2, k - 1] = float("inf")
    return x


def _reference_layer(x, inv, canonical, w_scale, bias, w_bits, a_bits, k, n, out_dtype):
    """QuantLinear's dynamic forward on the reference backend: 1/s multiply, quantize, headroom."""
    xs = x.to(torch.float32) * inv if inv is not None else x
    xq, a_scale = ops.quantize_act_dynamic(xs.contiguous(), a_bits, "reference")
    f = formats.epilogue_headroom(a_scale)
    bias_f = bias * f if bias is not None else None
    out = ops.linear(xq, a_scale * f, _packed("reference", canonical, w_bits, k, n, w_scale, bias_f), out_dtype)
    return out.div_(f), a_scale, f


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0), b.nan_to_num(0))


@pytest.mark.parametrize("w_bits,a_bits", PAIRS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("m,k,n", [(5, 40, 13), (70, 83, 21)])
def test_linear_dynamic_headroom_equals_the_python_rule(kernel_path, w_bits, a_bits, out_dtype, smooth, m, k, n):
    """headroom=True: the call picks formats.epilogue_headroom of its own steps (f < 1 here), scales
    steps and bias by it and divides the output by it in the output dtype, bit for bit as QuantLinear's
    Python rule on the reference backend; ops.linear_dynamic does the same on both backends."""
    gen, seed = _fresh_gen()
    in_dtype = torch.float32 if out_dtype == torch.float32 else out_dtype
    x = _headroom_rows(m, k, gen).to(in_dtype)
    inv = torch.rand(k, generator=gen) + 0.5 if smooth else None
    canonical = formats.pack_weight(_weights(n, k, w_bits, gen), w_bits)
    w_scale = torch.rand(n, generator=gen) * 0.01 + 1e-4
    bias = torch.randn(n, generator=gen)
    want, want_scale, f = _reference_layer(x, inv, canonical, w_scale, bias, w_bits, a_bits, k, n, out_dtype)
    assert in_dtype == torch.float16 or float(f) < 1.0  # the rerun path is what this test checks
    w = CPU.prepack(canonical, w_bits, k)
    got, got_scale = _fused(x, inv, w, w_scale, bias, w_bits, a_bits, k, n, out_dtype, headroom=True)
    assert _same_bits(got, want), f"seed={seed}"
    assert _same_bits(got_scale, want_scale), f"seed={seed}"
    for backend in ("cpu", "reference"):
        out = ops.linear_dynamic(x, _packed(backend, canonical, w_bits, k, n, w_scale, bias, inv), a_bits, out_dtype)
        assert _same_bits(out, want), f"{backend} seed={seed}"


def test_linear_dynamic_headroom_at_the_power_of_two_boundary(kernel_path):
    """Steps at and just below 2**65, where fp32 log2 rounds up: the C++ exponent (frexp) and
    formats.epilogue_headroom agree, and the factor follows the exact floor(log2(step))."""
    k, n = 24, 16
    gen, seed = _fresh_gen()
    canonical = formats.pack_weight(_weights(n, k, 8, gen), 8)
    w, w_scale, bias = CPU.prepack(canonical, 8, k), torch.rand(n, generator=gen) * 0.01, torch.randn(n, generator=gen)
    amax = torch.tensor(127 * 2.0**65)
    tried_window = False
    for _ in range(64):  # the amax values just below 127 * 2**65
        x = torch.randn(3, k, generator=gen)
        x[0, 5] = amax
        want, a_scale, f = _reference_layer(x, None, canonical, w_scale, bias, 8, 8, k, n, torch.float32)
        step = a_scale[0]
        assert float(f) == (0.5 if float(step) >= 2.0**65 else 1.0)
        tried_window |= float(step) < 2.0**65 and float(torch.floor(torch.log2(step))) == 65.0
        got, _ = _fused(x, None, w, w_scale, bias, 8, 8, k, n, torch.float32, headroom=True)
        assert torch.equal(got, want), f"amax={float(amax)!r} seed={seed}"
        amax = torch.nextafter(amax, torch.tensor(0.0))
    assert tried_window  # some step below 2**65 whose fp32 log2 reads 65.0


def test_linear_dynamic_headroom_over_many_chunks_and_threads(kernel_path):
    """The rerun with f < 1 over several row and tile chunks (each thread quantizes the chunks it
    meets), padding in K and tails in M and N; with ordinary inputs f = 1 and nothing reruns."""
    m, k, n = 301, 1000, 203 if kernel_path != "scalar" else 45
    gen, seed = _fresh_gen()
    canonical = formats.pack_weight(_weights(n, k, 4, gen), 4)
    w, w_scale, bias = CPU.prepack(canonical, 4, k), torch.rand(n, generator=gen) * 0.01, torch.randn(n, generator=gen)
    for x in (_headroom_rows(m, k, gen), torch.randn(m, k, generator=gen)):
        want, want_scale, _ = _reference_layer(x, None, canonical, w_scale, bias, 4, 8, k, n, torch.float32)
        got, got_scale = _fused(x, None, w, w_scale, bias, 4, 8, k, n, torch.float32, headroom=True)
        assert _same_bits(got, want) and _same_bits(got_scale, want_scale), f"seed={seed}"
    plain, _ = _fused(x, None, w, w_scale, bias, 4, 8, k, n, torch.float32)
    assert torch.equal(plain, got)  # f = 1: the headroom changes nothing
    with pytest.raises(RuntimeError, match="a_scale_mul or headroom"):
        _fused(x, None, w, w_scale, bias, 4, 8, k, n, torch.float32, torch.tensor(0.5), True)


def test_linear_without_bias_and_empty_batch():
    k, n = 40, 16
    wq = torch.ones(n, k, dtype=torch.int8)
    w = _packed(CPU, formats.pack_weight(wq, 8), 8, k, n, torch.full((n,), 0.25))
    xq = torch.full((3, k), 2, dtype=torch.int8)
    out = CPU.linear(xq, torch.tensor([0.5]), w, torch.float32)
    assert torch.equal(out, torch.full((3, n), 2 * k * 0.5 * 0.25))
    empty = CPU.linear(xq[:0], torch.tensor([0.5]), w, torch.float32)
    assert empty.shape == (0, n)
    with pytest.raises(RuntimeError, match="a_scale must have M=3"):
        CPU.linear(xq, torch.ones(2), w, torch.float32)
    with pytest.raises(ValueError, match="out_dtype"):
        CPU.linear(xq, torch.ones(3), w, torch.int32)


# ----------------------------------------------------------------------------- activation quantize


def _boundary_rows(k: int, gen: torch.Generator) -> torch.Tensor:
    """Rows with huge values, zeros, exact .5 ties after scaling, and random values."""
    x = torch.randn(6, k, generator=gen) * 3
    x[1] = 0.0  # amax = 0 -> scale from SCALE_EPS
    x[2, : k // 2] = 3e4  # clamped by static scales (and finite in fp16)
    x[3] = torch.arange(k, dtype=torch.float32) * 0.5 - k / 4  # ties at x * inv = .5 for static inv 1
    x[4] = -x[4].abs() * 1e-6  # tiny
    return x


@pytest.mark.parametrize("a_bits", BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [1, 31, 77, 200])
def test_quantize_dynamic_bit_exact(kernel_path, a_bits, dtype, k):
    x = _boundary_rows(k, torch.Generator().manual_seed(k + a_bits)).to(dtype)
    q_ref, s_ref = ops.quantize_act_dynamic(x, a_bits, "reference")
    q, s = ops.quantize_act_dynamic(x, a_bits, "cpu")
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(s, s_ref)
    assert torch.equal(q, q_ref)


@pytest.mark.parametrize("a_bits", BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channelwise", [True, False])
def test_quantize_static_bit_exact(kernel_path, a_bits, dtype, channelwise):
    k = 75
    gen = torch.Generator().manual_seed(a_bits)
    x = _boundary_rows(k, gen).to(dtype)
    inv = torch.rand(k, generator=gen) * 4 + 0.25 if channelwise else torch.tensor([1.0])
    if channelwise:
        inv[::5] = 1.0  # keep some exact ties
    q_ref = ops.quantize_act_static(x, inv, a_bits, "reference")
    q = ops.quantize_act_static(x, inv, a_bits, "cpu")
    assert torch.equal(q, q_ref)
    assert int(q.abs().max()) <= formats.qmax(a_bits)


@given(m=st.integers(1, 20), k=st.integers(1, 150), a_bits=st.sampled_from(BITS), seed=st.integers(0, 2**31 - 1))
def test_quantize_dynamic_hypothesis(m, k, a_bits, seed):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * 10
    q_ref, s_ref = formats.quantize_act_dynamic(x, a_bits)
    q, s = CPU.quantize_dynamic(x, a_bits)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="float32/bfloat16/float16"):
        CPU.quantize_dynamic(torch.zeros(2, 3, dtype=torch.float64), 8)
    with pytest.raises(ValueError, match="unsupported a_bits"):
        CPU.quantize_dynamic(torch.zeros(2, 3), 3)
    with pytest.raises(RuntimeError, match="K=3 or 1"):
        CPU.quantize_static(torch.zeros(2, 3), torch.ones(2), 8)


@pytest.mark.parametrize("a_bits", BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layernorm_quantize_matches_float64(a_bits, dtype):
    m, k = 13, 96
    gen = torch.Generator().manual_seed(a_bits)
    x = (torch.randn(m, k, generator=gen) * 2 + 0.5).to(dtype)
    weight, bias = torch.rand(k, generator=gen) + 0.5, torch.randn(k, generator=gen) * 0.1
    inv = torch.rand(k, generator=gen) * 10 + 1
    q = ops.layernorm_quantize(x, weight, bias, 1e-6, inv, a_bits, "cpu")
    xd = x.double()
    y = (xd - xd.mean(-1, keepdim=True)) / torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + 1e-6)
    t = (y * weight.double() + bias.double()) * inv.double()
    lim = formats.qmax(a_bits)
    expect = torch.round(t.clamp(-lim, lim))
    diff = (q.double() - expect).abs()
    assert diff.max() <= 1
    # A 1-LSB difference only where the exact value sits within float error of a rounding boundary.
    near_tie = ((t - t.floor() - 0.5).abs() < 1e-4 * t.abs().clamp_min(1)) & (t.abs() < lim)
    assert bool((near_tie | (diff == 0)).all())


# ----------------------------------------------------------------------------- non-finite input


def _nonfinite_rows(k: int, gen: torch.Generator) -> torch.Tensor:
    """Rows with a NaN, +inf, -inf, both infinities, and a finite control row; the bad values
    sit both in the vector body and in the scalar tail (k is not a multiple of 32)."""
    x = torch.randn(7, k, generator=gen) * 3
    nan, inf = float("nan"), float("inf")
    x[0, 5] = nan
    x[1, k - 1] = nan
    x[2, 9] = inf
    x[3, 40] = -inf
    x[4, 3], x[4, k - 2] = inf, -inf
    x[5, :] = nan
    return x


@pytest.mark.parametrize("a_bits", BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nonfinite_input_matches_reference(kernel_path, a_bits, dtype):
    """NaN and +-inf give the reference's codes and scales on every path (defect 4 of issue 11):
    dynamic: a NaN row gets scale NaN and codes 0, an inf row scale inf and codes 0;
    static: NaN -> 0, +-inf -> +-qmax; LayerNorm: a row with any non-finite value -> codes 0."""
    k = 75
    gen = torch.Generator().manual_seed(a_bits)
    x = _nonfinite_rows(k, gen).to(dtype)
    q_ref, s_ref = ops.quantize_act_dynamic(x, a_bits, "reference")
    q, s = ops.quantize_act_dynamic(x, a_bits, "cpu")
    assert torch.equal(q, q_ref)
    assert torch.equal(s.isnan(), s_ref.isnan()) and torch.equal(s.nan_to_num(0), s_ref.nan_to_num(0))
    for inv in (torch.tensor([0.7]), torch.rand(k, generator=gen) + 0.5):
        assert torch.equal(ops.quantize_act_static(x, inv, a_bits, "cpu"),
                           ops.quantize_act_static(x, inv, a_bits, "reference"))
        w, b = torch.rand(k, generator=gen) + 0.5, torch.randn(k, generator=gen)
        q_ln = ops.layernorm_quantize(x, w, b, 1e-5, inv, a_bits, "cpu")
        assert torch.equal(q_ln[:6], torch.zeros_like(q_ln[:6]))
        assert torch.equal(q_ln[:6], ops.layernorm_quantize(x, w, b, 1e-5, inv, a_bits, "reference")[:6])


# ----------------------------------------------------------------------------- fallback


def test_missing_extension_warns_once_and_falls_back(monkeypatch):
    import mixq.backends as pkg

    monkeypatch.setattr(pkg, "_REGISTRY", dict(pkg._REGISTRY))
    monkeypatch.setattr(pkg, "cpu", sys.modules["mixq.backends.cpu"], raising=False)
    monkeypatch.delitem(sys.modules, "mixq.backends.cpu")
    import mixq

    monkeypatch.delattr(mixq, "_C", raising=False)
    monkeypatch.setitem(sys.modules, "mixq._C", None)  # `from .. import _C` now raises ImportError
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        missing = importlib.import_module("mixq.backends.cpu")
        importlib.import_module("mixq.backends.cpu")  # a second import is cached: no second warning
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "not built" in msgs[0] and "reference backend" in msgs[0]
    assert not missing.extension_available()
    assert not pkg.get_backend("cpu").available(torch.device("cpu"))
    assert pkg.select_backend("cpu") == "reference"
    with pytest.raises(RuntimeError, match="not built"):
        pkg.get_backend("cpu").quantize_dynamic(torch.zeros(1, 4), 8)
