"""Checkpoints written by earlier mixq code (tests/fixtures, formats 2 and 3) keep loading and reproduce
their recorded outputs.

The integer kernels are bit-exact on every machine (test_cpu_backend), but the float parts around them
(torch's LayerNorm, GELU, softmax, the fp32 epilogue) round differently on AVX2, AVX-512 and AMX CPUs, so
the recorded outputs are matched to 1e-6: a migration that misreads a scale or a code moves an output by
a quantization step (about 1e-2), four orders above that."""

from pathlib import Path

import pytest
import torch

import mixq

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CASES = ["format2_smooth_mixed", "format2_channel_folded", "format3_attention"]


@pytest.fixture(scope="module")
def recorded() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(FIXTURES / "checkpoint_outputs.safetensors"))


@pytest.mark.parametrize("case", CASES)
def test_old_checkpoint_loads_and_reproduces_its_outputs(case: str, recorded: dict[str, torch.Tensor]) -> None:
    model = mixq.load(FIXTURES / f"{case}.safetensors")
    with torch.no_grad():
        out = model(recorded["probe_input"])
    torch.testing.assert_close(out, recorded[case], rtol=0.0, atol=1e-6)


def test_a_legacy_buffer_that_disagrees_with_its_derivation_is_refused(tmp_path) -> None:
    """Older files hold act_inv_scale, which QuantLinear now derives from act_scale and the channel
    factors: a file whose stored copy disagrees (a consistent checksum, inconsistent numbers) is refused
    before the model changes."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mixq.checkpoint import CheckpointError, _digest
    from mixq.models import get_adapter

    src = FIXTURES / "format2_smooth_mixed.safetensors"
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in tensors if k.endswith("act_inv_scale") and tensors[k].numel() > 1)
    tensors[key] = tensors[key] * 1.5
    meta["sha256"] = _digest(tensors, meta)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    model = get_adapter("toy-vit").build()
    with pytest.raises(CheckpointError, match="act_inv_scale .* disagrees"):
        mixq.load(bad, model)
    assert not any(isinstance(m, mixq.QuantLinear) for m in model.modules())  # untouched
