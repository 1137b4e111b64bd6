"""timm ViT / DeiT / Swin classifiers loaded from a local checkpoint: ``timm:<arch>:/path/ckpt``.

``timm.create_model(arch, pretrained=False)`` builds the architecture (never touching a hub), then
the user's .pth/.pt/.safetensors is loaded strictly. Quantized: every Linear inside the
transformer blocks (ViT/DeiT attn.qkv, attn.proj, mlp.fc1, mlp.fc2; Swin the same plus the patch
merging ``downsample.reduction``). Kept in float, as RepQ-ViT and PTQ4ViT do: the patch-embedding
conv, the classifier head(s) (``head``, ``head.fc``, DeiT's ``head_dist``), LayerNorms, attention
matmuls and softmax.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .base import ModelAdapter, ModelDescription, softmax_probs
from .checkpoints import load_checked, load_state_dict_file
from .images import CenterCropTransform, list_images, load_batch, sample_paths

_HEAD_PREFIXES = ("head", "head_dist", "fc_norm", "pre_logits")


def build_timm(arch: str, checkpoint: Optional[str | Path] = None, **model_kwargs: Any) -> nn.Module:
    """``timm.create_model(arch, pretrained=False, **model_kwargs)`` with the checkpoint loaded strictly."""
    import timm

    try:
        model = timm.create_model(arch, pretrained=False, **model_kwargs)
    except RuntimeError as e:  # timm raises RuntimeError for unknown names
        raise ValueError(f"unknown timm architecture {arch!r}: {e}") from e
    if checkpoint is not None:
        load_checked(model, load_state_dict_file(checkpoint), str(checkpoint))
    return model.eval()


class TimmAdapter(ModelAdapter):
    """A timm image classifier; calibration images come from ``calib_dir`` (a folder the user gives)."""

    def __init__(self, arch: str, checkpoint: Optional[str | Path] = None, calib_dir: Optional[str | Path] = None,
                 **model_kwargs: Any) -> None:
        self.arch, self.model_kwargs = arch, model_kwargs
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        if self.checkpoint is not None and not self.checkpoint.is_file():
            raise FileNotFoundError(f"timm checkpoint not found: {self.checkpoint}")
        self.calib_dir = Path(calib_dir) if calib_dir is not None else None
        self.name = f"timm:{arch}"
        self._transform: Optional[CenterCropTransform] = None

    def build(self) -> nn.Module:
        model = build_timm(self.arch, self.checkpoint, **self.model_kwargs)
        self._transform = self._transform_for(model)
        return model

    @staticmethod
    def _transform_for(model: nn.Module) -> CenterCropTransform:
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        size = cfg.get("input_size", (3, 224, 224))[-1]
        img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if img_size is not None:  # a model built with a non-default img_size
            size = img_size[-1] if isinstance(img_size, (tuple, list)) else int(img_size)
        return CenterCropTransform(int(size), tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
                                   tuple(cfg.get("std", (0.229, 0.224, 0.225))), float(cfg.get("crop_pct", 0.875)))

    @property
    def transform(self) -> CenterCropTransform:
        if self._transform is None:
            self._transform = self._transform_for(build_timm(self.arch, None, **self.model_kwargs))
        return self._transform

    def quant_filter(self, name: str, module: nn.Module) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        return not any(name == p or name.startswith(p + ".") for p in _HEAD_PREFIXES)

    def output_fn(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return softmax_probs(model, batch)

    def calibration_batches(self, n: int = 32, seed: int = 0) -> torch.Tensor:
        if self.calib_dir is None:
            raise ValueError(f"{self.name}: calibration needs a folder of images (calib_dir); none was given")
        return load_batch(sample_paths(list_images(self.calib_dir), n, seed), self.transform)

    def describe(self) -> ModelDescription:
        return ModelDescription(
            name=self.name, family="timm ViT/DeiT/Swin classifier",
            weights=str(self.checkpoint) if self.checkpoint else "random init (no checkpoint)",
            quantized=["every Linear in the transformer blocks (attn.qkv, attn.proj, mlp.fc1, mlp.fc2; "
                       "Swin downsample.reduction)"],
            kept_float=["patch-embedding conv", "classifier head(s)", "LayerNorms",
                        "attention matmuls and softmax"],
            calibration=f"32 images by default from {self.calib_dir}; resize + centre crop, timm mean/std",
        )
