"""Launch configurations of the mixed-bit GEMM: per-GPU tables kept in the repo, plus a heuristic.

Why tables: Triton's autotuner benchmarks every candidate on first use, which costs seconds per
shape and cannot run inside CUDA-graph capture. ``configs/<gpu>.json`` holds the best config per
(w_bits, M bucket, N, K); ``bench/bench_gpu.py --tune`` regenerates it on a GPU. Shapes not in
the table get :func:`heuristic_config`, which sizes tiles from M and splits K when the output
tiles alone cannot fill the GPU (small M: ViT at batch 1, SAM's mask decoder).

A table file is JSON: ``{"device": ..., "source": ..., "entries": [{"w_bits": 8, "m_bucket": 256,
"n": 2304, "k": 768, "block_m": 128, "block_n": 128, "group_m": 8, "split_k": 1,
"num_warps": 8, "num_stages": 3}, ...]}``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from pathlib import Path
from typing import Optional

import torch

from .layout import K_TILE

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# Substring of torch.cuda.get_device_name() (lower case) -> table file, first match wins. The H200
# has the H100's SMs and clocks with more, faster memory: its own file, so a tune on one never
# overwrites the other's. $MIXQ_GEMM_TABLE (a path) overrides the choice for any GPU.
DEVICE_TABLES: dict[str, str] = {"h200": "h200.json", "h100": "h100.json", "h800": "h100.json"}
TABLE_ENV = "MIXQ_GEMM_TABLE"
M_BUCKETS: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Tile sizes and launch options of one GEMM launch (K tile fixed by the weight layout)."""

    block_m: int
    block_n: int
    group_m: int = 8
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    swap_ab: int = 0  # 1: compute out^T = W @ X^T (unpacked weights as wgmma's register operand)
    asm_unpack: int = 0  # 1: unpack W4/W6 with inline PTX on 32-bit words (4 weights per op); GPU only

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot minimum), got {v}")
        if self.group_m < 1 or self.split_k < 1 or self.num_stages < 1:
            raise ValueError(f"group_m, split_k and num_stages must be >= 1, got {self}")
        if self.swap_ab not in (0, 1) or self.asm_unpack not in (0, 1):
            raise ValueError(f"swap_ab and asm_unpack must be 0 or 1, got {self.swap_ab}, {self.asm_unpack}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be one of 1, 2, 4, 8, 16, got {self.num_warps}")


def m_bucket(m: int) -> int:
    """The table's M key: the next power of two, clipped to [16, 16384]."""
    for b in M_BUCKETS:
        if m <= b:
            return b
    return M_BUCKETS[-1]


def table_path_for(device_name: str) -> Optional[Path]:
    """The config table for a GPU name ($MIXQ_GEMM_TABLE if set), or None when none is known."""
    forced = os.environ.get(TABLE_ENV)
    if forced:
        return Path(forced)
    name = device_name.lower()
    for key, fname in DEVICE_TABLES.items():
        if key in name:
            return CONFIG_DIR / fname
    return None


@functools.lru_cache(maxsize=None)
def load_table(path: str) -> dict[tuple[int, int, int, int], GemmConfig]:
    """Parse a table file into {(w_bits, m_bucket, n, k): GemmConfig}; a broken file is an error."""
    with open(path) as f:
        data = json.load(f)
    table = {}
    fields = {f.name for f in dataclasses.fields(GemmConfig)}
    for i, e in enumerate(data.get("entries", [])):
        try:
            key = (int(e["w_bits"]), int(e["m_bucket"]), int(e["n"]), int(e["k"]))
            table[key] = GemmConfig(**{k: int(v) for k, v in e.items() if k in fields})
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: entry {i} is malformed ({err}): {e}") from err
    return table


def write_table(path: Path, device: str, source: str, entries: dict[tuple[int, int, int, int], GemmConfig]) -> None:
    """Write a table file, one entry per line so diffs of a re-tune stay readable."""
    lines = []
    for (w_bits, bucket, n, k), cfg in sorted(entries.items()):
        row = {"w_bits": w_bits, "m_bucket": bucket, "n": n, "k": k, **dataclasses.asdict(cfg)}
        lines.append("  " + json.dumps(row))
    head = json.dumps({"device": device, "source": source})[:-1]
    text = head + ',\n "entries": [\n' + ",\n".join(lines) + "\n ]}\n"
    json.loads(text)  # never write a file the loader cannot read
    Path(path).write_text(text)


@functools.lru_cache(maxsize=None)
def _device_info(index: int) -> tuple[str, int]:
    props = torch.cuda.get_device_properties(index)
    return props.name, props.multi_processor_count


def heuristic_config(m: int, n: int, k: int, sm_count: int = 132) -> GemmConfig:
    """A sound default: big tiles for big M, split-K when the output tiles leave SMs idle."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    block_n = 64 if n <= 64 else 128
    num_warps = 4 if block_m <= 64 else 8
    tiles = math.ceil(m / block_m) * math.ceil(n / block_n)
    kt = math.ceil(k / K_TILE)
    split = 1
    if tiles < sm_count // 2 and kt > 1:
        split = min(kt, max(1, sm_count // tiles), 8)
        split = math.ceil(kt / math.ceil(kt / split))  # no empty splits
    return GemmConfig(block_m, block_n, group_m=8, split_k=split, num_warps=num_warps,
                      num_stages=4 if block_m <= 64 else 3)


def interpreter_config(n: int) -> GemmConfig:
    """Small tiles for the CPU interpreter, where work grows with the tile size, not the grid."""
    return GemmConfig(block_m=16, block_n=16 if n <= 16 else 32, group_m=4, split_k=1, num_warps=1, num_stages=1)


def pick_config(w_bits: int, m: int, n: int, k: int, device: torch.device) -> GemmConfig:
    """Table entry for (w_bits, M bucket, N, K) on this GPU, else the nearest M bucket, else the heuristic."""
    if device.type != "cuda":
        return interpreter_config(n)
    name, sms = _device_info(device.index if device.index is not None else torch.cuda.current_device())
    path = table_path_for(name)
    if path is not None and path.exists():
        table = load_table(str(path))
        bucket = m_bucket(m)
        hit = table.get((w_bits, bucket, n, k))
        if hit is None:
            near = [b for (wb, b, nn, kk) in table if (wb, nn, kk) == (w_bits, n, k)]
            if near:
                best = min(near, key=lambda b: abs(math.log2(b) - math.log2(bucket)))
                hit = table[(w_bits, best, n, k)]
        if hit is not None:
            return hit
    return heuristic_config(m, n, k, sms)
