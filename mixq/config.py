"""What ``quantize_`` does, as data: :class:`QuantConfig` and its parts.

``QuantConfig(linear=LinearConfig(...), attention=AttentionConfig(...) | None,
calibration=CalibrationConfig(...), backend=None, simulate=False)``. Each part is a frozen dataclass
with a ``VERSION`` and a JSON-ready dict form (``to_dict`` / ``from_dict``, nested for the parts), so
a checkpoint records the config that built its model and a later mixq reads it back: a dict of an
older version is migrated, one of a newer version or with an unknown key is refused, naming it.
Adding a part (say ``rotation: RotationConfig | None = None``) is a field here plus a VERSION bump;
the dict code finds the parts from the type hints.

``filter_fn`` is not part of the config: a callable cannot be recorded. It is an argument of
``quantize_``.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Optional, TypeVar

from . import __version__, formats
from .nn import ACT_MODES, WEIGHT_METHODS

__all__ = ["AttentionConfig", "CalibrationConfig", "ConfigBase", "LinearConfig", "QuantConfig", "RotationConfig"]

C = TypeVar("C", bound="ConfigBase")


class ConfigBase:
    """The dict form and the keyword check every config part shares.

    ``VERSION`` is the version of the part's dict form; ``_MIGRATIONS[v]`` turns a version-``v``
    dict (without its "version" key) into a version ``v + 1`` one. ``_MOVED`` maps keywords that
    are not (or no longer) this part's to what to write instead, for the error message.
    """

    VERSION: ClassVar[int] = 1
    _MIGRATIONS: ClassVar[dict[int, Callable[[dict], dict]]] = {}
    _MOVED: ClassVar[dict[str, str]] = {}

    def __new__(cls, *args: Any, **kwargs: Any):
        # Runs before the dataclass __init__, so a wrong keyword gets a message that says what to write.
        unknown = [k for k in kwargs if k not in _field_names(cls)]
        if unknown:
            raise TypeError(_unknown_message(cls, unknown, "keyword"))
        return super().__new__(cls)

    def to_dict(self) -> dict[str, Any]:
        """``{"version": VERSION, <field>: value, ...}`` in JSON types: parts as nested dicts,
        tuples as lists. :meth:`from_dict` gives an equal config back."""
        return {"version": self.VERSION, **{f.name: _plain(getattr(self, f.name)) for f in fields(self)}}

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """The config a :meth:`to_dict` dict describes. A missing key takes its default; a missing
        "version" means this version (a hand-written dict)."""
        if not isinstance(data, Mapping):
            raise TypeError(f"{cls.__name__}.from_dict takes a dict (what to_dict() returns), got "
                            f"{type(data).__name__}")
        d = dict(data)
        version = d.pop("version", cls.VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"{cls.__name__} dict has version {version!r}; versions are whole numbers 1 to "
                             f"{cls.VERSION}")
        if version > cls.VERSION:
            raise ValueError(f"{cls.__name__} dict has version {version}, but this mixq ({__version__}) reads "
                             f"{cls.__name__} versions up to {cls.VERSION}: it was written by a newer mixq; "
                             "upgrade mixq to read it")
        for v in range(version, cls.VERSION):
            d = cls._MIGRATIONS[v](d)
        unknown = [k for k in d if k not in _field_names(cls)]
        if unknown:
            raise ValueError(_unknown_message(cls, unknown, "dict key"))
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in d.items():
            part = _part_type(hints[key])
            kwargs[key] = part.from_dict(value) if part is not None and value is not None else value
        return cls(**kwargs)


def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def _unknown_message(cls: type[ConfigBase], unknown: list[str], what: str) -> str:
    moved = [k for k in unknown if k in cls._MOVED]
    if len(unknown) == 1 and moved:
        hint = f"; write {cls._MOVED[moved[0]]} instead"
    else:
        hint = "".join(f"; for {k!r} write {cls._MOVED[k]}" for k in moved)
    return (f"{cls.__name__} has no {what}{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}{hint}. "
            f"{cls.__name__}'s {what}s: {', '.join(_field_names(cls))}")


def _part_type(hint: Any) -> Optional[type[ConfigBase]]:
    """The config part a field holds (``LinearConfig``, ``Optional[AttentionConfig]``), else None."""
    for t in typing.get_args(hint) or (hint,):
        if isinstance(t, type) and issubclass(t, ConfigBase):
            return t
    return None


def _plain(value: Any) -> Any:
    if isinstance(value, ConfigBase):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------- checks


def _check_bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be True or False, got {value!r}")
    return value


def _check_int(value: Any, what: str, least: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be a whole number, got {value!r}")
    if least is not None and value < least:
        raise ValueError(f"{what} must be >= {least}, got {value}")
    return value


def _check_optional_bits(value: Any, what: str) -> Optional[int]:
    return None if value is None else formats.check_bits(value, what)


def _check_names(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{what} must be a tuple of module names or fnmatch patterns, e.g. ('head',), got {value!r}")
    return tuple(value)


def _check_pairs(value: Any, what: str, check: Callable[[str, tuple[int, int]], None]) -> dict[str, tuple[int, int]]:
    """A copy of ``value`` (name -> bit pair) with tuple pairs; ``check(name, pair)`` validates each."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a dict of module name -> (bits, bits), got {type(value).__name__}")
    out = {}
    for name, bits in value.items():
        if not isinstance(name, str):
            raise TypeError(f"{what} keys must be module names (str), got {name!r}")
        if not (isinstance(bits, (tuple, list)) and len(bits) == 2):
            raise ValueError(f"{what}[{name!r}] must be a pair of bit-widths, got {bits!r}")
        pair = (bits[0], bits[1])
        check(name, pair)
        out[name] = (int(pair[0]), int(pair[1]))
    return out


