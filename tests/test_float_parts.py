"""bf16 float parts of a quantized model: the QuantLinears keep fp32 state, kernel == simulate bit for bit."""

import copy

import pytest
import torch
from torch import nn

import mixq
from mixq.latency import CastInputs
from mixq.nn import QuantLinear, cast_float_parts


class Block(nn.Module):
    def __init__(self, d: int = 40) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1, self.act, self.fc2 = nn.Linear(d, 3 * d + 1), nn.GELU(), nn.Linear(3 * d + 1, d)
        self.head = nn.Linear(d, 5)  # stays float

    def forward(self, x):
        x = x + self.fc2(self.act(self.fc1(self.norm(x))))
        return self.head(x)


@pytest.mark.parametrize("w_bits,a_bits,act", [(8, 8, "smooth"), (4, 8, "dynamic"), (6, 6, "smooth"), (4, 4, "dynamic")])
def test_bf16_float_parts_kernel_equals_simulate(kernel_path, w_bits, a_bits, act):
    torch.manual_seed(w_bits * 10 + a_bits)
    fp = Block().eval()
    calib = torch.randn(4, 9, 40)
    cfg = mixq.QuantConfig(mixq.LinearConfig(w_bits, a_bits, act_quant=act, fold_layernorm=True, weight_method="rtn",
                                             skip=("head",)), backend="cpu")
    q = mixq.quantize_(copy.deepcopy(fp), cfg, calib, progress=False).eval()
    sim = copy.deepcopy(q)
    for m in sim.modules():
        if isinstance(m, QuantLinear):
            m.set_simulate(True)
    qb = CastInputs(cast_float_parts(q), torch.bfloat16, cast_model=False)
    sb = CastInputs(cast_float_parts(sim), torch.bfloat16, cast_model=False)
    for m in q.modules():
        if isinstance(m, QuantLinear):
            assert m.w_scale.dtype == torch.float32 and m.act_channel_factor.dtype == torch.float32
    assert q.head.weight.dtype == torch.bfloat16 and q.norm.weight.dtype == torch.bfloat16
    x = torch.randn(3, 17, 40)
    with torch.inference_mode():
        a, b = qb(x), sb(x)
    assert a.dtype == torch.bfloat16
    assert torch.equal(a, b)
    with torch.inference_mode():
        ref = fp(x)
    assert (a.float() - ref).abs().max() < 0.25 * ref.abs().max()  # still the same model, approximately


def test_cast_float_parts_refuses_integer_dtype():
    with pytest.raises(ValueError, match="floating dtype"):
        cast_float_parts(nn.Linear(2, 2), torch.int8)
