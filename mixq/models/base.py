"""The model adapter interface: what mixq needs to know about a model family.

An adapter builds the float model from weights the user has on disk (never from a hub), says which
``nn.Linear`` layers are quantized and which stay float, turns the model's output into the
probability distribution the scorers compare (KL importance, sensitivity), and supplies the
preprocessed calibration images.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

try:  # the scorers' output helpers, output_fn(model, batch) -> probabilities [B, D]
    from mixq.scores.outputs import mask_probs, saliency_probs, softmax_probs
except ImportError:  # pragma: no cover - fallbacks computing the same distributions
    from mixq.data import run_model

    def softmax_probs(model: nn.Module, batch: Any) -> torch.Tensor:
        """Classifier logits [B, K] -> class probabilities [B, K]."""
        logits = run_model(model, batch).float()
        return torch.softmax(logits.reshape(logits.shape[0], -1), dim=-1)

    def mask_probs(model: nn.Module, batch: Any) -> torch.Tensor:
        """Mask logits [B, ..., H, W] -> per-pixel sigmoid, normalized over the pixels of an image."""
        p = torch.sigmoid(run_model(model, batch).float())
        p = p.reshape(p.shape[0], -1) + 1e-12
        return p / p.sum(dim=1, keepdim=True)

    def saliency_probs(model: nn.Module, batch: Any) -> torch.Tensor:
        """Saliency maps in [0, 1] [B, ..., H, W] -> normalized over the pixels of an image."""
        s = run_model(model, batch).float()
        s = s.reshape(s.shape[0], -1) + 1e-12
        return s / s.sum(dim=1, keepdim=True)


@dataclass
class ModelDescription:
    """What an adapter quantizes and what it keeps in float, for reports."""

    name: str
    family: str
    weights: str
    quantized: list[str]
    kept_float: list[str]
    calibration: str
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"model: {self.name} ({self.family}); weights: {self.weights}",
                 "quantized Linears: " + "; ".join(self.quantized),
                 "kept in float: " + "; ".join(self.kept_float),
                 f"calibration: {self.calibration}"]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


class ModelAdapter(ABC):
    """One model family. Subclasses set ``name`` and implement the abstract methods."""

    name: str = "model"

    @abstractmethod
    def build(self) -> nn.Module:
        """The float model in eval mode, weights loaded."""

    @abstractmethod
    def quant_filter(self, name: str, module: nn.Module) -> bool:
        """True for the ``nn.Linear`` layers this family quantizes (use as ``QuantConfig.filter_fn``)."""

    @abstractmethod
    def output_fn(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The model's output on ``batch`` as probabilities [B, D] (rows sum to 1) for the scorers."""

    @abstractmethod
    def calibration_batches(self, n: int = 32, seed: int = 0) -> Any:
        """``n`` preprocessed calibration inputs, ready for ``mixq.quantize_`` / ``run_model``."""

    @abstractmethod
    def describe(self) -> ModelDescription:
        """What is quantized, what stays float, where the weights and calibration images come from."""

    def quantizable_linears(self, model: nn.Module) -> dict[str, nn.Linear]:
        """The model's Linears that ``quant_filter`` accepts, by module name."""
        from mixq.quantize import find_linears

        return find_linears(model, self.quant_filter)
