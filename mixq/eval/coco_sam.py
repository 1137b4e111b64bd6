"""SAM instance segmentation on COCO-format data with box prompts: mask AP and box AP by pycocotools.

Protocol (the one SAM PTQ papers report): every prompt box gives one mask (``multimask_output=False``);
prompts are the ground-truth boxes, or the boxes of a detections JSON (COCO results format:
``image_id, category_id, bbox [x, y, w, h], score``), whose category and score the masks inherit
(ground-truth prompts get score 1). Mask AP is COCOeval ``segm`` on the predicted masks; box AP is
COCOeval ``bbox`` on the tight boxes of the predicted masks (with ground-truth prompts, the prompt
box itself would score a trivial 1.0).

Any callable ``predictor(image_rgb_uint8 [H, W, 3], boxes_xyxy [N, 4]) -> bool masks [N, H, W]`` can
be evaluated; :class:`SamBoxPredictor` wraps a :class:`mixq.models.sam.SamBoxModel`.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..coco import CocoData, encode_mask, load_coco, load_detections

Predictor = Callable[[np.ndarray, np.ndarray], np.ndarray]

AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


class SamBoxPredictor:
    """Box-prompted masks from a :class:`~mixq.models.sam.SamBoxModel` (logits > 0 at full resolution)."""

    def __init__(self, model: torch.nn.Module, img_size: Optional[int] = None, max_boxes_per_call: int = 64) -> None:
        self.model = model
        self.img_size = img_size or model.config.img_size
        self.max_boxes = max_boxes_per_call

    @torch.no_grad()
    def __call__(self, image: np.ndarray, boxes_xyxy: np.ndarray) -> np.ndarray:
        from mixq.models.sam import postprocess, preprocess

        if len(boxes_xyxy) == 0:
            return np.zeros((0,) + image.shape[:2], bool)
        sample = preprocess(image, boxes_xyxy, self.img_size)
        device = next(self.model.parameters()).device
        masks = []
        for i in range(0, len(sample.boxes), self.max_boxes):
            boxes = sample.boxes[i: i + self.max_boxes]
            logits = self.model(images=sample.image[None].to(device), boxes=boxes[None].to(device))[0]
            masks.append(postprocess(logits.cpu(), sample, self.img_size) > 0)
        return torch.cat(masks).numpy()


# ----------------------------------------------------------------------------- evaluation


@dataclass
class CocoSamResult:
    """COCOeval numbers (in [0, 1]; -1 where a category/area has no ground truth)."""

    label: str
    segm: dict[str, float]
    bbox: dict[str, float]
    n_images: int
    n_prompts: int
    prompts: str


def _summarize(coco_gt, results: list[dict], iou_type: str) -> dict[str, float]:
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {k: 0.0 for k in AP_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and its tables
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.params.imgIds = sorted(coco_gt.getImgIds())
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: float(v) for k, v in zip(AP_NAMES, ev.stats[:6])}


def evaluate_sam_coco(predictor: Predictor, coco: CocoData, label: str = "model",
                      detections: Optional[dict[int, list[dict]]] = None,
                      max_images: Optional[int] = None) -> CocoSamResult:
    """Prompt ``predictor`` with each image's boxes and score the masks with COCOeval (segm and bbox)."""
    from pycocotools import mask as mask_utils

    from mixq.models.images import read_rgb

    image_ids = sorted(coco.images)[:max_images] if max_images else sorted(coco.images)
    segm_results, bbox_results = [], []
    n_prompts = 0
    for image_id in image_ids:
        img = coco.images[image_id]
        if detections is not None:
            dets = detections.get(image_id, [])
            boxes = np.array([[d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2], d["bbox"][1] + d["bbox"][3]]
                              for d in dets], np.float32).reshape(-1, 4)
            cats, scores = [d["category_id"] for d in dets], [float(d["score"]) for d in dets]
        else:
            boxes = coco.gt_boxes_xyxy(image_id)
            cats, scores = coco.gt_categories(image_id), [1.0] * len(boxes)
        if not len(boxes):
            continue
        image = read_rgb(coco.image_path(img))
        if image.shape[:2] != (img["height"], img["width"]):
            raise ValueError(f"{coco.image_path(img)} is {image.shape[1]}x{image.shape[0]} but the JSON says "
                             f"{img['width']}x{img['height']}")
        masks = np.asarray(predictor(image, boxes))
        if masks.shape != (len(boxes),) + image.shape[:2]:
            raise ValueError(f"predictor returned masks of shape {masks.shape}, expected {(len(boxes),) + image.shape[:2]}")
        n_prompts += len(boxes)
        for mask, cat, score in zip(masks, cats, scores):
            rle = encode_mask(mask)
            segm_results.append({"image_id": image_id, "category_id": cat, "segmentation": rle, "score": score})
            if mask.any():
                bbox_results.append({"image_id": image_id, "category_id": cat, "score": score,
                                     "bbox": [float(v) for v in mask_utils.toBbox(rle)]})
    gt = coco.pycocotools()
    if max_images:
        gt.dataset = dict(gt.dataset, images=[coco.images[i] for i in image_ids],
                          annotations=[a for i in image_ids for a in coco.anns_by_image[i]])
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
    prompts = "detections" if detections is not None else "ground-truth boxes"
    return CocoSamResult(label, _summarize(gt, segm_results, "segm"), _summarize(gt, bbox_results, "bbox"),
                         len(image_ids), n_prompts, prompts)


