"""Reading a user's checkpoint file and loading it strictly into an architecture.

A mismatch is the most common user error (wrong variant, wrong arch string, a detection
checkpoint given to a classifier), so the error names the first tensor that does not fit.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .pth/.pt/.bin (torch) or .safetensors file; unwraps {"model": ...}-style dicts."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix not in (".pth", ".pt", ".bin", ".ckpt"):
        raise ValueError(f"unsupported checkpoint type {path.suffix!r} for {path}; "
                         "allowed: .pth, .pt, .bin, .ckpt (torch) or .safetensors")
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in _WRAPPER_KEYS:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_checked(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Load ``state_dict`` strictly, naming the first missing, unexpected or mis-shaped tensor."""
    own = model.state_dict()
    for name, tensor in own.items():
        if name not in state_dict:
            if name.endswith("num_batches_tracked"):
                continue
            raise ValueError(f"{source} does not match the architecture: tensor {name!r} "
                             f"(shape {tuple(tensor.shape)}) is missing from the checkpoint")
        got = state_dict[name]
        if tuple(got.shape) != tuple(tensor.shape):
            raise ValueError(f"{source} does not match the architecture: tensor {name!r} has shape "
                             f"{tuple(got.shape)} in the checkpoint but the model expects {tuple(tensor.shape)}")
    extra = [n for n in state_dict if n not in own]
    if extra:
        raise ValueError(f"{source} does not match the architecture: unexpected tensor {extra[0]!r} "
                         f"({len(extra)} unexpected in all)")
    model.load_state_dict(state_dict, strict=False)
    return model
