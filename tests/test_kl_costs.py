"""KL costs split into weight and activation parts, the smooth-mode perturbation that measures them, and an
allocation that keeps a layer with fragile activations at higher a_bits."""

import numpy as np
import pytest
import torch
from torch import nn

import mixq
from mixq import formats
from mixq.alloc import DEFAULT_CANDIDATES
from mixq.scores.costs import split_kl_costs
from mixq.nn import QuantLinear
from mixq.scores.perturb import input_amax, perturbed

CANDS = [(4, 4), (4, 8), (8, 4), (8, 8)]


# ----------------------------------------------------------------------------- split_kl_costs


def _cost(costs, cands, layer, w, a):
    return costs[layer, list(cands).index((w, a))]


def test_weight_fragile_and_activation_fragile_layers():
    raw_w = np.array([[1.0, 2.0, 0.5], [0.001, 0.002, 0.003]])  # layer 0: weights hurt
    raw_a = np.array([[0.001, 0.003, 0.002], [0.8, 1.5, 2.0]])  # layer 1: activations hurt
    costs, per_image = split_kl_costs(raw_w, raw_a, CANDS)
    assert costs.shape == (2, 4) and per_image.shape == (2, 3)
    assert _cost(costs, CANDS, 0, 8, 4) < _cost(costs, CANDS, 0, 4, 8)  # layer 0 wants w_bits
    assert _cost(costs, CANDS, 1, 4, 8) < _cost(costs, CANDS, 1, 8, 4)  # layer 1 wants a_bits
    assert (costs >= 0).all() and np.isfinite(costs).all()
    # the formula: shares of one per-image total, 4^-(bits - lowest) per side
    total = raw_w.sum(0) + raw_a.sum(0)
    sw, sa = (raw_w / total).mean(1), (raw_a / total).mean(1)
    for c, (w, a) in enumerate(CANDS):
        assert np.allclose(costs[:, c], sw * 4.0 ** -(w - 4) + sa * 4.0 ** -(a - 4))
    assert np.allclose(per_image, (raw_w + raw_a) / total)
    assert np.allclose(per_image.sum(axis=0), 1.0)


def test_costs_fall_when_either_bit_width_rises():
    rng = np.random.default_rng(0)
    raw_w, raw_a = rng.uniform(0.01, 1, (5, 7)), rng.uniform(0.01, 1, (5, 7))
    cands = list(DEFAULT_CANDIDATES)  # 4/6/8 x 4/6/8
    costs, per_image = split_kl_costs(raw_w, raw_a, cands)
    assert (costs > 0).all()
    for (w, a) in cands:
        for (w2, a2) in cands:
            if (w2, a2) != (w, a) and w2 >= w and a2 >= a:
                assert (_cost(costs, cands, slice(None), w2, a2) < _cost(costs, cands, slice(None), w, a)).all()
    assert np.allclose(per_image.sum(axis=0), 1.0)
    # the lowest candidate's cost is the layer's whole share (both sides at full weight)
    assert np.allclose(_cost(costs, cands, slice(None), 4, 4), per_image.mean(axis=1))


def test_candidates_need_not_start_at_four_bits():
    raw_w, raw_a = np.array([[1.0, 1.0]]), np.array([[1.0, 3.0]])
    costs, _ = split_kl_costs(raw_w, raw_a, [(6, 6), (6, 8), (8, 8)])
    sw, sa = 0.5 * (1 / 2 + 1 / 4), 0.5 * (1 / 2 + 3 / 4)
    assert np.allclose(costs[0], [sw + sa, sw + sa / 16, (sw + sa) / 16])


def test_zero_image_column_gives_zeros_not_nan():
    raw_w = np.array([[0.5, 0.0, 0.2], [0.1, 0.0, 0.0]])
    raw_a = np.array([[0.2, 0.0, 0.0], [0.2, 0.0, 0.3]])
    with np.errstate(all="raise"):  # no 0/0 anywhere
        costs, per_image = split_kl_costs(raw_w, raw_a, CANDS)
    assert np.isfinite(costs).all() and np.isfinite(per_image).all() and (costs >= 0).all()
    assert (per_image[:, 1] == 0).all()
    assert np.allclose(per_image[:, [0, 2]].sum(axis=0), 1.0)
    zero_costs, zero_shares = split_kl_costs(np.zeros((3, 4)), np.zeros((3, 4)), CANDS)
    assert (zero_costs == 0).all() and (zero_shares == 0).all()


# ----------------------------------------------------------------------------- input_amax / perturbed


def _seq() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))


