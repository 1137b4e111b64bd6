import copy
import json
import struct

import pytest
import torch

import mixq
from mixq.checkpoint import CheckpointError
from mixq.quantize import QuantConfig, quantize_
from test_quantize import TinyBlock, _data


@pytest.fixture
def models():
    torch.manual_seed(0)
    float_model = TinyBlock().eval()
    q = quantize_(copy.deepcopy(float_model), QuantConfig(layer_bits={"fc1": (4, 8), "fc2": (6, 6)},
                                                          act_quant="channel"), _data(), progress=False)
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
    other.write_bytes(_rewrite_metadata(path.read_bytes(), format_version="2"))
    with pytest.raises(CheckpointError, match="format version 2"):
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


def test_roundtrip_with_fused_layernorm(tmp_path):
    torch.manual_seed(0)
    float_model = TinyBlock().eval()
    q = quantize_(copy.deepcopy(float_model), QuantConfig(act_quant="channel", fold_layernorm=True), _data(),
                  progress=False)
    path = mixq.save(q, tmp_path / "m.safetensors")
    skeleton = copy.deepcopy(float_model)
    loaded = mixq.load(path, skeleton)
    x = _data(2)
    assert loaded.fc1.fused_norm
    assert torch.equal(loaded(x), q(x))


def test_roundtrip_with_scalar_and_integer_buffers(tmp_path):
    # BatchNorm's num_batches_tracked is a 0-dim int64 tensor; bf16 parameters have no numpy dtype.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4)).eval()
    model[1].weight.data = model[1].weight.data.bfloat16().float()
    float_model = copy.deepcopy(model)
    q = quantize_(model, QuantConfig(act_quant="dynamic", layer_bits={"2": (4, 4)}), None, progress=False)
    q.register_buffer("extra_bf16", torch.ones(3, dtype=torch.bfloat16))
    float_model.register_buffer("extra_bf16", torch.zeros(3, dtype=torch.bfloat16))
    loaded = mixq.load(mixq.save(q, tmp_path / "m.safetensors"), float_model)
    x = torch.randn(5, 8)
    assert torch.equal(loaded(x), q(x)) and torch.equal(loaded.extra_bf16, q.extra_bf16)
