"""ImageNet-style top-1 accuracy from an image folder (``root/<class>/<image>``).

Class indices are the sorted class-folder names (ImageNet's synset folders sort into the standard
1000-class order timm models use), or a user-supplied ``class_to_idx``. An empty folder, or one
where no image can be read, fails with an error that says so. Unreadable or corrupt files among
readable ones are skipped and counted (``ClassificationResult.skipped`` lists them): one bad JPEG in
50,000 should not end an evaluation, but it must not pass silently either.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from mixq.models.images import IMAGE_SUFFIXES, read_rgb

log = logging.getLogger("mixq")


@dataclass(frozen=True)
class ImageFolder:
    """(path, label) pairs of an ImageNet-style folder."""

    root: Path
    classes: tuple[str, ...]
    samples: tuple[tuple[Path, int], ...]


def scan_image_folder(root: str | Path, class_to_idx: Optional[dict[str, int]] = None) -> ImageFolder:
    """List ``root/<class>/*`` images; raise when there are no class folders or no images."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir())
    if not class_dirs:
        raise ValueError(f"{root} has no class sub-folders; expected root/<class>/<image> (ImageNet layout)")
    if class_to_idx is None:
        class_to_idx = {d.name: i for i, d in enumerate(class_dirs)}
    unknown = [d.name for d in class_dirs if d.name not in class_to_idx]
    if unknown:
        raise ValueError(f"{root}: class folder(s) {unknown[:5]} are not in class_to_idx")
    samples = tuple(
        (p, class_to_idx[d.name])
        for d in class_dirs
        for p in sorted(d.rglob("*"))
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not samples:
        raise ValueError(f"no images under {root} (looked for {', '.join(IMAGE_SUFFIXES)} in its class folders)")
    return ImageFolder(root, tuple(d.name for d in class_dirs), samples)


@dataclass
class ClassificationResult:
    """Top-1 per model, side by side, with the images counted and the files skipped."""

    n_images: int
    top1: dict[str, float] = field(default_factory=dict)  # percent
    quantized: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    calibration: str = ""

    def markdown(self) -> str:
        lines = [f"{self.n_images} images ({len(self.skipped)} unreadable, skipped). Calibration: {self.calibration or 'n/a'}.",
                 "", "| model | quantized | top-1 (%) |", "|---|---|---:|"]
        lines += [f"| {k} | {self.quantized.get(k, '')} | {v:.2f} |" for k, v in self.top1.items()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.markdown()


@torch.no_grad()
def evaluate_classification(models: dict[str, nn.Module], folder: ImageFolder, transform: Callable,
                            batch_size: int = 32, limit: Optional[int] = None,
                            quantized: Optional[dict[str, str]] = None, calibration: str = "") -> ClassificationResult:
    """Top-1 of every model in ``models`` on the same images (each image is decoded once)."""
    if not models:
        raise ValueError("no models to evaluate")
    samples: Sequence[tuple[Path, int]] = folder.samples[:limit] if limit else folder.samples
    result = ClassificationResult(0, {k: 0.0 for k in models}, dict(quantized or {}), calibration=calibration)
    correct = {k: 0 for k in models}
    t = time.perf_counter()
    for i in range(0, len(samples), batch_size):
        xs, ys = [], []
        for path, label in samples[i: i + batch_size]:
            try:
                xs.append(transform(read_rgb(path)))
                ys.append(label)
            except ValueError as e:
                log.warning("mixq: skipping %s", e)
                result.skipped.append(str(path))
        if not xs:
            continue
        x, y = torch.stack(xs), torch.tensor(ys)
        for name, model in models.items():
            correct[name] += int((model(x).argmax(-1) == y).sum())
        result.n_images += len(ys)
    if result.n_images == 0:
        raise ValueError(f"none of the {len(samples)} images under {folder.root} could be read "
                         f"(e.g. {result.skipped[:3]})")
    result.top1 = {k: 100.0 * c / result.n_images for k, c in correct.items()}
    result.seconds = time.perf_counter() - t
    return result


def run_classification_eval(model_spec: str, folder: str | Path, calib_dir: str | Path, bits: str = "w8a8",
                            n_calib: int = 32, limit: Optional[int] = None, backend: Optional[str] = None,
                            simulate: bool = False, batch_size: int = 32,
                            adapter_kwargs: Optional[dict] = None) -> ClassificationResult:
    """Top-1 of the FP model and of each quantized config on an ImageNet-style folder.

    ``adapter_kwargs`` go to the adapter (for timm: keyword arguments of ``timm.create_model``).
    """
    from mixq.eval.quantized import bits_summary, parse_bits, quantized_copy
    from mixq.models import get_adapter

    adapter = get_adapter(model_spec, calib_dir=calib_dir, **(adapter_kwargs or {}))
    fp_model = adapter.build()
    calib = adapter.calibration_batches(n_calib)
    models, quantized = {"FP32": fp_model}, {"FP32": "nothing (float)"}
    for spec in parse_bits(bits):
        models[spec.label] = quantized_copy(adapter, fp_model, spec, calib, simulate=simulate, backend=backend)
        quantized[spec.label] = bits_summary(models[spec.label])
    return evaluate_classification(models, scan_image_folder(folder), adapter.transform, batch_size, limit,
                                   quantized, f"{len(calib)} images from {calib_dir}")


def main(argv: Optional[Sequence[str]] = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="ImageNet-style top-1 from an image folder, FP vs quantized")
    ap.add_argument("--model", required=True, help="timm:<arch>:/path/checkpoint")
    ap.add_argument("--folder", required=True, help="root/<class>/<image> (e.g. ImageNet val in synset folders)")
    ap.add_argument("--calib-dir", required=True, help="calibration images, disjoint from --folder")
    ap.add_argument("--bits", default="w8a8")
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--limit", type=int, help="evaluate only the first N images")
    ap.add_argument("--backend")
    ap.add_argument("--simulate", action="store_true")
    a = ap.parse_args(argv)
    print(run_classification_eval(a.model, a.folder, a.calib_dir, a.bits, a.n_calib, a.limit, a.backend, a.simulate))


if __name__ == "__main__":
    main()
