"""The randomized block Walsh-Hadamard transform: every backend bit-identical to rotation.hadamard_fp32
(the contract), and that contract within its stated fp32 bound of the float64 rotation.

Bound (per block of b = 2^p channels, first order in u = 2^-24): each butterfly stage rounds values
of 2-norm 2^(s/2) |x_b|, and the remaining stages and the 1/sqrt(b) scale map that error back to
norm u |x_b|; the scale constant and the final multiply add 2u: |y32 - R x|_2 <= (p + 2) u |x_b|_2.
"""

from __future__ import annotations

import math

import pytest
import torch

from mixq import ops, rotation
from mixq.backends import available_backends, get_backend

U = 2.0**-24
KS = (1, 2, 12, 96, 384, 1536)  # 96 = 3 x 32, 384 = 3 x 128, 1536 = 3 x 512


def _backends() -> list[str]:
    names = ["reference"] + (["cpu"] if "cpu" in available_backends("cpu") else [])
    try:
        import triton  # noqa: F401

        names.append("triton")
    except ImportError:
        pass
    return names


def _device(name: str) -> str:
    return "cuda" if name == "triton" and torch.cuda.is_available() else "cpu"


def test_block_is_largest_power_of_two_dividing_k():
    assert [rotation.hadamard_block(k) for k in (1, 384, 1536, 768, 1024, 197)] == [1, 128, 512, 256, 1024, 1]
    with pytest.raises(ValueError, match="positive"):
        rotation.hadamard_block(0)


@pytest.mark.parametrize("k", KS)
def test_matrix_is_orthogonal(k):
    r = rotation.rotation_matrix(k, rotation.random_signs(k, 3))
    assert torch.allclose(r @ r.T, torch.eye(k, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
def test_fp32_contract_within_bound_of_float64(k, dtype):
    gen = torch.Generator().manual_seed(k)
    m = 7
    x = (torch.randn(m, k, generator=gen) * torch.logspace(-2, 2, k)[torch.randperm(k, generator=gen)]).to(dtype)
    signs = rotation.random_signs(k, k + 1)
    b = rotation.hadamard_block(k)
    y = rotation.hadamard_fp32(x, signs, b)
    assert y.dtype == torch.float32
    exact = x.to(torch.float64) @ rotation.rotation_matrix(k, signs).T
    err = (y.to(torch.float64) - exact).reshape(m, k // b, b).norm(dim=-1)
    norm = x.to(torch.float64).reshape(m, k // b, b).norm(dim=-1)
    bound = (math.log2(b) + 2) * U * norm * 1.01
    assert (err <= bound).all(), f"max err/bound {(err / bound).max():.3f}"


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("m,k", [(1, 384), (5, 1536), (3, 96), (9, 12), (2, 1), (0, 64), (17, 256)])
def test_backend_bit_identical_to_contract(backend, m, k):
    gen = torch.Generator().manual_seed(m * 1000 + k)
    dev = _device(backend)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = (torch.randn(m, k, generator=gen) * 5).to(dtype)
        if m > 1 and k > 3:
            x[1, 3] = 4000.0  # an outlier channel, the case rotations are for
        signs = rotation.random_signs(k, 11)
        b = rotation.hadamard_block(k)
        want = rotation.hadamard_fp32(x, signs, b)
        got = ops.hadamard_transform(x.to(dev), signs.to(dev), b, backend).cpu()
        assert got.dtype == torch.float32 and got.shape == (m, k)
        assert torch.equal(got, want), f"{backend} {dtype} m={m} k={k}: max diff {(got - want).abs().max()}"


@pytest.mark.parametrize("backend", _backends())
def test_strided_input_and_smaller_blocks(backend):
    dev = _device(backend)
    x = torch.randn(11, 2 * 384)[:, ::2]  # non-contiguous rows
    signs = rotation.random_signs(384, 5)
    for b in (1, 2, 32, 128):
        want = rotation.hadamard_fp32(x.contiguous(), signs, b)
        assert torch.equal(ops.hadamard_transform(x.to(dev), signs.to(dev), b, backend).cpu(), want)


@pytest.mark.parametrize("backend", _backends())
def test_bad_arguments_are_refused(backend):
    dev = _device(backend)
    be = get_backend(backend)
    x = torch.randn(3, 384, device=dev)
    with pytest.raises((ValueError, RuntimeError), match="power of two"):
        be.hadamard_transform(x, rotation.random_signs(384, 0).to(dev), 256)
    with pytest.raises((ValueError, RuntimeError), match="signs"):
        be.hadamard_transform(x, torch.ones(383, device=dev), 128)


def test_fake_impl_gives_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y = ops.hadamard_transform(torch.empty(4, 384), torch.empty(384), 128, "reference")
    assert y.shape == (4, 384) and y.dtype == torch.float32
