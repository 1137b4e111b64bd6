"""Randomized Hadamard rotations of a Linear's input space: the contract every backend obeys.

A rotated QuantLinear multiplies its (smoothed) input by an orthogonal R = H_K D / sqrt(b) before
the activation quantize, and holds the weights W' = W R^T, so W' R x = W x in exact arithmetic while
the activation outliers spread over b channels (QuaRot, SpinQuant). D is a diagonal of random signs
(seeded), H_K the block-diagonal Walsh-Hadamard matrix with blocks of b = :func:`hadamard_block`
(K): the largest power of two dividing K (DINOv2-S: 384 = 3 x 128 -> b = 128, 1536 = 3 x 512 ->
b = 512). A Paley H_12 factor would mix all 384 channels, but every backend would then need the
same fixed-order 12-term sums; blocks of 128 already spread an outlier over 128 channels.

The fp32 transform is defined operation by operation, so every backend returns the same bits:
y = fp32(x) * d (exact), then for h = 1, 2, 4, ..., b/2, inside each block, the butterfly
(y[j], y[j+h]) <- (y[j] + y[j+h], y[j] - y[j+h]) for every j whose bit h is clear (fp32 adds,
round to nearest), then y * fp32(1/sqrt(b)) (one fp32 multiply). :func:`hadamard_fp32` is that
definition; :func:`rotation_matrix` is the float64 matrix it approximates (within fp32 rounding,
about (log2(b) + 1) * 2^-24 relative to each block's norm).
"""

from __future__ import annotations

import math

import torch

__all__ = ["hadamard_block", "hadamard_fp32", "hadamard_scale", "random_signs", "rotate_weight", "rotation_matrix",
           "unrotate_weight"]


def hadamard_block(k: int) -> int:
    """The Hadamard block size for K input channels: the largest power of two dividing K."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"a rotation needs a positive channel count, got {k!r}")
    return k & -k


def hadamard_scale(block: int) -> float:
    """fp32(1 / sqrt(block)): the one multiplier after the butterflies (exact for even log2(block))."""
    return float(torch.tensor(1.0 / math.sqrt(block), dtype=torch.float32))


def random_signs(k: int, seed: int) -> torch.Tensor:
    """The diagonal D: K random signs (+1.0 / -1.0, fp32) drawn from ``seed``; any seed is fine."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, 2, (k,), generator=gen).to(torch.float32).mul_(2).sub_(1)


def check_transform_args(x: torch.Tensor, signs: torch.Tensor, block: int) -> None:
    """Shape and value checks shared by every backend (ValueError naming what was wrong)."""
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"hadamard_transform takes a 2-D float tensor [M, K], got {x.dtype} {tuple(x.shape)}")
    k = x.shape[1]
    if signs.shape != (k,) or signs.dtype != torch.float32:
        raise ValueError(f"hadamard_transform signs must be fp32 [{k}] (+1/-1), got {signs.dtype} {tuple(signs.shape)}")
    if block < 1 or block & (block - 1) or k % block:
        raise ValueError(f"hadamard block {block} must be a power of two dividing K={k}")


def hadamard_fp32(x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """The contract's fp32 transform of x [M, K] (module docstring); differentiable (plain torch ops)."""
    check_transform_args(x, signs, block)
    m, k = x.shape
    y = x.to(torch.float32) * signs.to(x.device)
    h = 1
    while h < block:
        v = y.reshape(m, k // (2 * h), 2, h)
        a, b = v[:, :, 0, :], v[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2).reshape(m, k)
        h *= 2
    return y * hadamard_scale(block)


def rotation_matrix(k: int, signs: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """float64 R [K, K] = blockdiag(H_b) D / sqrt(b): the rotation :func:`hadamard_fp32` computes as x @ R^T."""
    block = hadamard_block(k) if block is None else block
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    r = torch.block_diag(*([h / math.sqrt(block)] * (k // block)))
    return r * signs.to(torch.float64)[None, :]


def rotate_weight(w: torch.Tensor, signs: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """W' = W R^T in float64, returned fp32: the weights a rotated input needs (W' (R x) = W x)."""
    r = rotation_matrix(w.shape[1], signs.cpu(), block).to(w.device)
    return (w.to(torch.float64) @ r.T).to(torch.float32)


def unrotate_weight(w: torch.Tensor, signs: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """W = W' R (float64, returned fp32): the inverse of :func:`rotate_weight`."""
    r = rotation_matrix(w.shape[1], signs.cpu(), block).to(w.device)
    return (w.to(torch.float64) @ r).to(torch.float32)