def _set(obj: Any, **values: Any) -> None:
    """Store normalized values on a frozen dataclass (in ``__post_init__`` only)."""
    for k, v in values.items():
        object.__setattr__(obj, k, v)


# ----------------------------------------------------------------------------- the parts


@dataclass(frozen=True)
class LinearConfig(ConfigBase):
    """How the Linears are quantized.

    Every selected Linear (``quantize_``'s ``filter_fn``, minus the names or fnmatch patterns in
    ``skip``) runs at (``w_bits``, ``a_bits``) unless ``layer_bits`` names it with its own pair;
    with ``layer_bits_only=True`` ``layer_bits`` is the complete list and every Linear it does not
    name stays float (what :meth:`mixq.alloc.Plan.to_config` sets). ``act_quant="auto"`` is
    ``"smooth"``: calibrated channel factors (``smooth_alpha``) move activation outliers into the
    weight columns and a dynamic per-token step quantizes what is left, which holds up at 4-6 bits
    and on images unlike the calibration set (static ranges do not: docs/DESIGN_NOTES.md).
    ``fold_layernorm`` folds a LayerNorm that feeds only one such Linear into it: the channel factors
    go into its gamma and beta (smooth), or the norm runs inside the quantize kernel (channel).
    ``weight_method="auto"`` is GPTQ when calibration data is given, else round-to-nearest.
    """

    VERSION: ClassVar[int] = 1

    w_bits: int = 8
    a_bits: int = 8
    layer_bits: dict[str, tuple[int, int]] = field(default_factory=dict)
    layer_bits_only: bool = False
    skip: tuple[str, ...] = ()
    act_quant: str = "auto"
    smooth_alpha: float = 0.5
    weight_method: str = "auto"
    fold_layernorm: bool = False

    def __post_init__(self) -> None:
        formats.check_bits(self.w_bits, "w_bits")
        formats.check_bits(self.a_bits, "a_bits")

        def check(name: str, bits: tuple[int, int]) -> None:
            formats.check_bits(bits[0], f"w_bits of layer {name!r}")
            formats.check_bits(bits[1], f"a_bits of layer {name!r}")

        layer_bits = _check_pairs(self.layer_bits, "layer_bits", check)
        _check_bool(self.layer_bits_only, "layer_bits_only")
        if self.layer_bits_only and not layer_bits:
            raise ValueError("layer_bits_only=True with an empty layer_bits would quantize nothing; name the "
                             "layers in layer_bits, or set layer_bits_only=False")
        if self.act_quant not in ACT_MODES + ("auto",):
            raise ValueError(f"unknown act_quant={self.act_quant!r}; allowed: {list(ACT_MODES + ('auto',))}")
        if isinstance(self.smooth_alpha, bool) or not isinstance(self.smooth_alpha, (int, float)) \
                or not 0.0 <= self.smooth_alpha <= 1.0:
            raise ValueError(f"smooth_alpha must be a number in [0, 1], got {self.smooth_alpha!r}")
        if self.weight_method not in WEIGHT_METHODS + ("auto",):
            raise ValueError(f"unknown weight_method={self.weight_method!r}; allowed: "
                             f"{list(WEIGHT_METHODS + ('auto',))}")
        _check_bool(self.fold_layernorm, "fold_layernorm")
        _set(self, layer_bits=layer_bits, skip=_check_names(self.skip, "LinearConfig.skip"),
             smooth_alpha=float(self.smooth_alpha))

    def bits_for(self, name: str) -> tuple[int, int]:
        """(w_bits, a_bits) of Linear ``name``."""
        return self.layer_bits.get(name, (self.w_bits, self.a_bits))