def test_input_amax_matches_direct_computation():
    model = _seq()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(2, 5, 6, generator=g) * s for s in (1.0, 3.0, 0.5)]  # token dim: [B, T, K]
    batches[1][0, 2, 4] = -40.0  # a negative outlier counts by |x|
    amax = input_amax(model, batches, ["0", "2"])
    assert set(amax) == {"0", "2"}
    x = torch.cat([b.reshape(-1, 6) for b in batches])
    with torch.no_grad():
        h = torch.relu(model[0](x))
    assert torch.equal(amax["0"], x.abs().amax(0))
    assert torch.allclose(amax["2"], h.abs().amax(0))
    assert amax["0"][4] == 40.0 and amax["0"].dtype == torch.float32
    # the hooks are gone afterwards, only named layers are watched
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert set(input_amax(model, batches[:1], ["2"])) == {"2"}


def test_input_amax_removes_hooks_on_error():
    model = _seq()
    with pytest.raises(RuntimeError):
        input_amax(model, [torch.randn(3, 5)], ["0"])  # wrong width
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_perturbed_uses_smooth_mode_with_amax_and_restores():
    model = _seq()
    original = model[2]
    x = torch.randn(16, 6)
    amax = input_amax(model, [x], ["2"])["2"]
    with torch.no_grad():
        ref = model(x)
    with perturbed(model, "2", 4, 4, act_amax=amax):
        q = model[2]
        assert isinstance(q, QuantLinear) and q.act_quant == "smooth" and q.simulate
        assert (q.w_bits, q.a_bits) == (4, 4)
        s = formats.smooth_factors(amax, original.weight.detach())
        assert torch.allclose(q.act_channel_factor, s)
        with torch.no_grad():
            out = model(x)
        assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert model[2] is original
    with perturbed(model, "2", 8, 4):
        assert isinstance(model[2], QuantLinear) and model[2].act_quant == "dynamic"
        assert (model[2].w_bits, model[2].a_bits) == (8, 4)
    assert model[2] is original
    first = model[0]
    with pytest.raises(KeyError):
        with perturbed(model, "0", 4, 4, act_amax=input_amax(model, [x], ["0"])["0"]):
            assert isinstance(model[0], QuantLinear) and model[0].act_quant == "smooth"
            raise KeyError("boom")
    assert model[0] is first
    with torch.no_grad():
        assert torch.equal(model(x), ref)  # the float model is back, unchanged
    with pytest.raises(ValueError, match="perturbation mode"):
        with perturbed(model, "2", mode="bogus"):
            pass
    assert model[2] is original


# ----------------------------------------------------------------------------- allocate end to end


class _Tiny(nn.Module):
    def __init__(self, k: int = 64):
        super().__init__()
        self.a = nn.Linear(k, k)
        self.b = nn.Linear(k, k)
        self.c = nn.Linear(k, 10)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _inputs(spike: float, n: int = 32, k: int = 64, seed: int = 0) -> torch.Tensor:
    """Gaussian rows, each with one spike of size ``spike`` in a random channel.

    The spike sets the per-token step; with a random channel per row every channel has the same amax,
    so smoothing cannot take it out, and at 4 bits the rest of the row rounds to zero. The spike is
    small next to the row's norm, so weight rounding barely notices it: layer a's activations are
    fragile, its weights are not.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g)
    if spike:
        idx = torch.randint(0, k, (n,), generator=g)
        x[torch.arange(n), idx] = spike * torch.sign(torch.randn(n, generator=g))
    return x


def _plan(spike: float):
    torch.manual_seed(0)
    model = _Tiny()
    with torch.no_grad():
        model.c.weight.mul_(4)  # confident logits, so KL sees the perturbations
    x = _inputs(spike)
    # BOPs at 0.4x of W8A8: W4A8 everywhere is 0.5x, so some layer must drop to A4.
    return mixq.allocate(model, x, budget=8.0, bops_budget="0.4x", candidates=CANDS, scorer="kl",
                         cache_dir=False, progress=False)


def test_allocate_keeps_fragile_activations_at_higher_a_bits():
    plan = _plan(spike=16.0)
    assert plan.status == "optimal" and set(plan.layers) == {"a", "b", "c"}
    a_bits = {n: a for n, (_, a) in plan.layers.items()}
    assert min(a_bits.values()) == 4  # the budget forced a 4-bit activation somewhere
    assert a_bits["a"] == 8 and a_bits["a"] >= max(a_bits["b"], a_bits["c"])
    # control: the same model on spike-free inputs puts layer a at A4 (its MACs make it the cheapest
    # place to save BOPs), so the spikes are what kept it at A8
    control = _plan(spike=0.0)
    assert control.layers["a"][1] == 4
