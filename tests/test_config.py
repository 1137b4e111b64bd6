"""QuantConfig and its parts: the dict form round-trips and refuses what it cannot read, checkpoints
record the config that built the model, and the earlier flat call patterns fail saying what to write."""

import copy
import dataclasses
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import nn

import mixq
from mixq.alloc import Plan
from mixq.checkpoint import CheckpointError, _digest
from mixq.config import AttentionConfig, CalibrationConfig, ConfigBase, LinearConfig, QuantConfig
from mixq.quantize import quantize_
from test_quantize import TinyBlock, _data

FIXTURES = Path(__file__).resolve().parent / "fixtures"

FULL = QuantConfig(
    linear=LinearConfig(6, 8, layer_bits={"fc1": (4, 8)}, skip=("head",), act_quant="channel", smooth_alpha=0.25,
                        weight_method="rtn", fold_layernorm=True),
    attention=AttentionConfig(qk_bits=6, v_bits=8, p_bits=4, p_grid="uniform", layer_bits={"b.attn.pv": (4, 8)},
                              skip=("c.*",)),
    calibration=CalibrationConfig(max_calib_rows=64, batch_size=2, seed=3),
    backend="reference", simulate=True)


# ----------------------------------------------------------------------------- the dict form


@pytest.mark.parametrize("config", [QuantConfig(), FULL, QuantConfig(LinearConfig(4, 4), AttentionConfig())])
def test_to_dict_is_json_and_round_trips(config):
    d = config.to_dict()
    assert json.loads(json.dumps(d)) == d  # plain JSON types only: no tuples, no objects
    assert QuantConfig.from_dict(json.loads(json.dumps(d))) == config
    assert d["version"] == QuantConfig.VERSION and d["linear"]["version"] == LinearConfig.VERSION


def test_the_dict_form_is_nested_and_names_each_operand():
    d = FULL.to_dict()
    assert sorted(d) == ["attention", "backend", "calibration", "linear", "rotation", "simulate", "version"]
    assert d["attention"] == {"version": 1, "qk_bits": 6, "v_bits": 8, "p_bits": 4, "p_grid": "uniform",
                              "layer_bits": {"b.attn.pv": [4, 8]}, "skip": ["c.*"]}
    assert d["linear"]["layer_bits"] == {"fc1": [4, 8]} and QuantConfig().to_dict()["attention"] is None


def test_a_hand_written_dict_takes_defaults():
    config = QuantConfig.from_dict({"linear": {"w_bits": 4}, "attention": {}})
    assert config == QuantConfig(LinearConfig(w_bits=4), AttentionConfig())