@dataclass(frozen=True)
class AttentionConfig(ConfigBase):
    """Quantize the attention matmuls (QK^T, softmax.V) of every supported attention module too;
    a ``QuantConfig`` without one leaves them float.

    Q and K codes at ``qk_bits`` (default: the Linears' ``a_bits``), V codes at ``v_bits`` (default
    ``qk_bits``), softmax probability codes at ``p_bits`` (default ``v_bits``) on the ``p_grid``
    grid ("log2" or "uniform"). ``layer_bits`` gives per-matmul bits instead (what an allocation
    plan's :meth:`~mixq.alloc.Plan.to_config` sets), keyed like the plan's layers:
    ``"<attention module>.qk": (Q bits, K bits)`` (equal: Q and K share one step rule) and
    ``"<attention module>.pv": (P bits, V bits)``. When it is given it is the complete list: a
    matmul it does not name stays float, and an attention module with neither entry is left as it
    is. ``skip`` lists attention modules (names or fnmatch patterns) kept float.
    """

    VERSION: ClassVar[int] = 1
    _MOVED: ClassVar[dict[str, str]] = {
        "attn_bits": "AttentionConfig(qk_bits=...)", "pv_bits": "AttentionConfig(v_bits=...)",
        "softmax_bits": "AttentionConfig(p_bits=...)", "softmax_quant": "AttentionConfig(p_grid=...)"}

    qk_bits: Optional[int] = None
    v_bits: Optional[int] = None
    p_bits: Optional[int] = None
    p_grid: str = "log2"
    layer_bits: dict[str, tuple[int, int]] = field(default_factory=dict)
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("qk_bits", "v_bits", "p_bits"):
            _check_optional_bits(getattr(self, name), name)
        formats.check_p_grid(self.p_grid)
        _set(self, layer_bits=_check_pairs(self.layer_bits, "AttentionConfig.layer_bits", _check_matmul_bits),
             skip=_check_names(self.skip, "AttentionConfig.skip"))

    def bits(self, a_bits: int) -> tuple[int, int, int]:
        """(qk_bits, v_bits, p_bits) with the defaults filled in; ``a_bits`` is the Linears' a_bits."""
        qk = self.qk_bits if self.qk_bits is not None else a_bits
        v = self.v_bits if self.v_bits is not None else qk
        return qk, v, self.p_bits if self.p_bits is not None else v


def _check_matmul_bits(name: str, bits: tuple[int, int]) -> None:
    module, _, op = name.rpartition(".")
    if not module or op not in ("qk", "pv"):
        raise ValueError(f"AttentionConfig.layer_bits key {name!r} does not name an attention matmul: use "
                         "'<attention module>.qk' (Q, K bits) or '<attention module>.pv' (P, V bits)")
    first, second = ("Q", "K") if op == "qk" else ("P", "V")
    formats.check_bits(bits[0], f"{first} bits of {name!r}")
    formats.check_bits(bits[1], f"{second} bits of {name!r}")
    if op == "qk" and bits[0] != bits[1]:
        raise ValueError(f"AttentionConfig.layer_bits[{name!r}] = {tuple(bits)}: Q and K share one bit-width "
                         "(one dynamic step rule for both), so the pair must be equal, e.g. (6, 6)")


@dataclass(frozen=True)
class CalibrationConfig(ConfigBase):
    """How calibration samples activations: at most ``max_calib_rows`` input rows per Linear (a
    uniform sample drawn with ``seed``), the calibration data run ``batch_size`` items at a time."""

    VERSION: ClassVar[int] = 1

    max_calib_rows: int = 2048
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int(self.max_calib_rows, "max_calib_rows", 1)
        _check_int(self.batch_size, "batch_size", 1)
        _check_int(self.seed, "seed")


