"""Checkpoints: safetensors files holding the whole quantized model (packed integers, scales,
float parts) plus JSON metadata (format version, per-layer config, the QuantConfig that built the
model, model spec, checksum).

Loading validates everything (version, layer config, every tensor name, shape, dtype, checksum)
before the model is touched, so a bad file never leaves a half-loaded model behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from . import __version__
from .attention import ATTENTION_OPS, QUANT_ATTENTION_CLASSES, QuantAttention, quantized_attention
from .config import QuantConfig
from .data import model_device
from .modules import quantized_layers, set_module
from .nn import QuantLinear

FORMAT_NAME = "mixq"
# 2: the checksum covers the header metadata too (version 1 covered the tensors only; still read).
# 3: version 2 plus an "attention" entry (quantized attention modules: kind and config). A model
#    without quantized attention is still written as version 2, so older mixq reads it; a version-3
#    file stops an older mixq from loading the attention as float.
# Either may hold a "config" entry (QuantConfig.to_dict() of the config that built the model): an
# addition older readers ignore, so it needs no new version.
FORMAT_VERSION = 2
ATTENTION_FORMAT_VERSION = 3
READABLE_VERSIONS = ("1", "2", "3")
_ATTENTION_CONFIG_KEYS = ("ops", "qk_bits", "v_bits", "p_bits", "p_grid")

# Old files, today's names. read() renames the keys of every record it returns, so load, the report
# and anyone reading the metadata see one set of names. Per QuantLinear record ("layers"):
_LAYER_KEY_RENAMES = {"fused_norm": "folded_norm"}  # before the fold/fuse rename (format 1)
# Per quantized-attention record ("attention" -> config), before the one-name-per-concept rename:
_ATTENTION_KEY_RENAMES = {"pv_bits": "v_bits", "softmax_bits": "p_bits", "softmax_quant": "p_grid"}


class CheckpointError(ValueError):
    """A checkpoint file that is corrupt, truncated, of another version, or not for this model."""


def _digest(tensors: dict[str, torch.Tensor], meta: Optional[dict[str, str]] = None) -> str:
    """SHA-256 over every tensor (name, dtype, shape, bytes) and, from version 2, every metadata entry
    but the checksum itself: a header edited to say a_bits 4 where the weights were saved for 8 fails."""
    h = hashlib.sha256()
    for key in sorted(meta or {}):
        if key != "sha256":
            h.update(json.dumps([key, meta[key]]).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def layer_configs(model: nn.Module) -> dict[str, dict]:
    return {n: m.layer_config() for n, m in quantized_layers(model).items()}


def attention_configs(model: nn.Module) -> dict[str, dict]:
    """Per quantized attention module: its kind (which float class it wraps) and its layer_config()."""
    return {n: {"kind": m.kind, "config": m.layer_config()} for n, m in quantized_attention(model).items()}


def save(
    model: nn.Module,
    path: str | os.PathLike,
    model_spec: Optional[str] = None,
    extra: Optional[dict[str, Any]] = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (quantized in place by :func:`mixq.quantize_`) to a safetensors file.

    ``model_spec`` (e.g. ``"dinov2-s"``) lets :func:`load` rebuild the architecture without a
    skeleton. The config that built the model (``model.mixq_config``, set by ``quantize_``) is
    recorded when there is one. An existing file is refused unless ``overwrite``; the write is atomic.
    """
    path = Path(path)
    if path.exists() and not overwrite:  # early and friendly; the exclusive link below is the real check
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    attention = attention_configs(model)
    layers = layer_configs(model)
    if not layers:
        raise ValueError("the model has no QuantLinear layer: quantize it with mixq.quantize_ before saving")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT_NAME,
        "format_version": str(ATTENTION_FORMAT_VERSION if attention else FORMAT_VERSION),
        "mixq_version": __version__,
        "layers": json.dumps(layers, sort_keys=True),
        "model_spec": model_spec or "",
        "extra": json.dumps(extra or {}, sort_keys=True),
    }
    if attention:
        meta["attention"] = json.dumps(attention, sort_keys=True)
    config = getattr(model, "mixq_config", None)
    if isinstance(config, QuantConfig):
        meta["config"] = json.dumps(config.to_dict(), sort_keys=True)
    meta["sha256"] = _digest(tensors, meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    _publish(_serialize(tensors, meta), path, overwrite)
    return path


def _serialize(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata=meta)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)


