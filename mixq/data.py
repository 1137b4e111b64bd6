"""Calibration data handling: one way to iterate batches, validate them, and feed a model."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn


def tensors_in(batch: Any) -> list[torch.Tensor]:
    """Every tensor in a batch or model output (a tensor, or dicts/lists/tuples of them), in order."""
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [t for v in batch.values() for t in tensors_in(v)]
    if isinstance(batch, (list, tuple)):
        return [t for v in batch for t in tensors_in(v)]
    return []


def validate_batch(batch: Any, index: int) -> None:
    """Refuse batches with no elements or non-finite floats, naming the batch."""
    tensors = tensors_in(batch)
    if not tensors:
        raise ValueError(f"calibration batch {index} holds no tensors (got {type(batch).__name__})")
    for t in tensors:
        if t.numel() == 0:
            raise ValueError(f"calibration batch {index} has an empty tensor of shape {tuple(t.shape)}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"calibration batch {index} contains {bad} NaN/Inf values; clean the data first")


def iter_batches(calib_data: Any, batch_size: int = 8) -> Iterator[Any]:
    """Yield validated batches.

    A Tensor is split along dim 0 into batches of ``batch_size``; a list/tuple of Tensors of equal
    shape is treated as samples and stacked the same way; any other iterable (a DataLoader, a list
    of tuples or dicts) is taken batch by batch as it comes.
    """
    if calib_data is None:
        raise ValueError("calibration data is required (got None)")
    if isinstance(calib_data, torch.Tensor):
        if calib_data.dim() == 0 or calib_data.shape[0] == 0:
            raise ValueError(f"calibration data is empty (tensor of shape {tuple(calib_data.shape)})")
        batches: Iterable[Any] = calib_data.split(batch_size)
    elif (
        isinstance(calib_data, (list, tuple))
        and calib_data
        and all(isinstance(t, torch.Tensor) for t in calib_data)
        and len({tuple(t.shape) for t in calib_data}) == 1
        and calib_data[0].dim() == 3  # single images C, H, W: stack into batches
    ):
        batches = torch.stack(list(calib_data)).split(batch_size)
    else:
        batches = calib_data
    n = 0
    for i, batch in enumerate(batches):
        validate_batch(batch, i)
        n += 1
        yield batch
    if n == 0:
        raise ValueError("calibration data is empty: it yielded no batches")


def run_model(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on a batch: a Tensor positionally, a tuple/list unpacked, a dict as kwargs."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(*batch)
    return model(batch)


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters live (CPU for a parameterless model)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def batch_to(batch: Any, device: torch.device | str) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: batch_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(batch_to(v, device) for v in batch)
    return batch