@dataclass(frozen=True)
class RotationConfig(ConfigBase):
    """Rotate the input space of the quantized Linears by a randomized Hadamard transform
    (:mod:`mixq.rotation`) before their activation quantize: outliers spread over the Hadamard
    block, the weights take W R^T offline, the transform runs online (one cheap op per input).

    Every quantized Linear is rotated unless ``skip`` (names or fnmatch patterns) lists it; with
    ``layers`` given, only the Linears it matches are. The random signs of the i-th quantized Linear
    (in model order) are drawn from ``seed + i``. Needs act_quant "smooth" (auto) or "dynamic".
    """

    VERSION: ClassVar[int] = 1

    seed: int = 0
    layers: Optional[tuple[str, ...]] = None
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_int(self.seed, "RotationConfig.seed")
        layers = None if self.layers is None else _check_names(self.layers, "RotationConfig.layers")
        _set(self, layers=layers, skip=_check_names(self.skip, "RotationConfig.skip"))

    def rotates(self, name: str) -> bool:
        """True when Linear ``name`` is rotated under this config."""
        import fnmatch

        if any(fnmatch.fnmatchcase(name, p) for p in self.skip):
            return False
        return self.layers is None or any(fnmatch.fnmatchcase(name, p) for p in self.layers)


_LINEAR_FIELDS = ("w_bits", "a_bits", "layer_bits", "skip", "act_quant", "smooth_alpha", "weight_method",
                  "fold_layernorm")


@dataclass(frozen=True)
class QuantConfig(ConfigBase):
    """What :func:`mixq.quantize_` quantizes and how: the Linears (``linear``), optionally the
    attention matmuls (``attention``; None: they stay float), the calibration sampling
    (``calibration``), the input rotations (``rotation``; None: none), and how the result runs: ``backend`` (None: the fastest for the device) and
    ``simulate`` (float simulation instead of the integer kernels, bit-identical).

    ``quantize_`` sets ``model.mixq_config`` to the config it used and :func:`mixq.save` records it
    (``to_dict``), so :func:`mixq.load` gives it back.
    """

    VERSION: ClassVar[int] = 2
    # 1 -> 2: the rotation part (absent in version 1: no rotation, its default).
    _MIGRATIONS: ClassVar[dict[int, Callable[[dict], dict]]] = {1: lambda d: d}
    _MOVED: ClassVar[dict[str, str]] = {
        **{k: f"QuantConfig(linear=LinearConfig({k}=...))" for k in _LINEAR_FIELDS},
        **{k: f"QuantConfig(calibration=CalibrationConfig({k}=...))" for k in ("max_calib_rows", "batch_size", "seed")},
        "quantize_attention": "QuantConfig(attention=AttentionConfig()) (an attention part turns it on)",
        "attn_bits": "QuantConfig(attention=AttentionConfig(qk_bits=...))",
        "softmax_bits": "QuantConfig(attention=AttentionConfig(p_bits=...))",
        "softmax_quant": "QuantConfig(attention=AttentionConfig(p_grid=...))",
        "attention_layer_bits": "QuantConfig(attention=AttentionConfig(layer_bits=...))",
        "filter_fn": "quantize_(model, config, calib_data, filter_fn=...) (a callable is not part of the config)",
    }

    linear: LinearConfig = field(default_factory=LinearConfig)
    attention: Optional[AttentionConfig] = None
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    backend: Optional[str] = None
    simulate: bool = False
    rotation: Optional[RotationConfig] = None

    def __post_init__(self) -> None:
        for name, cls, optional in (("linear", LinearConfig, False), ("attention", AttentionConfig, True),
                                    ("calibration", CalibrationConfig, False), ("rotation", RotationConfig, True)):
            value = getattr(self, name)
            if not (isinstance(value, cls) or (optional and value is None)):
                hint = (" (QuantConfig(8, 8) is now QuantConfig(LinearConfig(8, 8)), or "
                        "QuantConfig(linear=LinearConfig(w_bits=8, a_bits=8)))") if name == "linear" else ""
                raise TypeError(f"QuantConfig.{name} must be a {cls.__name__}{' or None' if optional else ''}, "
                                f"got {value!r}{hint}")
        if self.backend is not None and not isinstance(self.backend, str):
            raise TypeError(f"backend must be a backend name (str) or None, got {self.backend!r}")
        _check_bool(self.simulate, "simulate")
