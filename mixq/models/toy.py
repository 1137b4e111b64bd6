"""``toy-vit``: a tiny random-weight ViT for smoke tests of the whole pipeline (CLI, CI).

Two blocks, width 48, 32x32 inputs, 3 classes, weights from a fixed seed, calibration images from
the shipped textile photos. Its accuracy means nothing; it exists so every command can run in
seconds on any machine.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .base import ModelDescription
from .images import load_batch, sample_paths
from .timm_models import TimmAdapter

TOY_KWARGS = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=3)


class ToyVitAdapter(TimmAdapter):
    def __init__(self, calib_dir: Optional[str] = None, **_: Any) -> None:
        super().__init__("vit_tiny_patch16_224", None, calib_dir, **TOY_KWARGS)
        self.name = "toy-vit"

    def build(self) -> nn.Module:
        state = torch.random.get_rng_state()
        torch.manual_seed(0)
        try:
            return super().build()
        finally:
            torch.random.set_rng_state(state)

    def calibration_batches(self, n: int = 32, seed: int = 0) -> torch.Tensor:
        if self.calib_dir is not None:
            return super().calibration_batches(n, seed)
        from .textile import textile_split

        return load_batch(sample_paths(list(textile_split("train").paths), n, seed), self.transform)

    def describe(self) -> ModelDescription:
        d = super().describe()
        d.name, d.weights = self.name, "random (seed 0): a smoke-test model, accuracy is meaningless"
        d.calibration = "32 textile train-split images, resized to 32x32"
        return d
