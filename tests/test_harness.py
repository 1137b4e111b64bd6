"""Accuracy harness: bootstrap intervals, kNN, disjoint splits, per-image metrics (synthetic data)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixq.eval.harness import (
    Reference, check_disjoint, compare, knn_predict, label_metrics, photo_metrics, saliency_per_image, summarize,
)
from mixq.eval.stats import bootstrap_mean, line_gap, paired_difference, verdict


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_matches_normal_theory_for_a_proportion():
    # 1,000 Bernoulli(0.7) images: the 95% interval of the mean is about +-1.96 sqrt(p(1-p)/n) = +-0.0284
    v = np.r_[np.ones(700), np.zeros(300)]
    iv = bootstrap_mean(v, n_boot=4000)
    assert iv.value == pytest.approx(0.7)
    assert iv.lo == pytest.approx(0.7 - 0.0284, abs=0.004)
    assert iv.hi == pytest.approx(0.7 + 0.0284, abs=0.004)
    assert iv.lo < iv.value < iv.hi and iv.n == 1000


def test_constant_values_give_a_zero_width_interval():
    iv = bootstrap_mean(np.full(50, 3.0))
    assert (iv.value, iv.lo, iv.hi) == (3.0, 3.0, 3.0)


def test_paired_difference_sees_what_unpaired_intervals_hide():
    rng = np.random.default_rng(1)
    base = rng.normal(0, 1, 400)  # large per-image spread shared by both models
    a, b = base + 0.05, base  # A is better by 0.05 on every image
    d = paired_difference(a, b)
    assert d.value == pytest.approx(0.05) and d.lo == pytest.approx(0.05) and d.hi == pytest.approx(0.05)
    assert verdict(d) == "better" and verdict(d, higher_is_better=False) == "worse"
    ia, ib = bootstrap_mean(a), bootstrap_mean(b)
    assert ia.lo < ib.hi  # the separate intervals overlap: only the paired one can tell
    same = paired_difference(base, base[::-1].copy())
    assert verdict(same) == "n.s." and not same.excludes_zero


def test_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        bootstrap_mean([])
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_mean([1.0, float("nan")])
    with pytest.raises(ValueError, match="1-D"):
        bootstrap_mean(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="same images"):
        paired_difference([1, 2, 3], [1, 2])


def test_line_gap():
    left, right = np.zeros(10), np.full(10, 2.0)
    g = line_gap(5.0, (4.0, left), (6.0, right), np.full(10, 1.5))
    assert g.value == pytest.approx(0.5) and g.excludes_zero
    with pytest.raises(ValueError, match="between"):
        line_gap(7.0, (4.0, left), (6.0, right), left)


# ----------------------------------------------------------------------------- splits and kNN


def test_check_disjoint_names_the_overlap(tmp_path):
    a, b, c = tmp_path / "a.jpg", tmp_path / "b.jpg", tmp_path / "c.jpg"
    check_disjoint({"calibration": [a], "scoring": [b], "evaluation": [c]})
    with pytest.raises(ValueError, match="'calibration' and 'evaluation' share 1"):
        check_disjoint({"calibration": [a, b], "scoring": [tmp_path / "d.jpg"], "evaluation": [c, str(a)]})
    with pytest.raises(ValueError, match="empty"):
        check_disjoint({"calibration": [], "evaluation": [c]})


def test_knn_on_a_toy_bank():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    q = torch.tensor([[2.0, 0.1], [0.2, 3.0], [1.0, 1.05]])
    assert knn_predict(bank, labels, q, 2, k=2).tolist() == [0, 1, 1]
    # the vote is weighted by similarity: with k = all, the nearest class still wins
    assert knn_predict(bank, labels, q, 2, k=4).tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="NaN"):
        knn_predict(bank, labels, torch.tensor([[float("nan"), 0.0]]), 2)
    with pytest.raises(ValueError, match="non-empty"):
        knn_predict(bank, labels, torch.zeros(0, 2), 2)


def _reference(n=12, d=4, photos=3):
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(30, d, generator=g, dtype=torch.float64)
    bank_labels = (bank[:, 0] > 0).long()
    test = torch.randn(n, d, generator=g, dtype=torch.float64)
    probe = {"mean": torch.zeros(d, dtype=torch.float64), "std": torch.ones(d, dtype=torch.float64),
             "weight": torch.tensor([[-1.0] + [0.0] * (d - 1), [1.0] + [0.0] * (d - 1)], dtype=torch.float64),
             "bias": torch.zeros(2, dtype=torch.float64)}
    maps = torch.rand(photos, 8, 8, generator=g)
    return Reference(bank, bank_labels, test, (test[:, 0] > 0).long(), torch.randn(photos, 5, d, generator=g),
                     maps, probe, 2)


def test_fp_model_scores_perfect_agreement():
    ref = _reference()
    lab = label_metrics(ref, ref.test_feats)
    assert lab["knn_agree"].mean() == 100 and lab["probe_agree"].mean() == 100
    assert lab["probe_top1"].mean() == 100  # the toy labels are what the toy probe reads
    assert np.allclose(lab["feat_cos"], 1)
    ph = photo_metrics(ref, ref.photo_tokens, ref.photo_maps)
    assert np.allclose(ph["sal_iou05"], 1) and np.allclose(ph["sal_kl"], 0, atol=1e-9)
    assert np.allclose(ph["cls_cos"], 1) and np.allclose(ph["patch_cos"], 1)


def test_flipped_features_lose_agreement_and_summaries_have_intervals():
    ref = _reference()
    lab = label_metrics(ref, -ref.test_feats)
    assert lab["probe_agree"].mean() == 0 and np.allclose(lab["feat_cos"], -1)
    fp = label_metrics(ref, ref.test_feats)
    s = summarize(lab)
    assert set(s) == set(lab) and s["probe_agree"].value == 0
    d = compare(lab, fp)
    assert d["probe_agree"].value == -100 and verdict(d["probe_agree"]) == "worse"
    with pytest.raises(ValueError, match="do not match"):
        label_metrics(ref, ref.test_feats[:3])


def test_saliency_per_image_checks_shapes_and_values():
    m = torch.rand(2, 4, 4)
    out = saliency_per_image(m, m)
    assert out["sal_iou05"].shape == (2,)
    with pytest.raises(ValueError, match="NaN"):
        saliency_per_image(m, m * float("nan"))
    with pytest.raises(ValueError, match="H, W"):
        saliency_per_image(m, m[:1])
