"""The labelled real images mixq evaluates DINOv2 on: conformal-clip-data's simulated textiles.

``conformal-clip-data==0.1.4`` ships 2,000 250x250 JPEGs in three classes (nominal 1000, local
defect 500, global defect 500). The split is fixed: per class, a permutation seeded with
``SPLIT_SEED`` puts the first ``TEST_FRACTION`` in the test set and the rest in train. Calibration
images are drawn from the train split only, so they never overlap the test set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

CLASSES = ("nominal", "local", "global")
SPLIT_SEED = 20240601
TEST_FRACTION = 0.3


@dataclass(frozen=True)
class LabelledImages:
    paths: tuple[Path, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, n: int | None, seed: int = 0) -> "LabelledImages":
        """A stratified, seeded subset of about ``n`` images (all when n is None or >= len)."""
        if n is None or n >= len(self):
            return self
        if n < len(CLASSES):
            raise ValueError(f"a subset needs at least one image per class ({len(CLASSES)}), got n={n}")
        gen = torch.Generator().manual_seed(seed)
        by_class = {c: [i for i, y in enumerate(self.labels) if y == c] for c in sorted(set(self.labels))}
        # exact total n: floor of each class's share, remainder to the largest fractions (largest remainder)
        shares = {c: n * len(idx) / len(self) for c, idx in by_class.items()}
        counts = {c: max(1, int(s)) for c, s in shares.items()}
        for c in sorted(shares, key=lambda c: int(shares[c]) - shares[c])[: max(0, n - sum(counts.values()))]:
            counts[c] += 1
        keep: list[int] = []
        for c, idx in by_class.items():
            perm = torch.randperm(len(idx), generator=gen).tolist()
            keep += [idx[j] for j in perm[: counts[c]]]
        keep.sort()
        return LabelledImages(tuple(self.paths[i] for i in keep), tuple(self.labels[i] for i in keep))


def textile_root() -> Path:
    try:
        import conformal_clip_data
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "the DINOv2 evaluation data needs conformal-clip-data: pip install 'conformal-clip-data==0.1.4'"
        ) from e
    return Path(conformal_clip_data.textile_simulated_root())


def textile_split(split: str) -> LabelledImages:
    """The fixed ``"train"`` or ``"test"`` split of the textile images."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = textile_root()
    paths: list[Path] = []
    labels: list[int] = []
    for label, cls in enumerate(CLASSES):
        files = sorted((root / cls).glob("*.jpg"))
        if not files:
            raise FileNotFoundError(f"no images in {root / cls}; is conformal-clip-data==0.1.4 installed intact?")
        gen = torch.Generator().manual_seed(SPLIT_SEED + label)
        perm = torch.randperm(len(files), generator=gen).tolist()
        n_test = int(round(TEST_FRACTION * len(files)))
        chosen = perm[:n_test] if split == "test" else perm[n_test:]
        for i in sorted(chosen):
            paths.append(files[i])
            labels.append(label)
    return LabelledImages(tuple(paths), tuple(labels))
