"""Checkpoints written by earlier mixq code (tests/fixtures, formats 2 and 3) keep loading, bit for bit."""

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
    assert torch.equal(out, recorded[case])
