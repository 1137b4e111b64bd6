"""Block reconstruction on a tiny timm ViT: block MSE goes down, dropping is off at evaluation, the
result is deterministic for a seed, and the reconstructed model still runs on the kernels exactly as
its simulation does."""

from __future__ import annotations

import copy

import pytest
import torch

from mixq.config import LinearConfig, QuantConfig, RotationConfig
from mixq.nn import QuantLinear
from mixq.quantize import quantize_, set_simulate
from mixq.reconstruct import ReconstructConfig, SoftQuantLinear, reconstruct_blocks

timm = pytest.importorskip("timm")


def _vit():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=28, patch_size=7, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0,
                             num_classes=5, init_values=1.0).eval()


def _images(n=8, seed=0):
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


def _quantized(fp, rotate=False):
    q = copy.deepcopy(fp)
    cfg = QuantConfig(LinearConfig(4, 4, fold_layernorm=True), rotation=RotationConfig() if rotate else None)
    with torch.no_grad():
        quantize_(q, cfg, _images(), filter_fn=lambda n, m: n.startswith("blocks"), progress=False)
    return q


CFG = ReconstructConfig(iters=40, batch_size=4, lr=5e-2, seed=3)


@pytest.mark.parametrize("rotate", (False, True))
def test_block_mse_decreases_and_kernels_still_equal_simulation(rotate):
    fp = _vit()
    q = _quantized(fp, rotate)
    recs = reconstruct_blocks(q, fp, _images(), CFG, blocks=lambda m: m.blocks, progress=False)
    assert len(recs) == 2
    assert all(r["mse_after"] <= r["mse_before"] for r in recs)
    assert any(r["kept"] == "reconstructed" for r in recs)
    assert sum(r["mse_after"] for r in recs) < 0.98 * sum(r["mse_before"] for r in recs), recs
    x = _images(3, seed=9)
    with torch.no_grad():
        kernel = q(x)
        set_simulate(q, True)
        sim = q(x)
    assert torch.equal(kernel, sim)
    for m in q.modules():
        if isinstance(m, QuantLinear):
            codes = __import__("mixq").formats.unpack_weight(m.qweight, m.w_bits, m.in_features)
            assert codes.abs().max() <= 7  # still W4 codes of the packed format


def test_reconstruction_is_deterministic_for_a_seed():
    fp = _vit()
    a, b = _quantized(fp), _quantized(fp)
    ra = reconstruct_blocks(a, fp, _images(), CFG, blocks=lambda m: m.blocks, progress=False)
    rb = reconstruct_blocks(b, fp, _images(), CFG, blocks=lambda m: m.blocks, progress=False)
    assert [r["mse_after"] for r in ra] == [r["mse_after"] for r in rb]
    for (n, m), (_, k) in zip(a.named_buffers(), b.named_buffers()):
        assert torch.equal(m, k), n


def test_dropping_is_on_in_training_and_off_at_evaluation():
    fp = _vit()
    q = _quantized(fp)
    lin = q.blocks[0].mlp.fc2
    soft = SoftQuantLinear(lin, fp.blocks[0].mlp.fc2.weight, fp.blocks[0].mlp.fc2.bias, 0.5,
                           torch.Generator().manual_seed(0))
    x = torch.randn(6, 17, lin.in_features)
    soft.eval()
    with torch.no_grad():
        e1, e2 = soft(x), soft(x)
        soft.train()
        t1, t2 = soft(x), soft(x)
        soft.drop_prob = 0.0
        t0 = soft(x)
    assert torch.equal(e1, e2)  # evaluation: no random dropping
    assert torch.equal(t0, e1)  # with p = 0, training is evaluation
    assert not torch.equal(t1, e1) and not torch.equal(t1, t2)  # training: random float inputs
    # the soft layer at its start point is GPTQ's layer, up to h's 1% offset
    with torch.no_grad():
        ref = lin.set_simulate(True)(x)
    assert (e1 - ref).abs().max() < 0.05 * ref.abs().max()


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="drop_prob"):
        ReconstructConfig(drop_prob=1.0)
