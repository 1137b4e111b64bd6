import copy
import json
import os
import struct

import pytest
import torch

import mixq
from mixq.checkpoint import CheckpointError
from mixq.config import LinearConfig, QuantConfig
from mixq.quantize import quantize_
from test_quantize import TinyBlock, _data


@pytest.fixture
def models():
    torch.manual_seed(0)
    float_model = TinyBlock().eval()
    q = quantize_(copy.deepcopy(float_model), QuantConfig(LinearConfig(layer_bits={"fc1": (4, 8), "fc2": (6, 6)},
                                                                       act_quant="channel")), _data(), progress=False)
    return float_model, q


def test_roundtrip_bit_identical(models, tmp_path):
    float_model, q = models
    path = mixq.save(q, tmp_path / "m.safetensors")
    loaded = mixq.load(path, copy.deepcopy(float_model))
    x = _data(3)
    assert torch.equal(loaded(x), q(x))
    assert (loaded.fc2.w_bits, loaded.fc2.a_bits, loaded.fc1.act_quant) == (6, 6, "channel")


def test_refuses_to_overwrite(models, tmp_path):
    _, q = models
    path = tmp_path / "m.safetensors"
    path.write_text("user data")
    with pytest.raises(FileExistsError):
        mixq.save(q, path)
    assert path.read_text() == "user data"
    mixq.save(q, path, overwrite=True)


def _untouched(model):
    return not any(isinstance(m, mixq.QuantLinear) for m in model.modules())


def test_truncated_and_corrupt_files(models, tmp_path):
    float_model, q = models
    path = mixq.save(q, tmp_path / "m.safetensors")
    raw = path.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(raw[: len(raw) - 100])
    target = copy.deepcopy(float_model)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        mixq.load(trunc, target)
    assert _untouched(target)
    flipped = bytearray(raw)
    flipped[-5] ^= 0xFF
    bad = tmp_path / "flip.safetensors"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="checksum"):
        mixq.load(bad, target)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError):
        mixq.load(garbage, target)
    with pytest.raises(FileNotFoundError):
        mixq.load(tmp_path / "nope.safetensors", target)
    assert _untouched(target)


def _rewrite_metadata(raw: bytes, **changes) -> bytes:
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"].update(changes)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    return struct.pack("<Q", len(new)) + new + raw[8 + n :]


def test_version_mismatch(models, tmp_path):
    float_model, q = models
    path = mixq.save(q, tmp_path / "m.safetensors")
    other = tmp_path / "v2.safetensors"
    other.write_bytes(_rewrite_metadata(path.read_bytes(), format_version="99"))
    with pytest.raises(CheckpointError, match="format version 99"):
        mixq.load(other, copy.deepcopy(float_model))


def test_mismatched_architecture_names_the_layer(models, tmp_path):
    _, q = models
    path = mixq.save(q, tmp_path / "m.safetensors")
    torch.manual_seed(0)
    wrong = TinyBlock(d=32).eval()
    with pytest.raises(CheckpointError, match="fc1"):
        mixq.load(path, wrong)
    assert _untouched(wrong)
    with pytest.raises(ValueError, match="no QuantLinear"):
        mixq.save(TinyBlock(), tmp_path / "f.safetensors")


@pytest.fixture
def folded_models():
    torch.manual_seed(0)
    float_model = TinyBlock().eval()
    q = quantize_(copy.deepcopy(float_model), QuantConfig(LinearConfig(act_quant="channel", fold_layernorm=True)),
                  _data(), progress=False)
    return float_model, q


def test_roundtrip_with_folded_layernorm(folded_models, tmp_path):
    float_model, q = folded_models
    path = mixq.save(q, tmp_path / "m.safetensors")
    skeleton = copy.deepcopy(float_model)
    loaded = mixq.load(path, skeleton)
    x = _data(2)
    assert loaded.fc1.folded_norm
    assert torch.equal(loaded(x), q(x))


def test_roundtrip_with_scalar_and_integer_buffers(tmp_path):
    # BatchNorm's num_batches_tracked is a 0-dim int64 tensor; bf16 parameters have no numpy dtype.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4)).eval()
    model[1].weight.data = model[1].weight.data.bfloat16().float()
    float_model = copy.deepcopy(model)
    q = quantize_(model, QuantConfig(LinearConfig(act_quant="dynamic", layer_bits={"2": (4, 4)})), None, progress=False)
    q.register_buffer("extra_bf16", torch.ones(3, dtype=torch.bfloat16))
    float_model.register_buffer("extra_bf16", torch.zeros(3, dtype=torch.bfloat16))
    loaded = mixq.load(mixq.save(q, tmp_path / "m.safetensors"), float_model)
    x = torch.randn(5, 8)
    assert torch.equal(loaded(x), q(x)) and torch.equal(loaded.extra_bf16, q.extra_bf16)