def comparison_table(results: Sequence[CocoSamResult], quantized: Optional[dict[str, str]] = None) -> str:
    """FP and quantized results side by side (Markdown), with what each row quantized."""
    quantized = quantized or {}
    lines = ["| model | quantized | mask AP | mask AP50 | mask AP75 | box AP | box AP50 | images | prompts |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        lines.append(f"| {r.label} | {quantized.get(r.label, '')} | {100 * r.segm['AP']:.1f} | {100 * r.segm['AP50']:.1f} | "
                     f"{100 * r.segm['AP75']:.1f} | {100 * r.bbox['AP']:.1f} | {100 * r.bbox['AP50']:.1f} | "
                     f"{r.n_images} | {r.prompts} ({r.n_prompts}) |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def run_sam_eval(model_spec: str, coco_json: str | Path, image_dir: str | Path, bits: str = "w8a8",
                 calib_dir: Optional[str | Path] = None, calib_coco: Optional[tuple[str, str]] = None,
                 n_calib: int = 32, detections: Optional[str | Path] = None, max_images: Optional[int] = None,
                 backend: Optional[str] = None, simulate: bool = False, adapter_kwargs: Optional[dict] = None) -> str:
    """FP and each quantized config of a SAM checkpoint on COCO data, as a Markdown report.

    ``adapter_kwargs`` go to the adapter (e.g. ``config=SamConfig(...)`` for a non-standard size).
    """
    from mixq.eval.quantized import bits_summary, parse_bits, quantized_copy
    from mixq.models import get_adapter

    adapter = get_adapter(model_spec, calib_dir=calib_dir, calib_coco=calib_coco, **(adapter_kwargs or {}))
    coco = load_coco(coco_json, image_dir)
    dets = load_detections(detections, coco) if detections else None
    fp_model = adapter.build()
    calib = adapter.calibration_batches(n_calib)
    results = [evaluate_sam_coco(SamBoxPredictor(fp_model), coco, "FP32", dets, max_images)]
    quantized = {"FP32": "nothing (float)"}
    for spec in parse_bits(bits):
        model = quantized_copy(adapter, fp_model, spec, calib, simulate=simulate, backend=backend)
        quantized[spec.label] = bits_summary(model)
        results.append(evaluate_sam_coco(SamBoxPredictor(model), coco, spec.label, dets, max_images))
    desc = adapter.describe()
    return "\n".join([f"SAM {model_spec} on {coco_json}", str(desc), f"calibration: {len(calib)} images", "",
                      comparison_table(results, quantized)])
