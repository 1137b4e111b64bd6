"""Disk cache for scores, keyed by model weights + calibration data + score parameters.

Scores take many forward passes; the cache makes reruns (a new budget, a new lambda) free. Files are
JSON in ``$MIXQ_CACHE_DIR`` (default ``~/.cache/mixq/scores``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from ..data import iter_batches, tensors_in

CacheDir = Union[str, Path, None, bool]


def cache_root(cache_dir: CacheDir = None) -> Optional[Path]:
    """Where scores are cached; ``False`` turns caching off."""
    if cache_dir is False:
        return None
    if cache_dir is None or cache_dir is True:
        cache_dir = os.environ.get("MIXQ_CACHE_DIR") or Path.home() / ".cache" / "mixq" / "scores"
    return Path(cache_dir)


def _digest_tensor(h: "hashlib._Hash", t: torch.Tensor) -> None:
    t = t.detach()
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    if t.numel():
        f = t.reshape(-1).to("cpu", torch.float64)
        step = max(1, f.numel() // 4096)
        h.update(f[::step].numpy().tobytes())  # a strided sample of the values
        h.update(repr((float(f.sum()), float(f.abs().sum()))).encode())


def callable_key(fn: Any) -> str:
    """What identifies an ``output_fn`` in a cache key: module, qualified name and a hash of its code,
    constants and closure (two different lambdas must not share scores; a bound method adds its
    class; a ``functools.partial`` its function and arguments)."""
    import functools

    if isinstance(fn, functools.partial):
        return f"partial({callable_key(fn.func)}, {fn.args!r}, {sorted(fn.keywords.items())!r})"
    owner = getattr(fn, "__self__", None)
    func = getattr(fn, "__func__", fn)
    name = f"{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', type(func).__qualname__)}"
    if owner is not None:
        name += f"@{type(owner).__qualname__}"
    code = getattr(func, "__code__", None)
    if code is None:
        return name
    h = hashlib.sha256(code.co_code)
    h.update(repr(code.co_consts).encode())
    for cell in getattr(func, "__closure__", None) or ():
        try:
            h.update(repr(cell.cell_contents).encode())
        except ValueError:  # an empty cell
            pass
    return f"{name}#{h.hexdigest()[:16]}"


def fingerprint(model: nn.Module, calib_data: Any, params: dict) -> str:
    """A hash of the model's module tree (types and their settings), its state_dict (names, shapes,
    sampled values, sums), the data and params."""
    h = hashlib.sha256()
    for name, m in model.named_modules():
        h.update(f"{name}|{type(m).__module__}.{type(m).__qualname__}|{m.extra_repr()}\n".encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        if isinstance(t, torch.Tensor):
            _digest_tensor(h, t)
    for batch in iter_batches(calib_data):
        for t in tensors_in(batch):
            _digest_tensor(h, t)
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def load(root: Optional[Path], kind: str, key: str) -> Optional[dict]:
    if root is None:
        return None
    path = root / f"{kind}-{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def store(root: Optional[Path], kind: str, key: str, value: dict) -> None:
    if root is None:
        return
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{kind}-{key}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)


def cached(cache_dir: CacheDir, kind: str, model: nn.Module, calib_data: Any, params: dict,
           compute: Callable[[], dict]) -> dict:
    """``compute()`` (run with the model in eval mode) unless a result for this model, data and params
    is on disk; the result is stored for the next run."""
    root = cache_root(cache_dir)
    key = fingerprint(model, calib_data, params) if root is not None else ""
    hit = load(root, kind, key)
    if hit is not None:
        return hit
    was_training = model.training
    model.eval()
    try:
        result = compute()
    finally:
        model.train(was_training)
    store(root, kind, key, result)
    return result