def test_checksum_covers_the_header(models, tmp_path):
    """Editing a layer's a_bits 8 -> 4 in the header must not load silently as W4A4."""
    float_model, q = models
    path = mixq.save(q, tmp_path / "m.safetensors")
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])["__metadata__"]
    layers = json.loads(header["layers"])
    assert layers["fc1"]["a_bits"] == 8
    layers["fc1"]["a_bits"] = 4
    edited = tmp_path / "edited.safetensors"
    edited.write_bytes(_rewrite_metadata(raw, layers=json.dumps(layers, sort_keys=True)))
    target = copy.deepcopy(float_model)
    with pytest.raises(CheckpointError, match="header metadata"):
        mixq.load(edited, target)
    assert _untouched(target)


def test_version_1_files_still_load_with_a_warning(models, tmp_path):
    from mixq.checkpoint import _digest, read

    float_model, q = models
    path = mixq.save(q, tmp_path / "m.safetensors")
    tensors, _ = read(path)
    v1 = tmp_path / "v1.safetensors"
    v1.write_bytes(_rewrite_metadata(path.read_bytes(), format_version="1", sha256=_digest(tensors)))
    with pytest.warns(UserWarning, match="version-1"):
        loaded = mixq.load(v1, copy.deepcopy(float_model))
    x = _data(2)
    assert torch.equal(loaded(x), q(x))


def test_concurrent_save_to_one_path_has_one_winner(models, tmp_path, monkeypatch):
    """A second writer that creates the file after the exists-check must not be overwritten."""
    import mixq.checkpoint as ckpt

    _, q = models
    path = tmp_path / "m.safetensors"
    real = ckpt._serialize

    def other_process_wins(tensors, meta):
        path.write_text("the other process's checkpoint")
        return real(tensors, meta)

    monkeypatch.setattr(ckpt, "_serialize", other_process_wins)
    with pytest.raises(FileExistsError):
        mixq.save(q, path)
    assert path.read_text() == "the other process's checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_failed_or_killed_save_leaves_no_temp_file(models, tmp_path, monkeypatch):
    import signal
    import subprocess
    import sys

    import mixq.checkpoint as ckpt

    _, q = models

    def disk_full(fd, data):
        os.write(fd, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "_write_all", disk_full)
    with pytest.raises(OSError, match="No space"):
        mixq.save(q, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []
    # SIGKILL in the middle of the write: no cleanup code runs, and still nothing is left.
    script = f"""
import os, sys, time, torch
import mixq, mixq.checkpoint as ckpt
from mixq.nn import QuantLinear
def stall(fd, data):
    os.write(fd, data[: len(data) // 2]); print("writing", flush=True); time.sleep(60)
ckpt._write_all = stall
mixq.save(torch.nn.Sequential(QuantLinear(8, 8)), {str(tmp_path / "k.safetensors")!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert list(tmp_path.iterdir()) == []


def test_checkpoints_from_before_the_fold_rename_load(folded_models, tmp_path):
    """Version-1 files call a folded LayerNorm 'fused_norm': they load folded, with the same numbers."""
    from mixq.checkpoint import _digest, read

    float_model, q = folded_models
    path = mixq.save(q, tmp_path / "m.safetensors")
    tensors, meta = read(path)
    old_layers = {n: {("fused_norm" if k == "folded_norm" else k): v for k, v in c.items()}
                  for n, c in meta["layers"].items()}
    assert any(c["fused_norm"] for c in old_layers.values())
    v1 = tmp_path / "v1.safetensors"
    v1.write_bytes(_rewrite_metadata(path.read_bytes(), format_version="1", sha256=_digest(tensors),
                                     layers=json.dumps(old_layers, sort_keys=True)))
    with pytest.warns(UserWarning, match="version-1"):
        loaded = mixq.load(v1, copy.deepcopy(float_model))
    assert loaded.fc1.folded_norm
    x = _data(2)
    assert torch.equal(loaded(x), q(x))
