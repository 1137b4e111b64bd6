"""The GPU weight layout of the Triton GEMM: canonical packed rows re-laid out per K tile.

Why a second layout: the canonical form (mixq.formats) interleaves neighbouring K values in
one byte (low nibble first), so unpacking it in registers needs an interleave/reshape of the
tile, which costs layout conversions on the GPU. Here every K tile of ``K_TILE`` values is
split into ``K_TILE // SUB_K`` sub-tiles of ``SUB_K`` consecutive values, and byte ``s`` of a
tile holds element ``s`` of *every* sub-tile, one bit field each. The kernel loads the bytes
of a tile once ([SUB_K, BLOCK_N] per plane), extracts each sub-tile with a shift and a mask,
and issues one ``tl.dot`` per sub-tile against the matching slice of the activations.

Per output channel and K tile (``K_TILE = 128`` values for every bit-width):

* int8: 128 bytes, byte s = value s (one sub-tile, SUB_K = 128).
* int4: 64 bytes, byte s = value s (low nibble) | value 64 + s (high nibble).
* int6: 96 bytes in three planes of 32: plane 0 holds the low 4 bits of values s and 32 + s,
  plane 1 those of 64 + s and 96 + s (low nibble first), plane 2 the high 2 bits of
  s, 32 + s, 64 + s, 96 + s (lowest pair first).

K is padded with zero values to a multiple of K_TILE. The prepacked tensor is uint8
[N, k_tiles, tile_bytes]; its third dimension tells it apart from the 2-D canonical form.
"""

from __future__ import annotations

import torch

from mixq import formats

K_TILE: int = 128
SUB_K: dict[int, int] = {8: 128, 4: 64, 6: 32}


def tile_bytes(bits: int) -> int:
    """Bytes one output channel spends on one K tile."""
    return K_TILE * formats.check_bits(bits, "w_bits") // 8


def k_tiles(k: int) -> int:
    if k < 1:
        raise ValueError(f"k (in_features) must be >= 1, got {k}")
    return (k + K_TILE - 1) // K_TILE


def gpu_layout_shape(n: int, k: int, bits: int) -> tuple[int, int, int]:
    return (n, k_tiles(k), tile_bytes(bits))


def prepack_gpu(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Canonical packed weights uint8 [N, row_bytes] -> GPU layout uint8 [N, k_tiles, tile_bytes]."""
    q = formats.unpack_weight(packed, bits, k)  # validates dtype and shape
    n = q.shape[0]
    t = k_tiles(k)
    u = torch.zeros((n, t * K_TILE), dtype=torch.int16, device=packed.device)
    u[:, :k] = q.to(torch.int16) & ((1 << bits) - 1)
    sub = SUB_K[bits]
    u = u.reshape(n, t, K_TILE // sub, sub)  # [N, tile, sub-tile, element]
    if bits == 8:
        planes = u[:, :, 0]
    elif bits == 4:
        planes = u[:, :, 0] | (u[:, :, 1] << 4)
    else:
        lo, hi = u & 0xF, u >> 4
        planes = torch.cat(
            [
                lo[:, :, 0] | (lo[:, :, 1] << 4),
                lo[:, :, 2] | (lo[:, :, 3] << 4),
                hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6),
            ],
            dim=2,
        )
    return planes.to(torch.uint8).reshape(n, t, tile_bytes(bits)).contiguous()


def unprepack_gpu(w: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`prepack_gpu`: GPU layout -> canonical packed uint8 [N, row_bytes]."""
    check_gpu_layout(w, bits, k)
    n, t, _ = w.shape
    p = w.to(torch.int16)
    sub = SUB_K[bits]
    if bits == 8:
        u = p
    elif bits == 4:
        u = torch.cat([p & 0xF, p >> 4], dim=2)
    else:
        p01, p23, ph = p[:, :, :sub], p[:, :, sub : 2 * sub], p[:, :, 2 * sub :]
        lo = torch.cat([p01 & 0xF, p01 >> 4, p23 & 0xF, p23 >> 4], dim=2)
        hi = torch.cat([(ph >> s) & 0x3 for s in (0, 2, 4, 6)], dim=2)
        u = lo | (hi << 4)
    u = u.reshape(n, t * K_TILE)[:, :k]
    q = torch.where(u >= (1 << (bits - 1)), u - (1 << bits), u).to(torch.int8)
    return formats.pack_weight(q, bits)


def check_gpu_layout(w: torch.Tensor, bits: int, k: int, n: int | None = None) -> None:
    """Raise a ValueError naming what is wrong when ``w`` is not a GPU-layout tensor for (bits, k, n)."""
    formats.check_bits(bits, "w_bits")
    rows = w.shape[0] if w.dim() == 3 else -1
    want = gpu_layout_shape(rows if n is None else n, k, bits)
    if w.dtype != torch.uint8 or w.dim() != 3 or tuple(w.shape) != want:
        raise ValueError(
            f"GPU-layout weights for w_bits={bits}, k={k} must be uint8 of shape {want}; "
            f"got {w.dtype} {tuple(w.shape)} (pass canonical [N, row_bytes] weights through prepack first)"
        )
