"""The allocation problem in numbers: layers, candidates, per-choice costs, synergy pairs, knapsack rows."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np

from ..formats import SUPPORTED_BITS as BITS

DEFAULT_CANDIDATES: tuple[tuple[int, int], ...] = tuple((w, a) for w in BITS for a in BITS)
SCALE_BITS = 32  # one fp32 scale per output channel
BIAS_BITS = 32  # biases stay fp32
BITS_PER_WEIGHT_MAX = 32.0  # a number budget above this is read as bytes

Budget = Union[float, int, str]
# What a layer of the problem is: a Linear, or one of an attention module's two matmuls
# (QK^T: bits of Q, K; softmax.V: bits of P, V). Attention matmuls have no weights: params 0.
OPS = ("linear", "qk", "pv")


def stored_bits(params: int, out_features: int, bias: bool, w_bits: int) -> int:
    """What one quantized Linear stores: packed weights, one fp32 scale per output channel, an fp32
    bias; the measure of a byte budget (a bits-per-weight budget counts the weights only)."""
    return params * w_bits + out_features * SCALE_BITS + (out_features * BIAS_BITS if bias else 0)


class InfeasibleBudgetError(ValueError):
    """No allocation meets the budgets; ``smallest`` holds the smallest feasible one (user units)."""

    def __init__(self, message: str, smallest: Optional[float] = None, kind: str = "") -> None:
        super().__init__(message)
        self.smallest = smallest
        self.kind = kind


# ---------------------------------------------------------------------------------------- problem


@dataclass
class AllocationProblem:
    """Numbers in: per-layer sizes, MACs, per-choice costs, adjacent pairs with synergy weights."""

    names: list[str]
    candidates: list[tuple[int, int]]
    costs: np.ndarray  # [L, C] float
    weight_params: list[int]  # weights per layer (out * in)
    out_features: list[int]
    has_bias: list[bool]
    macs: list[int]  # multiply-accumulates per input
    pairs: list[tuple[int, int]] = field(default_factory=list)
    synergy: list[float] = field(default_factory=list)  # S[l, m] >= 0, one per pair
    lam: float = 0.0
    pinned: dict[int, int] = field(default_factory=dict)  # layer index -> candidate index
    # Per layer, the candidate indices it may take (None: all). Attention matmuls take only the equal
    # pairs (b, b): one bit-width rule per operand pair, no weights.
    allowed: Optional[list[Optional[list[int]]]] = None
    # Per layer, what it is: "linear", or "qk" / "pv" for an attention matmul (None: all "linear").
    ops: Optional[list[str]] = None

    def __post_init__(self) -> None:
        L, C = len(self.names), len(self.candidates)
        if L == 0:
            raise ValueError("allocation needs at least one layer")
        if C == 0:
            raise ValueError("allocation needs at least one candidate (w_bits, a_bits)")
        if len(set(self.candidates)) != C:
            raise ValueError(f"candidates must be distinct, got {self.candidates}")
        for w, a in self.candidates:
            if w not in BITS or a not in BITS:
                raise ValueError(f"candidate {(w, a)} not allowed; bits must be in {BITS}")
        self.costs = np.asarray(self.costs, dtype=np.float64)
        if self.costs.shape != (L, C):
            raise ValueError(f"costs must have shape [layers, candidates] = {(L, C)}, got {self.costs.shape}")
        if not np.isfinite(self.costs).all():
            raise ValueError("costs contain NaN or Inf")
        for attr in ("weight_params", "out_features", "has_bias", "macs"):
            if len(getattr(self, attr)) != L:
                raise ValueError(f"{attr} has {len(getattr(self, attr))} entries, expected one per layer ({L})")
        if len(self.synergy) != len(self.pairs):
            raise ValueError(f"synergy needs one weight per pair: {len(self.synergy)} weights, {len(self.pairs)} pairs")
        for (i, j), s in zip(self.pairs, self.synergy):
            if not (0 <= i < L and 0 <= j < L and i != j):
                raise ValueError(f"pair {(i, j)} does not name two distinct layers in 0..{L - 1}")
            if not (s >= 0 and math.isfinite(s)):
                raise ValueError(f"synergy weights must be finite and >= 0, got {s} for pair {(i, j)}")
        if not (self.lam >= 0 and math.isfinite(self.lam)):
            raise ValueError(f"lam must be finite and >= 0, got {self.lam}")
        for i, c in self.pinned.items():
            if not (0 <= i < L and 0 <= c < C):
                raise ValueError(f"pinned entry {i}: {c} is out of range ({L} layers, {C} candidates)")
        if self.ops is None:
            self.ops = ["linear"] * L
        if len(self.ops) != L or any(o not in OPS for o in self.ops):
            raise ValueError(f"ops must name one of {OPS} per layer ({L}), got {self.ops}")
        if self.allowed is not None:
            if len(self.allowed) != L:
                raise ValueError(f"allowed has {len(self.allowed)} entries, expected one per layer ({L})")
            for i, cs in enumerate(self.allowed):
                if cs is not None and (not cs or any(not 0 <= c < C for c in cs)):
                    raise ValueError(f"allowed[{i}] must list candidate indices in 0..{C - 1}, got {cs}")
        mask = self.allowed_mask()
        for i, c in self.pinned.items():
            if not mask[i, c]:
                raise ValueError(f"layer {self.names[i]!r} is pinned to {self.candidates[c]}, which it may not take; "
                                 f"allowed: {[self.candidates[k] for k in np.flatnonzero(mask[i])]}")

    def allowed_mask(self) -> np.ndarray:
        """[L, C] bool: which candidates each layer may take (pinning aside)."""
        mask = np.ones((len(self.names), len(self.candidates)), dtype=bool)
        for i, cs in enumerate(self.allowed or []):
            if cs is not None:
                mask[i] = False
                mask[i, list(cs)] = True
        return mask

    # Integer cost tables [L, C] (Python ints inside object arrays would be slow; int64 is ample).
    def weight_bits(self) -> np.ndarray:
        w = np.array([c[0] for c in self.candidates], dtype=np.int64)
        return np.asarray(self.weight_params, dtype=np.int64)[:, None] * w[None, :]

    def size_bits(self) -> np.ndarray:
        extra = np.array([stored_bits(0, o, b, 0) for o, b in zip(self.out_features, self.has_bias)], dtype=np.int64)
        return self.weight_bits() + extra[:, None]

    def bops(self) -> np.ndarray:
        wa = np.array([w * a for w, a in self.candidates], dtype=np.int64)
        return np.asarray(self.macs, dtype=np.int64)[:, None] * wa[None, :]

    def objective(self, choice: Sequence[int]) -> float:
        """The objective of a full assignment, evaluated directly (for checks and brute force)."""
        total = float(sum(self.costs[i, c] for i, c in enumerate(choice)))
        for (l, m), s in zip(self.pairs, self.synergy):
            (wl, al), (wm, am) = self.candidates[choice[l]], self.candidates[choice[m]]
            total += self.lam * s * ((wl - wm) ** 2 + (al - am) ** 2)
        return total


@dataclass
class LayerLatency:
    """Measured seconds per layer and candidate [L, C] (the latency budget's row), each layer's fp32
    and W8A8 seconds [L] (what "0.6x" and "0.6xw8a8" are relative to), and ``other_s``: the time
    no choice changes (the model's non-Linear work and its Linears outside the problem, at fp32)."""

    seconds: np.ndarray
    fp32: np.ndarray
    w8a8: np.ndarray
    other_s: float
    batch: int = 1  # images per inference call the times are for
    key: dict = field(default_factory=dict)  # the machine the table was measured on

    def __post_init__(self) -> None:
        self.seconds = np.asarray(self.seconds, dtype=np.float64)
        self.fp32 = np.asarray(self.fp32, dtype=np.float64)
        self.w8a8 = np.asarray(self.w8a8, dtype=np.float64)
        if self.seconds.ndim != 2 or self.fp32.shape != self.seconds.shape[:1] or self.w8a8.shape != self.fp32.shape:
            raise ValueError(f"latency tables must be [L, C], [L], [L]; got {self.seconds.shape}, {self.fp32.shape}, "
                             f"{self.w8a8.shape}")
        for what, arr in (("seconds", self.seconds), ("fp32", self.fp32), ("w8a8", self.w8a8)):
            if not (np.isfinite(arr).all() and (arr >= 0).all()):
                raise ValueError(f"latency {what} must be finite and >= 0")
        if not (self.other_s >= 0 and math.isfinite(self.other_s)):
            raise ValueError(f"latency other_s must be finite and >= 0, got {self.other_s}")

    def nanoseconds(self) -> np.ndarray:
        """[L, C] int64: the integer table the budget row uses."""
        return np.rint(self.seconds * 1e9).astype(np.int64)


@dataclass
class KnapsackRow:
    """``sum_i table[i, choice_i] <= rhs`` in exact integers; ``label`` names it in messages."""

    label: str
    table: np.ndarray  # [L, C] int64
    rhs: int


@dataclass
class Solution:
    choice: list[int]
    objective: float
    status: str  # "optimal" | "time_limit"
    gap: float
    bound: float
    solve_time_s: float
    nodes: int
