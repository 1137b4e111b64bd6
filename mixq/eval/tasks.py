"""One entry point per evaluation task for ``mixq eval``: FP and a quantized model side by side."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from ..models.base import ModelAdapter
from .quantized import bits_summary

TASKS = ("dinov2", "coco", "classify")


@dataclass
class TaskResult:
    task: str
    markdown: str
    data: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        return {"task": self.task, "markdown": self.markdown, **self.data}


def run_task(task: str, adapter: ModelAdapter, fp_model: nn.Module, qmodel: nn.Module, images: Optional[str] = None,
             ann: Optional[str] = None, detections: Optional[str] = None, n_test: Optional[int] = None) -> TaskResult:
    """Evaluate ``qmodel`` next to ``fp_model`` on ``task``; raises ValueError naming what is missing."""
    described = bits_summary(qmodel)
    if task == "dinov2":
        from .dinov2_tasks import Dinov2Evaluator

        if not hasattr(fp_model, "features_and_saliency"):
            raise ValueError(f"task 'dinov2' needs the built-in dinov2-s model, not {adapter.name}")
        from mixq.models.dinov2 import cache_dir

        ev = Dinov2Evaluator(fp_model, adapter.transform, n_test=n_test, cache=cache_dir())
        row = ev.evaluate(qmodel, "quantized", described)
        return TaskResult(task, ev.result.markdown(), {"probe_top1": row.probe_top1,
                                                       "fp_probe_top1": ev.result.rows[0].probe_top1})
    if task == "coco":
        from ..coco import load_coco, load_detections
        from .coco_sam import SamBoxPredictor, comparison_table, evaluate_sam_coco

        if not images or not ann:
            raise ValueError("task 'coco' needs --images (the image folder) and --ann (COCO instances JSON)")
        coco = load_coco(ann, images)
        dets = load_detections(detections, coco) if detections else None
        res = [evaluate_sam_coco(SamBoxPredictor(fp_model), coco, "FP32", dets, n_test),
               evaluate_sam_coco(SamBoxPredictor(qmodel), coco, "quantized", dets, n_test)]
        table = comparison_table(res, {"FP32": "nothing (float)", "quantized": described})
        return TaskResult(task, table, {"fp": {"segm": res[0].segm, "bbox": res[0].bbox},
                                        "quantized": {"segm": res[1].segm, "bbox": res[1].bbox}})
    if task == "classify":
        from .classification import evaluate_classification, scan_image_folder

        if not images:
            raise ValueError("task 'classify' needs --images (a folder with one sub-folder per class)")
        res = evaluate_classification({"FP32": fp_model, "quantized": qmodel}, scan_image_folder(images),
                                      adapter.transform, limit=n_test,
                                      quantized={"FP32": "nothing (float)", "quantized": described})
        return TaskResult(task, res.markdown(), {"top1": res.top1, "n_images": res.n_images,
                                                 "skipped": len(res.skipped)})
    raise ValueError(f"unknown task {task!r}; known: {list(TASKS)}")


