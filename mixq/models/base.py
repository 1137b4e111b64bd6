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

from ..modules import find_linears
from ..scores.outputs import mask_probs, saliency_probs, softmax_probs  # output_fn(model, batch) -> probs [B, D]

__all__ = ["ModelAdapter", "ModelDescription", "mask_probs", "saliency_probs", "softmax_probs"]


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
        """True for the ``nn.Linear`` layers this family quantizes (pass as ``quantize_(..., filter_fn=...)``)."""

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

        return find_linears(model, self.quant_filter)
