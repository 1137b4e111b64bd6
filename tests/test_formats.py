import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mixq import formats

BITS = [4, 6, 8]


@st.composite
def int_matrices(draw):
    bits = draw(st.sampled_from(BITS))
    n = draw(st.integers(1, 6))
    k = draw(st.integers(1, 41))
    lim = formats.qmax(bits)
    vals = draw(st.lists(st.integers(-lim, lim), min_size=n * k, max_size=n * k))
    return bits, torch.tensor(vals, dtype=torch.int8).reshape(n, k)


@given(int_matrices())
def test_pack_roundtrip_hypothesis(case):
    bits, q = case
    packed = formats.pack_weight(q, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (q.shape[0], formats.row_bytes(q.shape[1], bits))
    assert torch.equal(formats.unpack_weight(packed, bits, q.shape[1]), q)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 64, 67])
def test_pack_roundtrip_edges(bits, k):
    lim = formats.qmax(bits)
    rows = [torch.full((k,), v, dtype=torch.int8) for v in (lim, -lim, 0, 1, -1)]
    rows.append(torch.randint(-lim, lim + 1, (k,), dtype=torch.int8))
    q = torch.stack(rows)
    assert torch.equal(formats.unpack_weight(formats.pack_weight(q, bits), bits, k), q)


def test_canonical_layout_is_as_documented():
    # int4: low nibble first, two's complement.
    q4 = torch.tensor([[1, -1, 7, -7]], dtype=torch.int8)
    assert formats.pack_weight(q4, 4).tolist() == [[0xF1, 0x97]]
    # int6: plane of low nibbles (2/byte) then plane of high 2-bit pairs (4/byte); K padded to 4.
    q6 = torch.tensor([[31, -31, 1, -1, 5]], dtype=torch.int8)
    u = [31, 64 - 31, 1, 63, 5, 0, 0, 0]
    lo = [x & 0xF for x in u]
    hi = [x >> 4 for x in u]
    plane4 = [lo[0] | lo[1] << 4, lo[2] | lo[3] << 4, lo[4] | lo[5] << 4, lo[6] | lo[7] << 4]
    plane2 = [hi[0] | hi[1] << 2 | hi[2] << 4 | hi[3] << 6, hi[4] | hi[5] << 2 | hi[6] << 4 | hi[7] << 6]
    assert formats.pack_weight(q6, 6).tolist() == [plane4 + plane2]
    # int8: one two's complement byte each.
    assert formats.pack_weight(torch.tensor([[-127, 127]], dtype=torch.int8), 8).tolist() == [[129, 127]]


@pytest.mark.parametrize("bad", [2, 3, 5, 16, 0, True, 8.0])
def test_unsupported_bits_named(bad):
    with pytest.raises(ValueError, match=r"supports \[4, 6, 8\]"):
        formats.check_bits(bad)


def test_pack_rejects_out_of_range_and_bad_shapes():
    with pytest.raises(ValueError, match="outside"):
        formats.pack_weight(torch.tensor([[8]], dtype=torch.int8), 4)
    with pytest.raises(ValueError, match="outside"):
        formats.pack_weight(torch.tensor([[-128]], dtype=torch.int8), 8)
    with pytest.raises(TypeError):
        formats.pack_weight(torch.zeros(2, 2), 8)
    with pytest.raises(ValueError, match="bytes"):
        formats.unpack_weight(torch.zeros(2, 3, dtype=torch.uint8), 4, 8)


@pytest.mark.parametrize("bits", BITS)
def test_weight_quantization_error_bound(bits):
    torch.manual_seed(bits)
    w = torch.randn(16, 53) * torch.logspace(-2, 1, 16)[:, None]
    q, scale = formats.quantize_weight(w, bits)
    lim = formats.qmax(bits)
    assert q.abs().max() <= lim
    w_hat = formats.dequantize_weight(q, scale, torch.float64)
    # Inside the clip range the error is at most half a step; the clip search never does worse
    # than plain min-max in squared error.
    inside = w.abs() <= scale[:, None] * lim
    assert ((w_hat - w.double()).abs()[inside] <= scale[:, None].double().expand_as(w)[inside] / 2 + 1e-7).all()
    q_mm, s_mm = formats.quantize_weight(w, bits, clip_search=False)
    err = ((w_hat - w.double()) ** 2).sum(1)
    err_mm = ((formats.dequantize_weight(q_mm, s_mm, torch.float64) - w.double()) ** 2).sum(1)
    assert (err <= err_mm + 1e-9).all()
    assert torch.allclose(s_mm, w.abs().amax(1) / lim)