def _publish(data: bytes, path: Path, overwrite: bool) -> None:
    """Make ``data`` appear at ``path`` whole or not at all.

    Without ``overwrite`` the file is linked into place, which fails if anything is there (two saves
    to one path: exactly one wins, the other gets FileExistsError). On Linux the data is written to an
    unnamed file (O_TMPFILE) first, so a save killed mid-write leaves nothing behind; elsewhere a
    named temporary file is removed on any exception.
    """
    try:
        fd = os.open(path.parent, os.O_TMPFILE | os.O_WRONLY, 0o644)
    except (AttributeError, OSError):  # no O_TMPFILE (not Linux, or the file system lacks it)
        fd = None
    if fd is not None:
        fd_dir = -1
        try:
            _write_all(fd, data)
            # linkat(AT_SYMLINK_FOLLOW) on /proc/self/fd/N names the unnamed file (a dir fd forces linkat).
            fd_dir = os.open("/proc/self/fd", os.O_RDONLY)
            if not overwrite:
                os.link(str(fd), path, src_dir_fd=fd_dir, follow_symlinks=True)
                return
            tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
            os.link(str(fd), tmp, src_dir_fd=fd_dir, follow_symlinks=True)
            os.replace(tmp, path)
        finally:
            os.close(fd)
            if fd_dir >= 0:
                os.close(fd_dir)
        return
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        _write_all(fd, data)
        os.close(fd)
        fd = -1
        if overwrite:
            os.replace(tmp_name, path)
        else:
            os.link(tmp_name, path)
    finally:
        if fd >= 0:
            os.close(fd)
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify a checkpoint: (tensors, metadata with 'layers', 'attention' and 'extra' decoded
    and in today's names, 'config' a QuantConfig or None)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist or is not a file")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from e
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is a safetensors file but not a mixq checkpoint (no mixq metadata)")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path} has mixq checkpoint format version {version}; this mixq ({__version__}) reads versions "
            f"{', '.join(READABLE_VERSIONS)}"
        )
    if _digest(tensors, meta if version != "1" else None) != meta.get("sha256"):
        raise CheckpointError(f"{path} is corrupt: its tensors or header metadata do not match the stored checksum")
    if version == "1":
        warnings.warn(f"mixq: {path} is a version-1 checkpoint, whose checksum does not cover its header; "
                      "save it again to protect the layer configs", stacklevel=2)
    try:
        meta["layers"] = json.loads(meta["layers"])
        meta["extra"] = json.loads(meta.get("extra") or "{}")
        meta["attention"] = json.loads(meta.get("attention") or "{}")
        config = json.loads(meta.get("config") or "null")
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} has unreadable layer metadata: {e}") from e
    if not isinstance(meta["layers"], dict):
        raise CheckpointError(f"{path} has unreadable layer metadata: 'layers' must map names to records")
    if meta["attention"] and version != str(ATTENTION_FORMAT_VERSION):
        raise CheckpointError(f"{path} is a version-{version} checkpoint with an 'attention' entry, which only "
                              f"version {ATTENTION_FORMAT_VERSION} has")
    try:
        meta["config"] = None if config is None else QuantConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path} records a QuantConfig this mixq ({__version__}) cannot read: {e}") from e
    _upgrade(path, tensors, meta)
    return tensors, meta


