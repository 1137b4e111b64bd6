import pytest
import torch

from mixq import formats, ops
from mixq.backends import get_backend

BITS = [4, 6, 8]
REF = get_backend("reference")


def _packed(wq, bits, scale=None, bias=None):
    n, k = wq.shape
    return REF.pack(formats.pack_weight(wq, bits), torch.ones(n) if scale is None else scale, bias, bits, k, n)


def _int64_gemm(xq, wq):
    # An independent exact computation: explicit int64 multiply-and-sum, no matmul.
    return (xq.to(torch.int64)[:, None, :] * wq.to(torch.int64)[None, :, :]).sum(-1)


@pytest.mark.parametrize("w_bits", BITS)
@pytest.mark.parametrize("a_bits", BITS)
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (7, 13, 5), (19, 67, 33), (3, 300, 4)])
def test_reference_int_gemm_exact(w_bits, a_bits, m, k, n):
    la, lw = formats.qmax(a_bits), formats.qmax(w_bits)
    xq = torch.randint(-la, la + 1, (m, k), dtype=torch.int8)
    wq = torch.randint(-lw, lw + 1, (n, k), dtype=torch.int8)
    acc = ops.int_gemm(xq, _packed(wq, w_bits))
    assert acc.dtype == torch.int32
    assert torch.equal(acc.to(torch.int64), _int64_gemm(xq, wq))


@pytest.mark.parametrize("w_bits", BITS)
def test_reference_extremes_do_not_overflow(w_bits):
    k = 4099
    lw = formats.qmax(w_bits)
    xq = torch.full((2, k), -128, dtype=torch.int8)
    wq = torch.full((3, k), -lw, dtype=torch.int8)
    acc = ops.int_gemm(xq, _packed(wq, w_bits))
    assert (acc.to(torch.int64) == 128 * lw * k).all()


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_token", [True, False])
def test_reference_epilogue_matches_float64(out_dtype, per_token):
    m, k, n = 6, 29, 11
    xq = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    wq = torch.randint(-7, 8, (n, k), dtype=torch.int8)
    a_scale = torch.rand(m if per_token else 1) + 0.01
    w_scale = torch.rand(n) + 0.01
    bias = torch.randn(n)
    out = ops.linear(xq, a_scale, _packed(wq, 4, w_scale, bias), out_dtype)
    want = _int64_gemm(xq, wq).double() * a_scale.double()[:, None] * w_scale.double()[None] + bias.double()
    assert out.dtype == out_dtype
    tol = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[out_dtype]
    assert torch.allclose(out.double(), want, rtol=tol, atol=tol)