def test_weight_quantization_rejects_nonfinite():
    w = torch.randn(3, 4)
    w[1, 2] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        formats.quantize_weight(w, 8)


@pytest.mark.parametrize("bits", BITS)
def test_dynamic_act_quant_contract(bits):
    torch.manual_seed(0)
    x = torch.randn(9, 31) * 3
    x[4] = 0  # an all-zero row must not divide by zero
    q, scale = formats.quantize_act_dynamic(x, bits)
    lim = formats.qmax(bits)
    assert q.dtype == torch.int8 and q.abs().max() <= lim
    assert torch.equal(q[4], torch.zeros(31, dtype=torch.int8))
    # Each non-zero row reaches +-qmax exactly at its amax.
    assert (q.abs().amax(1)[torch.arange(9) != 4] == lim).all()
    err = (q.double() * scale.double()[:, None] - x.double()).abs()
    assert (err <= scale.double()[:, None] / 2 * (1 + 1e-6)).all()


def test_rounding_is_half_to_even():
    inv = torch.ones(1)
    q = formats.quantize_with_inv_scale(torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 126.5, 300.0]), inv, 8)
    assert q.tolist() == [0, 2, 2, 0, -2, 126, 127]


@pytest.mark.parametrize("bits", BITS)
def test_channelwise_calibration_balances_channels(bits):
    torch.manual_seed(1)
    gains = torch.logspace(-1, 2, 24)
    x = torch.randn(512, 24) * gains
    s, t = formats.calibrate_channelwise(x, bits)
    assert s.shape == (24,) and t.dim() == 0
    # Channel factors follow the channel magnitudes: per-channel quantization error is far below
    # what a single per-tensor scale gives.
    lim = formats.qmax(bits)
    q = formats.quantize_with_inv_scale(x, formats.reciprocal_fp32(s * t), bits)
    err_ch = ((q.float() * (s * t) - x) ** 2).mean()
    t_pt = formats.calibrate_per_tensor(x, bits)
    q_pt = formats.quantize_with_inv_scale(x, formats.reciprocal_fp32(t_pt), bits)
    err_pt = ((q_pt.float() * t_pt - x) ** 2).mean()
    assert err_ch < err_pt / 2
    assert torch.corrcoef(torch.stack([s.log(), gains.log()]))[0, 1] > 0.95
    assert q.abs().max() <= lim


def test_log2_quantizer():
    p = torch.softmax(torch.randn(4, 50) * 3, dim=-1)
    for bits in BITS:
        pq = formats.log2_quantize(p, bits)
        nz = pq > 0
        # Every kept value is a power of two within a factor sqrt(2) of the input.
        assert torch.equal(torch.exp2(torch.round(torch.log2(pq[nz]))), pq[nz])
        ratio = pq[nz] / p[nz]
        assert (ratio <= 2**0.5 + 1e-6).all() and (ratio >= 2**-0.5 - 1e-6).all()
    assert formats.log2_quantize(torch.tensor([1.0, 0.0]), 4).tolist() == [1.0, 0.0]


def test_activation_rule_on_non_finite_values_is_explicit():
    """NaN -> 0 and ±inf -> ±qmax by rule, not by the float->int8 cast; a dynamic row with NaN or inf
    gets a non-finite step, so its outputs are non-finite like nn.Linear's."""
    from mixq import formats

    x = torch.tensor([[float("nan"), 1.0, float("inf"), -float("inf")]])
    assert formats.quantize_with_inv_scale(x, torch.tensor([10.0]), 8).tolist() == [[0, 10, 127, -127]]
    q, scale = formats.quantize_act_dynamic(torch.tensor([[float("nan"), 1.0], [float("inf"), 1.0], [2.0, 1.0]]), 8)
    assert torch.isnan(scale[0]) and torch.isinf(scale[1]) and scale[2] == 2.0 / 127
    assert q[2].tolist() == [127, 64] and q[:2].abs().max() <= 127
