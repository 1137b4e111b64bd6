"""Measured int8 peak of this CPU for the GEMM's inner AVX2 instruction sequence.

The micro-kernel of csrc/gemm.cpp is built from `vpmaddubsw` (32 u8 x s8 multiply-adds)
followed either by `vpmaddwd` + `vpaddd` (widen to int32 after every product) or by `vpaddw`
(int16 accumulation, what the int4/int6 kernels do between widenings), and, where the CPU has
AVX-512 VNNI, `vpdpbusd` on 256-bit vectors (the VNNI kernels). This script runs
independent chains of each sequence (csrc/peak.cpp) and prints GOP/s (2 ops per MAC), the
ceiling against which bench_cpu.py states its kernels' efficiency.

    python bench/cpu_peak.py [--iters N]
"""

from __future__ import annotations

import argparse

import torch

SEQUENCES = ("maddubs_madd", "maddubs_add16")


def measure_peaks(iters: int = 20_000_000, repeats: int = 3) -> dict[tuple[str, int], float]:
    """Best-of-``repeats`` GOP/s of each sequence on 1 thread and on all torch threads."""
    from mixq import _C

    threads = sorted({1, torch.get_num_threads()})
    seqs = SEQUENCES + (("dpbusd",) if _C.has_vnni() else ())
    return {
        (seq, t): max(_C.measure_int8_peak(seq, iters, t) for _ in range(repeats)) for seq in seqs for t in threads
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20_000_000, help="loop iterations per measurement")
    args = parser.parse_args()
    print("| sequence | threads | GOP/s |\n|---|---|---|")
    for (seq, t), gops in measure_peaks(args.iters).items():
        print(f"| {seq} | {t} | {gops:.0f} |")


if __name__ == "__main__":
    main()
