"""The GPU weight layout of the Triton GEMM: canonical packed rows re-laid out per K tile.

Why a second layout: the canonical form (mixq.formats) interleaves neighbouring K values in
one byte (low nibble first), so unpacking it in registers needs an interleave/reshape of the
tile, which costs layout conversions on the GPU. Here every K tile of ``K_TILE`` values is
split into ``K_TILE // SUB_K`` sub-tiles of ``SUB_K`` consecutive values, and byte ``s`` of a
tile holds element ``s`` of *every* sub-tile, one bit field each. The kernel loads the bytes
of a tile once ([SUB_K, BLOCK_N] per plane), extracts each sub-tile with as few integer ops as
the format allows, and issues one ``tl.dot`` per sub-tile against the matching slice of the
activations.

The fields are placed so that the extracted int8 is the weight times a power of two, with no
sign extension (Hopper has no int4/int6 MMA, so these ops sit next to every int8 wgmma):

* int8: 128 bytes, byte s = value s (one sub-tile, SUB_K = 128). No op.
* int4: 64 bytes, byte s = value s (low nibble) | value 64 + s (high nibble). As int8,
  ``b << 4`` is 16 * value s and ``b & 0xF0`` is 16 * value 64 + s: one op per weight.
* int6: 96 bytes in three planes of 32 (SUB_K = 32). Byte s of plane j (j = 0, 1, 2) holds the
  6-bit code of value 32 j + s in its top six bits and a 2-bit piece of value 96 + s in its low
  two bits (plane 0 the top piece, plane 2 the bottom one). As int8, ``b_j & 0xFC`` is
  4 * value 32 j + s (one op), and ``(b_0 << 6) | ((b_1 & 3) << 4) | ((b_2 & 3) << 2)`` is
  4 * value 96 + s (seven ops): 2.5 ops per weight.

The GEMM divides the int32 accumulator by the factor (16 or 4; an exact arithmetic shift)
before its epilogue. K is padded with zero values to a multiple of K_TILE. The prepacked tensor
is uint8 [N, k_tiles, tile_bytes]; its third dimension tells it apart from the 2-D canonical form.
"""

from __future__ import annotations

import torch

from mixq import formats

K_TILE: int = 128
SUB_K: dict[int, int] = {8: 128, 4: 64, 6: 32}
# The extracted int8 is the weight times this factor (see above); the GEMM shifts it back out.
PRESHIFT: dict[int, int] = {8: 0, 4: 4, 6: 2}


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
        last = u[:, :, 3]
        pieces = (last >> 4, (last >> 2) & 0x3, last & 0x3)
        planes = torch.cat([((u[:, :, j] << 2) | pieces[j]) & 0xFF for j in range(3)], dim=2)
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
        b = [p[:, :, j * sub : (j + 1) * sub] for j in range(3)]
        last = ((b[0] & 0x3) << 4) | ((b[1] & 0x3) << 2) | (b[2] & 0x3)
        u = torch.cat([x >> 2 for x in b] + [last], dim=2)
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
