"""Paired bootstrap 95% intervals over images, for a metric and for the difference of two models.

Every model in an accuracy table is run on the same images, so two models' per-image values are
paired: resampling images (the same resample for both) and recomputing both means gives the
interval of their difference, which is much narrower than two independent intervals would suggest.
"A beats B" is claimed only when that interval excludes zero.

Percentile bootstrap, a fixed seed (the same images are drawn for every metric and every pair, so
tables are reproducible), 2,000 resamples by default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np

N_BOOT = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate (the mean over all images) and its bootstrap interval."""

    value: float
    lo: float
    hi: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def fmt(self, scale: float = 1.0, digits: int = 2) -> str:
        """'77.3 [75.8, 78.9]'-style text, values multiplied by ``scale``."""
        f = f"{{:.{digits}f}}"
        return f"{f.format(self.value * scale)} [{f.format(self.lo * scale)}, {f.format(self.hi * scale)}]"

    def to_dict(self) -> dict:
        return asdict(self)


def _check(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"{name}: expected one value per image (1-D), got shape {v.shape}")
    if v.size == 0:
        raise ValueError(f"{name}: no images (empty array)")
    if not np.isfinite(v).all():
        bad = int((~np.isfinite(v)).sum())
        raise ValueError(f"{name}: {bad} of {v.size} per-image values are NaN or infinite")
    return v


def resample_indices(n: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """[n_boot, n] image indices drawn with replacement (fixed seed: the same draws for every metric)."""
    if n < 1:
        raise ValueError(f"need at least one image to resample, got {n}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _interval(point: float, boots: np.ndarray, n: int, level: float) -> Interval:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    lo, hi = np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2])
    return Interval(float(point), float(lo), float(hi), n)


def bootstrap_mean(values: Sequence[float] | np.ndarray, n_boot: int = N_BOOT, seed: int = 0,
                   level: float = LEVEL, name: str = "metric") -> Interval:
    """Mean of per-image ``values`` with its percentile-bootstrap interval."""
    v = _check(values, name)
    idx = resample_indices(v.size, n_boot, seed)
    return _interval(v.mean(), v[idx].mean(axis=1), v.size, level)


def paired_difference(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, n_boot: int = N_BOOT,
                      seed: int = 0, level: float = LEVEL, name: str = "metric") -> Interval:
    """mean(a) - mean(b) over the same images, with a paired bootstrap interval (a, b aligned by image)."""
    va, vb = _check(a, f"{name} (model A)"), _check(b, f"{name} (model B)")
    if va.shape != vb.shape:
        raise ValueError(f"{name}: paired values need the same images, got {va.size} and {vb.size}")
    d = va - vb
    idx = resample_indices(d.size, n_boot, seed)
    return _interval(d.mean(), d[idx].mean(axis=1), d.size, level)


def verdict(diff: Interval, higher_is_better: bool = True) -> str:
    """'better' / 'worse' when the interval of A - B excludes zero, else 'n.s.' (not significant)."""
    if not diff.excludes_zero:
        return "n.s."
    up = diff.lo > 0
    return "better" if up == higher_is_better else "worse"


def line_gap(x: float, left: tuple[float, Sequence[float]], right: tuple[float, Sequence[float]],
             mid: Sequence[float], n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL,
             name: str = "metric") -> Interval:
    """How far a point at ``x`` lies above the straight line between two neighbours (x_l, values_l)
    and (x_r, values_r), paired over images: mean(mid) - ((1-t) mean(l) + t mean(r)), t = (x-x_l)/(x_r-x_l)."""
    (xl, vl), (xr, vr) = left, right
    if not xl < x < xr and not xr < x < xl:
        raise ValueError(f"{name}: x={x} must lie strictly between the neighbours {xl} and {xr}")
    t = (x - xl) / (xr - xl)
    a, l, r = _check(mid, name), _check(vl, f"{name} (left)"), _check(vr, f"{name} (right)")
    if not a.shape == l.shape == r.shape:
        raise ValueError(f"{name}: paired values need the same images")
    d = a - ((1 - t) * l + t * r)
    idx = resample_indices(d.size, n_boot, seed)
    return _interval(d.mean(), d[idx].mean(axis=1), d.size, level)


def interval_from_dict(d: Optional[dict]) -> Optional[Interval]:
    return None if d is None else Interval(d["value"], d["lo"], d["hi"], d["n"])