@pytest.mark.parametrize("d, match", [
    ({"version": 3}, r"QuantConfig dict has version 3, but this mixq .* reads QuantConfig versions up to 2"),
    ({"linear": {"version": 9}}, r"LinearConfig dict has version 9.*newer mixq"),
    ({"version": 0}, "versions are whole numbers 1 to 2"),
    ({"version": "1"}, "versions are whole numbers"),
    ({"spin": None}, r"QuantConfig has no dict key 'spin'\. QuantConfig's dict keys: linear, attention"),
    ({"w_bits": 4}, r"no dict key 'w_bits'; write QuantConfig\(linear=LinearConfig\(w_bits=\.\.\.\)\)"),
    ({"linear": {"bits": 4}}, "LinearConfig has no dict key 'bits'"),
    ({"attention": {"softmax_quant": "log2"}}, r"write AttentionConfig\(p_grid=\.\.\.\)"),
])
def test_from_dict_refuses_newer_versions_and_unknown_keys(d, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig.from_dict(d)


def test_from_dict_refuses_values_with_the_constructors_errors():
    with pytest.raises(TypeError, match="takes a dict"):
        QuantConfig.from_dict([])
    with pytest.raises(TypeError, match="QuantConfig.linear must be a LinearConfig"):
        QuantConfig.from_dict({"linear": None})
    with pytest.raises(ValueError, match="unsupported w_bits=5"):
        QuantConfig.from_dict({"linear": {"w_bits": 5}})


@dataclass(frozen=True)
class _Renamed(ConfigBase):
    """A part at version 3 whose version 1 called ``bits`` ``width`` and whose version 2 lacked ``grid``."""

    VERSION: ClassVar[int] = 3
    _MIGRATIONS: ClassVar[dict] = {
        1: lambda d: {("bits" if k == "width" else k): v for k, v in d.items()},
        2: lambda d: {**d, "grid": "log2"},
    }
    bits: int = 8
    grid: str = "uniform"


def test_older_versions_migrate_step_by_step():
    assert _Renamed.from_dict({"version": 1, "width": 4}) == _Renamed(4, "log2")
    assert _Renamed.from_dict({"version": 2, "bits": 6}) == _Renamed(6, "log2")
    assert _Renamed.from_dict(_Renamed(6).to_dict()) == _Renamed(6, "uniform")


# ----------------------------------------------------------------------------- the constructors


@pytest.mark.parametrize("kwargs, match", [
    (dict(w_bits=4), r"QuantConfig has no keyword 'w_bits'; write QuantConfig\(linear=LinearConfig\(w_bits="),
    (dict(fold_layernorm=True), r"QuantConfig\(linear=LinearConfig\(fold_layernorm=\.\.\.\)\)"),
    (dict(max_calib_rows=64), r"QuantConfig\(calibration=CalibrationConfig\(max_calib_rows=\.\.\.\)\)"),
    (dict(filter_fn=None), r"quantize_\(model, config, calib_data, filter_fn=\.\.\.\)"),
    (dict(quantize_attention=True), r"QuantConfig\(attention=AttentionConfig\(\)\)"),
    (dict(attn_bits=6), r"AttentionConfig\(qk_bits=\.\.\.\)"),
    (dict(softmax_bits=6), r"AttentionConfig\(p_bits=\.\.\.\)"),
    (dict(softmax_quant="log2"), r"AttentionConfig\(p_grid=\.\.\.\)"),
    (dict(attention_layer_bits={}), r"AttentionConfig\(layer_bits=\.\.\.\)"),
    (dict(w_bits=4, a_bits=8), r"for 'w_bits' write .*; for 'a_bits' write QuantConfig\(linear=LinearConfig\(a_bits"),
])
def test_the_flat_config_fails_saying_what_to_write(kwargs, match):
    with pytest.raises(TypeError, match=match):
        QuantConfig(**kwargs)


def test_other_old_patterns_fail_saying_what_to_write():
    with pytest.raises(TypeError, match=r"QuantConfig\(8, 8\) is now QuantConfig\(LinearConfig\(8, 8\)\)"):
        QuantConfig(8, 8)
    for old, new in (("attn_bits", "qk_bits"), ("pv_bits", "v_bits"), ("softmax_bits", "p_bits"),
                     ("softmax_quant", "p_grid")):
        with pytest.raises(TypeError, match=rf"AttentionConfig\({new}=\.\.\.\)"):
            AttentionConfig(**{old: 8})
    plan = Plan(layers={"fc1": (4, 8)}, size_bits=0, weight_bits=0, weight_params=0, bops=0)
    with pytest.raises(TypeError, match=r"quantize_\(model, config, calib_data, filter_fn=\.\.\.\)"):
        plan.to_config(filter_fn=lambda n, m: True)
    with pytest.raises(TypeError, match=r"QuantConfig\(linear=LinearConfig\(fold_layernorm=\.\.\.\)\)"):
        plan.to_config(fold_layernorm=True)
    with pytest.raises(TypeError, match="positional"):  # the earlier quantize_(model, config, data, progress)
        quantize_(TinyBlock(), QuantConfig(), _data(), False)
    with pytest.raises(TypeError, match="filter_fn must be a callable"):
        quantize_(TinyBlock(), QuantConfig(), _data(), filter_fn="fc1")
    with pytest.raises(dataclasses.FrozenInstanceError):  # the earlier cli set config.fold_layernorm = ...
        QuantConfig().linear.fold_layernorm = True


@pytest.mark.parametrize("make, err, match", [
    (lambda: LinearConfig(skip="head"), TypeError, r"tuple of module names .* e\.g\. \('head',\)"),
    (lambda: AttentionConfig(skip=["a", 1]), TypeError, "AttentionConfig.skip must be a tuple"),
    (lambda: LinearConfig(layer_bits_only=True), ValueError, "would quantize nothing"),
    (lambda: LinearConfig(layer_bits={"fc1": 8}), ValueError, "pair of bit-widths"),
    (lambda: LinearConfig(fold_layernorm=1), TypeError, "fold_layernorm must be True or False"),
    (lambda: LinearConfig(smooth_alpha="0.5"), ValueError, "smooth_alpha must be a number"),
    (lambda: LinearConfig(act_quant="per_token"), ValueError, "unknown act_quant='per_token'"),
    (lambda: AttentionConfig(p_grid="log_sqrt2"), ValueError, r"unknown probability grid p_grid='log_sqrt2'; allowed: \['log2'"),
    (lambda: CalibrationConfig(max_calib_rows=0), ValueError, "max_calib_rows must be >= 1"),
    (lambda: CalibrationConfig(batch_size=2.0), TypeError, "batch_size must be a whole number"),
    (lambda: QuantConfig(simulate="yes"), TypeError, "simulate must be True or False"),
    (lambda: QuantConfig(backend=3), TypeError, "backend must be a backend name"),
    (lambda: QuantConfig(attention=True), TypeError, "QuantConfig.attention must be a AttentionConfig or None"),
])
def test_bad_values_are_refused_naming_the_field(make, err, match):
    with pytest.raises(err, match=match):
        make()


def test_values_are_normalized_so_equal_configs_compare_equal():
    a = LinearConfig(layer_bits={"fc1": [4, 8]}, skip=["head"], smooth_alpha=1)
    assert a == LinearConfig(layer_bits={"fc1": (4, 8)}, skip=("head",), smooth_alpha=1.0)
    assert AttentionConfig().bits(6) == (6, 6, 6) and AttentionConfig(v_bits=8).bits(4) == (4, 8, 8)
    assert AttentionConfig(qk_bits=8, p_bits=4).bits(6) == (8, 8, 4)


# ----------------------------------------------------------------------------- quantize_, plans, checkpoints


def _model():
    torch.manual_seed(0)
    return TinyBlock().eval()


def test_the_model_keeps_its_config_and_the_checkpoint_restores_it(tmp_path):
    config = QuantConfig(LinearConfig(6, 8, layer_bits={"fc2": (4, 6)}, skip=("head",), fold_layernorm=True),
                         calibration=CalibrationConfig(max_calib_rows=128, seed=5))
    q = quantize_(_model(), config, _data(), progress=False)
    assert q.mixq_config is config
    loaded = mixq.load(mixq.save(q, tmp_path / "m.safetensors"), _model())
    assert loaded.mixq_config == config
    x = _data(2)
    assert torch.equal(loaded(x), q(x))


def test_a_model_quantized_twice_records_no_single_config(tmp_path):
    q = quantize_(_model(), QuantConfig(LinearConfig(skip=("head",))), _data(), progress=False)
    quantize_(q, QuantConfig(LinearConfig(act_quant="dynamic")), _data(), filter_fn=lambda n, m: n == "head",
              progress=False)
    assert q.mixq_config is None
    path = mixq.save(q, tmp_path / "m.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert "config" not in f.metadata()
    assert mixq.load(path, _model()).mixq_config is None


def test_a_plan_config_records_its_layers_and_reloads_without_a_skeleton(tmp_path):
    adapter = mixq.models.get_adapter("toy-vit")
    fp = adapter.build().eval()
    linears = {n: (8, 8) for n, m in fp.named_modules() if isinstance(m, nn.Linear) and adapter.quant_filter(n, m)}
    linears["blocks.0.mlp.fc1"] = (4, 8)
    plan = Plan(layers=linears, size_bits=0, weight_bits=0, weight_params=0, bops=0)
    config = plan.to_config(linear=LinearConfig(act_quant="dynamic", weight_method="rtn"),
                            attention=AttentionConfig(qk_bits=6))  # uniform attention on planned Linears
    q = quantize_(copy.deepcopy(fp), config, progress=False)
    assert q.mixq_config.attention == AttentionConfig(qk_bits=6) and q.mixq_config.linear.layer_bits == linears
    loaded = mixq.load(mixq.save(q, tmp_path / "m.safetensors", model_spec="toy-vit"))
    assert loaded.mixq_config == config
    x = adapter.calibration_batches(2, seed=1)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


def test_old_files_load_with_no_recorded_config():
    for name in ("format2_smooth_mixed", "format3_attention"):
        assert mixq.load(FIXTURES / f"{name}.safetensors").mixq_config is None


def test_read_gives_an_old_format_3_file_todays_names():
    from mixq.checkpoint import read
    from mixq.report import rows_from_attention_configs

    _, meta = read(FIXTURES / "format3_attention.safetensors")  # written with pv_bits, softmax_bits, softmax_quant
    cfg = meta["attention"]["blocks.0.attn"]["config"]
    assert cfg == {"ops": ["qk", "pv"], "qk_bits": 6, "v_bits": 6, "p_bits": 8, "p_grid": "log2"}
    assert [r.label for r in rows_from_attention_configs(meta["attention"])] == ["Q6K6", "P8V6", "Q8K8", "P4V8"]


def _with_config(raw: bytes, config: dict) -> bytes:
    """The file with its "config" entry replaced and the checksum recomputed (well formed, edited)."""
    from safetensors.torch import load

    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    meta = header["__metadata__"]
    meta["config"] = json.dumps(config)
    meta["sha256"] = _digest(load(raw), meta)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    return struct.pack("<Q", len(new)) + new + raw[8 + n:]


def test_a_config_from_a_newer_mixq_is_refused_before_the_model_is_touched(tmp_path):
    q = quantize_(_model(), QuantConfig(), _data(), progress=False)
    raw = mixq.save(q, tmp_path / "m.safetensors").read_bytes()
    bad = tmp_path / "newer.safetensors"
    bad.write_bytes(_with_config(raw, {**QuantConfig().to_dict(), "version": 3, "spin": {}}))
    target = _model()
    with pytest.raises(CheckpointError, match=r"records a QuantConfig .* version 3.*upgrade mixq"):
        mixq.load(bad, target)
    assert not any(isinstance(m, mixq.QuantLinear) for m in target.modules())


def test_plan_json_from_before_the_rename_loads():
    plan = Plan(layers={"a.qk": (8, 8)}, size_bits=0, weight_bits=0, weight_params=0, bops=0,
                layer_info={"a.qk": {"op": "qk", "cost": 1.5}}, p_grid="uniform")
    d = json.loads(plan.to_json())
    assert d["p_grid"] == "uniform"
    d["softmax_quant"] = d.pop("p_grid")
    d["layers"]["a.qk"]["score"] = d["layers"]["a.qk"].pop("cost")
    assert Plan.from_dict(d) == plan


def test_the_deprecated_aliases_are_gone():
    layer = mixq.QuantLinear(8, 4, act_quant="channel")
    assert not hasattr(layer, "fuse_layernorm") and not hasattr(layer, "fused_norm")
    with pytest.raises(TypeError, match="fused_norm"):
        mixq.QuantLinear(8, 4, act_quant="channel", fused_norm=True)
    from mixq.eval import coco_sam

    assert not hasattr(mixq.alloc, "split_kl_costs") and not hasattr(mixq.alloc, "noise_factor")
    assert not hasattr(coco_sam, "voc_sample_to_coco") and not hasattr(coco_sam, "IMAGE_FIELDS")
