"""Per-channel V codes (csrc/quantize.cpp quantize_channels) == formats' rule on V^T, bit for bit."""

import pytest
import torch

from mixq import formats

_C = pytest.importorskip("mixq._C")


def reference(v: torch.Tensor, bits: int):
    codes, steps = formats.quantize_act_dynamic(v.transpose(-2, -1), bits)
    return codes.transpose(-2, -1), steps


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 3, 17, 8), (2, 5, 1, 33), (1, 1, 257, 64), (3, 2, 7, 1)])
def test_matches_formats_on_strided_views(bits, dtype, shape):
    torch.manual_seed(bits + shape[2])
    b, h, m, d = shape
    # V as a model has it: a permuted view of one qkv tensor [B, M, 3, H, D]
    qkv = (torch.randn(b, m, 3, h, d) * torch.logspace(-3, 3, d)).to(dtype)
    v = qkv.permute(2, 0, 3, 1, 4)[2]
    codes, steps = _C.quantize_channels(v, bits)
    ref_codes, ref_steps = reference(v, bits)
    assert codes.shape == v.shape and steps.shape == (b, h, d)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(steps, ref_steps)


def test_non_finite_values_follow_the_contract():
    v = torch.randn(1, 2, 9, 6)
    v[0, 0, 3, 1] = float("nan")
    v[0, 1, 0, 2] = float("inf")
    v[0, 1, 5, 4] = float("-inf")
    v[0, 0, :, 5] = 0.0  # an all-zero channel: the epsilon step
    codes, steps = _C.quantize_channels(v, 8)
    ref_codes, ref_steps = reference(v, 8)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(steps.nan_to_num(-1.0), ref_steps.nan_to_num(-1.0))
    assert torch.isnan(steps[0, 0, 1]) and torch.isinf(steps[0, 1, 2])


def test_empty_and_bad_input():
    codes, steps = _C.quantize_channels(torch.zeros(1, 2, 0, 4), 8)
    assert codes.shape == (1, 2, 0, 4) and steps.shape == (1, 2, 4)
    assert torch.equal(steps, reference(torch.zeros(1, 2, 0, 4), 8)[1])
    with pytest.raises(RuntimeError, match="4-D"):
        _C.quantize_channels(torch.zeros(3, 4), 8)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        _C.quantize_channels(torch.zeros(1, 1, 2, 2, dtype=torch.float64), 8)


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 3, 17, 8), (2, 5, 1, 33), (1, 1, 257, 64), (3, 2, 7, 1)])
def test_tokens_match_formats_on_strided_views(bits, dtype, shape):
    torch.manual_seed(bits + shape[3])
    b, h, n, d = shape
    qkv = (torch.randn(b, n, 3, h, d) * torch.logspace(-3, 3, n)[None, :, None, None, None]).to(dtype)
    for x in qkv.permute(2, 0, 3, 1, 4).unbind(0):  # Q, K, V as a model has them
        codes, steps = _C.quantize_tokens(x, bits)
        ref_codes, ref_steps = formats.quantize_act_dynamic(x, bits)
        assert codes.shape == x.shape and steps.shape == (b, h, n)
        assert torch.equal(codes, ref_codes) and torch.equal(steps, ref_steps)


def test_tokens_non_finite_and_bad_input():
    x = torch.randn(1, 2, 5, 6)
    x[0, 0, 1, 2], x[0, 1, 3, 0] = float("nan"), float("inf")
    codes, steps = _C.quantize_tokens(x, 8)
    ref_codes, ref_steps = formats.quantize_act_dynamic(x, 8)
    assert torch.equal(codes, ref_codes) and torch.equal(steps.nan_to_num(-1.0), ref_steps.nan_to_num(-1.0))
    with pytest.raises(RuntimeError, match="unit stride"):
        _C.quantize_tokens(torch.randn(1, 1, 6, 4).transpose(-2, -1), 8)
    with pytest.raises(RuntimeError, match="4-D"):
        _C.quantize_tokens(torch.zeros(3, 4), 8)