def _upgrade(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Give a file written by an earlier mixq today's names, in place: the one place that knows the
    old names (record keys through the tables above; a renamed buffer's tensor keys belong here too,
    so load and its checks see only today's)."""
    meta["layers"] = {n: _renamed(path, f"layer {n!r}", c, _LAYER_KEY_RENAMES) for n, c in meta["layers"].items()}
    if isinstance(meta["attention"], dict):
        for name, rec in meta["attention"].items():
            if isinstance(rec, dict) and "config" in rec:
                rec["config"] = _renamed(path, f"attention {name!r}", rec["config"], _ATTENTION_KEY_RENAMES)


def _renamed(path: Path, what: str, record: Any, renames: dict[str, str]) -> Any:
    """``record`` with its old keys under today's names (a non-dict is left for the validators)."""
    if not isinstance(record, dict):
        return record
    both = [(old, new) for old, new in renames.items() if old in record and new in record]
    if both:
        raise CheckpointError(f"{path}: {what} has both {both[0][0]!r} and {both[0][1]!r}, the old and the new "
                              "name of one entry")
    return {renames.get(k, k): v for k, v in record.items()}


def load(path: str | os.PathLike, model: Optional[nn.Module] = None) -> nn.Module:
    """Load a checkpoint into ``model`` (the float architecture it was quantized from).

    Without ``model``, the architecture is rebuilt from the checkpoint's model spec through
    :func:`mixq.models.get_adapter`. Returns the model, quantized and loaded, with
    ``model.mixq_config`` the recorded QuantConfig (None if the file records none).
    """
    tensors, meta = read(path)
    if model is None:
        spec = meta.get("model_spec")
        if not spec:
            raise ValueError(f"{path} records no model spec; pass the float model to load(path, model)")
        from .models import get_adapter

        model = get_adapter(spec).build()
    modules = dict(model.named_modules())
    shells = {name: _layer_shell(name, cfg, modules) for name, cfg in meta["layers"].items()}
    attention = _check_attention(meta["attention"], model)
    folded_norms = {s.norm_module for s in shells.values() if s.norm_module}
    expected: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        owner = next((n for n in list(shells) + sorted(folded_norms) if key.startswith(n + ".")), None)
        if owner is None:
            expected[key] = t
    legacy: set[str] = set()  # buffers older files hold that QuantLinear now derives (checked when it loads them)
    for name, shell in shells.items():
        for key, t in shell.state_dict().items():
            expected[f"{name}.{key}"] = t
        legacy.update(f"{name}.{key}" for key in QuantLinear.LEGACY_BUFFERS)
    for key in sorted(set(expected) | set(tensors)):
        if key not in tensors:
            raise CheckpointError(f"checkpoint is missing tensor {key!r} that the model needs")
        if key in legacy and key not in expected:
            continue
        if key not in expected:
            raise CheckpointError(f"checkpoint has tensor {key!r} that the model does not have")
        a, b = tensors[key], expected[key]
        if a.shape != b.shape or a.dtype != b.dtype:
            raise CheckpointError(
                f"tensor {key!r}: checkpoint has {a.dtype} {tuple(a.shape)}, model expects {b.dtype} {tuple(b.shape)}"
            )
    for name, shell in shells.items():  # the shells are not in the model yet: loading them checks legacy buffers
        try:
            shell.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")})
        except (ValueError, RuntimeError) as e:
            raise CheckpointError(f"layer {name!r}: {e}") from e
    # Everything checked: now mutate.
    device = model_device(model)
    for name in folded_norms:
        set_module(model, name, nn.Identity())
    for name, shell in shells.items():
        set_module(model, name, shell)
    for name, (cls, kwargs) in attention.items():  # after the shells: the wrapper adopts the quantized Linears
        set_module(model, name, cls(model.get_submodule(name), **kwargs))
    model.load_state_dict(tensors, strict=True)
    model.mixq_config = meta["config"]
    return model.to(device)


def _layer_shell(name: str, cfg: Any, modules: dict[str, nn.Module]) -> QuantLinear:
    """An empty QuantLinear for layer ``name``'s record (today's keys: :func:`read` renamed old
    ones), checked against the float module it replaces; load_state_dict fills it."""
    cur = modules.get(name)
    if not isinstance(cur, nn.Linear):
        found = "missing" if cur is None else type(cur).__name__
        raise CheckpointError(f"checkpoint layer {name!r} is a quantized Linear but the model has {found} there")
    try:
        if (cur.in_features, cur.out_features) != (cfg["in_features"], cfg["out_features"]):
            raise CheckpointError(f"layer {name!r}: checkpoint has {cfg['in_features']}->{cfg['out_features']}, "
                                  f"model has {cur.in_features}->{cur.out_features}")
        shell = QuantLinear(cfg["in_features"], cfg["out_features"], cfg["bias"], cfg["w_bits"], cfg["a_bits"],
                            cfg["act_quant"], device="cpu", folded_norm=cfg.get("folded_norm", False),
                            norm_eps=cfg.get("norm_eps", 1e-5), input_prescaled=cfg.get("input_prescaled", False),
                            rotated=cfg.get("rotated", False))
    except CheckpointError:
        raise
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"layer {name!r} has an invalid config {cfg}: {e}") from e
    shell.norm_module = cfg.get("norm_module", "")
    if shell.norm_module and not isinstance(modules.get(shell.norm_module), (nn.LayerNorm, nn.Identity)):
        raise CheckpointError(f"layer {name!r} folded LayerNorm {shell.norm_module!r}, which the model lacks")
    return shell


def _check_attention(records: Any, model: nn.Module) -> dict[str, tuple[type[QuantAttention], dict]]:
    """Validate the checkpoint's quantized-attention records against the float ``model`` without
    touching it: name -> (quantized class, its constructor arguments)."""
    if not isinstance(records, dict):
        raise CheckpointError(f"the checkpoint's attention entry must map module names to records, got {records!r}")
    modules = dict(model.named_modules())
    out: dict[str, tuple[type[QuantAttention], dict]] = {}
    for name, rec in records.items():
        if not isinstance(rec, dict) or set(rec) != {"kind", "config"}:
            raise CheckpointError(f"attention {name!r}: record must be {{'kind', 'config'}}, got {rec!r}")
        kind, cfg = rec["kind"], rec["config"]
        cls = QUANT_ATTENTION_CLASSES.get(kind)
        if cls is None:
            raise CheckpointError(f"attention {name!r} has kind {kind!r}, which this mixq ({__version__}) does not "
                                  f"know; known kinds: {sorted(QUANT_ATTENTION_CLASSES)}")
        cur = modules.get(name)
        if cur is None:
            raise CheckpointError(f"checkpoint attention {name!r} ({kind}) is missing from the model")
        if not isinstance(cfg, dict) or set(cfg) != set(_ATTENTION_CONFIG_KEYS):
            raise CheckpointError(f"attention {name!r} has an invalid config {cfg!r}: keys must be "
                                  f"{list(_ATTENTION_CONFIG_KEYS)}")
        ops_ = cfg["ops"]
        if not isinstance(ops_, list) or not ops_ or any(op not in ATTENTION_OPS for op in ops_):
            raise CheckpointError(f"attention {name!r} has an invalid config {cfg!r}: ops must be a non-empty "
                                  f"subset of {list(ATTENTION_OPS)}")
        kwargs = dict(qk_bits=cfg["qk_bits"], v_bits=cfg["v_bits"], p_bits=cfg["p_bits"], p_grid=cfg["p_grid"],
                      float_ops=tuple(op for op in ATTENTION_OPS if op not in ops_))
        try:
            probe = cls(cur, **kwargs)  # references cur's submodules, changes nothing
        except NotImplementedError as e:
            raise CheckpointError(f"checkpoint attention {name!r} is {kind} ({cls._source_name}) but the model "
                                  f"has {type(cur).__module__}.{type(cur).__name__} there") from e
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"attention {name!r} has an invalid config {cfg!r}: {e}") from e
        if probe.layer_config() != cfg:
            raise CheckpointError(f"attention {name!r}: the recorded config {cfg!r} does not round-trip "
                                  f"(rebuilt: {probe.layer_config()!r})")
        out[name] = (cls, kwargs)
    return out
