"""Scores on tiny models where the answer is known by construction."""

import pytest
import torch
from torch import nn

from mixq.scores import cache
from mixq.scores.inventory import adjacent_pairs, build_inventory
from mixq.scores.kl import kl_importance
from mixq.scores.lrp import lrp_importance, lrp_relevance, lrp_rules
from mixq.scores.outputs import mask_probs, saliency_probs, softmax_probs
from mixq.scores.perturb import perturbed
from mixq.scores.sensitivity import sensitivity_scores
from mixq.scores.synergy import synergy_scores


class Known(nn.Module):
    """``dead`` is computed but bypassed; ``loud``'s output is amplified 20x, ``quiet``'s is not."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.dead = nn.Linear(16, 16)
        self.loud = nn.Linear(16, 16)
        self.quiet = nn.Linear(16, 16)
        self.head = nn.Linear(16, 6)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        _ = self.dead(h)
        return self.head(h + 20.0 * self.loud(h) + self.quiet(h))


@pytest.fixture
def known():
    torch.manual_seed(0)
    return Known(), torch.randn(10, 8)


def test_kl_bypassed_zero_amplified_higher(known):
    model, x = known
    names = ["inp", "dead", "loud", "quiet", "head"]
    res = kl_importance(model, x, names, cache_dir=False, progress=False)
    imp = dict(zip(names, res["importance"]))
    assert imp["dead"] == 0.0
    assert imp["loud"] > imp["quiet"]
    per_image = torch.tensor(res["per_image"], dtype=torch.float64)
    assert torch.allclose(per_image.sum(0), torch.ones(10, dtype=torch.float64))
    ablate = kl_importance(model, x, names, mode="ablate", cache_dir=False, progress=False)
    assert dict(zip(names, ablate["importance"]))["dead"] == 0.0


def test_lrp_bypassed_zero_amplified_higher(known):
    model, x = known
    names = ["inp", "dead", "loud", "quiet", "head"]
    imp = dict(zip(names, lrp_importance(model, x, names, cache_dir=False, progress=False)["importance"]))
    assert imp["dead"] == 0.0
    assert imp["loud"] > imp["quiet"]


class Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.ln1 = nn.LayerNorm(d, bias=False)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.ln2 = nn.LayerNorm(d, bias=False)
        self.fc1 = nn.Linear(d, 2 * d, bias=False)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * d, d, bias=False)

    def forward(self, x):
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        x = x + self.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v))
        att = (q @ k.transpose(-1, -2)).softmax(dim=-1) @ v  # a second, explicit softmax path
        x = x + 0.1 * att
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


def test_lrp_conserves_relevance_through_a_block():
    torch.manual_seed(1)
    block = Block()
    x = torch.randn(3, 5, 16, requires_grad=True)
    with lrp_rules(block, eps=1e-9):
        y = block(x)
        y.retain_grad()
        target = (y * torch.randn_like(y)).sum()  # any linear read-out of the output
        target.backward()
    r_out = (y.detach() * y.grad).sum()
    r_in = (x.detach() * x.grad).sum()
    assert r_in.item() == pytest.approx(r_out.item(), rel=1e-4)
    assert torch.nn.functional.softmax is not None and torch.Tensor.softmax.__name__ == "softmax"  # restored


def test_lrp_target_relevance_matches_output():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False))
    x = torch.randn(5, 4)
    rel, target = lrp_relevance(model, x, ["0", "2"])
    assert torch.allclose(rel[1], target, rtol=1e-5)  # the last layer carries all of the target
    assert torch.allclose(rel[0], target, rtol=1e-3)  # conserved back to the first (no biases)


def test_sensitivity_more_bits_less_error(known):
    model, x = known
    res = sensitivity_scores(model, x, ["loud", "dead"], [(4, 4), (8, 8)], cache_dir=False, progress=False)
    (loud4, loud8), (dead4, dead8) = res["kl"]
    assert loud4 > loud8 >= 0 and dead4 == dead8 == 0.0


def test_synergy_tracks_similar_layers():
    per_image = [[0.5, 0.4, 0.6], [0.5, 0.4, 0.6], [0.0, 0.2, 0.4]]
    s = synergy_scores(per_image, [(0, 1), (1, 2)])
    assert s[0] > s[1] > 0
    with pytest.raises(ValueError):
        synergy_scores([1.0, 2.0], [(0, 1)])


def test_inventory_counts_real_tokens_and_order():
    class Win(nn.Module):
        def __init__(self):
            super().__init__()
            self.second = nn.Linear(4, 4)
            self.first = nn.Linear(4, 4, bias=False)

        def forward(self, x):  # x [B, 6, 4]; "second" sees only 2 of the 6 tokens, runs after "first"
            return self.second(self.first(x)[:, :2])

    inv = build_inventory(Win(), torch.randn(3, 6, 4))
    assert [l.name for l in inv] == ["first", "second"]
    assert inv[0].macs == 6 * 16 and inv[1].macs == 2 * 16
    assert inv[0].bias is False and inv[1].weight_params == 16
    assert adjacent_pairs(inv) == [(0, 1)]


def test_output_fns_are_distributions():
    class Dense(nn.Module):
        def forward(self, x):
            return x

    x = torch.randn(2, 1, 5, 7)
    for fn in (mask_probs, saliency_probs):
        p = fn(Dense(), x)
        assert p.shape == (2, 35) and torch.allclose(p.sum(1), torch.ones(2))
    p = softmax_probs(Dense(), torch.randn(3, 4))
    assert torch.allclose(p.sum(1), torch.ones(3))


def test_perturbation_restores_layer_on_error(known):
    model, x = known
    original = model.loud
    with pytest.raises(RuntimeError):
        with perturbed(model, "loud", 4, 4):
            assert model.loud is not original
            raise RuntimeError("boom")
    assert model.loud is original
    with pytest.raises(ValueError, match="unknown perturbation mode"):
        with perturbed(model, "loud", mode="melt"):
            pass


def test_cache_makes_reruns_free_and_keys_on_weights(known, tmp_path, monkeypatch):
    model, x = known
    first = kl_importance(model, x, ["loud", "quiet"], cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("kl-*.json"))) == 1
    import mixq.scores.kl as kl_mod

    monkeypatch.setattr(kl_mod, "perturbation_kl", lambda *a, **k: pytest.fail("cache miss"))
    assert kl_importance(model, x, ["loud", "quiet"], cache_dir=tmp_path, progress=False) == first
    with torch.no_grad():
        model.loud.weight.mul_(2.0)
    assert cache.fingerprint(model, x, {}) != cache.fingerprint(Known(), x, {})
    monkeypatch.setenv("MIXQ_CACHE_DIR", str(tmp_path / "env"))
    assert cache.cache_root(None) == tmp_path / "env" and cache.cache_root(False) is None


def test_measured_per_image_more_bits_less_error_bypassed_zero(known):
    from mixq.scores.measured import measured_cost_table, measured_scores

    model, x = known
    before = {n: m.weight.clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    res = measured_scores(model, x, ["loud", "quiet", "dead"], [(4, 4), (8, 8)], batch_size=4, cache_dir=False,
                          progress=False)
    per = torch.tensor(res["per_image"], dtype=torch.float64)
    assert per.shape == (3, 2, 10) and (per >= 0).all()
    (loud4, loud8), (quiet4, quiet8), (dead4, dead8) = res["kl"]
    assert loud4 > loud8 and loud4 > quiet4 and dead4 == dead8 == 0.0
    # the model is left as it was: float Linears, same weights
    assert all(type(model.get_submodule(n)) is nn.Linear and torch.equal(model.get_submodule(n).weight, w)
               for n, w in before.items())
    costs, shares = measured_cost_table(res)
    assert costs.shape == (3, 2) and shares.shape == (3, 10)
    assert torch.allclose(torch.tensor(shares.sum(0)), torch.ones(10, dtype=torch.float64))


def test_measured_scorer_in_allocate_synergy_off_by_default(known, monkeypatch):
    import mixq.scores.kl as kl_mod
    from mixq import allocate

    model, x = known
    calls = []
    monkeypatch.setattr(kl_mod, "kl_importance", lambda *a, **k: calls.append(1) or (_ for _ in ()).throw(
        AssertionError("measured alone must not run the KL probes")))
    plan = allocate(model, x, budget=6.0, scorer="measured", filter_fn=lambda n, m: n != "dead",
                    cache_dir=False, progress=False)
    assert plan.scorer == "measured" and not calls
    # loud (amplified 20x) gets at least the weight bits of quiet
    assert plan.layers["loud"][0] >= plan.layers["quiet"][0]
    with pytest.raises(ValueError, match="weight_method"):
        from mixq.scores.measured import measured_scores

        measured_scores(model, x, ["loud"], [(4, 4)], weight_method="nope", cache_dir=False)


# ----------------------------------------------------------------------------- measured: prefix caching


def _tiny_vit():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=24,
                              depth=3, num_heads=2, num_classes=5).eval()
    with torch.no_grad():
        model.head.weight.mul_(8)  # confident logits, so every perturbation shows in the KL
    return model, torch.randn(6, 3, 16, 16)


def _vit_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")]


def test_find_blocks_on_timm_vit_and_none_without_blocks(known):
    from mixq.scores.measured import find_blocks

    model, _ = _tiny_vit()
    assert find_blocks(model, _vit_names(model)) == ["blocks.0", "blocks.1", "blocks.2"]
    assert find_blocks(model, ["blocks.1.attn.qkv"]) == ["blocks.0", "blocks.1", "blocks.2"]
    # nested chains (Swin: stages of blocks): the innermost ones
    stages = nn.Sequential(*[nn.Sequential(*[nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4)) for _ in range(2)])
                             for _ in range(2)])
    assert find_blocks(stages, ["0.0.1", "1.1.1"]) == ["0.0", "0.1", "1.0", "1.1"]
    assert find_blocks(known[0], ["loud", "quiet", "dead"]) == []
    # a plain Sequential of Linears is not a chain of blocks (each child would be a single layer)
    assert find_blocks(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), ["0", "1"]) == []


def test_measured_prefix_cache_equals_full_forwards_bit_for_bit(monkeypatch):
    """Replaying the FP outputs of the blocks before the perturbed one changes no bit of any KL, and
    the head (final norm, pooling, classifier, output_fn) still runs on every pass."""
    from mixq.scores import measured as measured_mod

    model, x = _tiny_vit()
    # one layer per block, and head: outside the blocks, after all of them
    names = ["blocks.0.attn.qkv", "blocks.1.mlp.fc1", "blocks.2.attn.proj", "blocks.2.mlp.fc2", "head"]
    cands = [(4, 4), (8, 6)]
    full = measured_mod.measured_scores(model, x, names, cands, batch_size=4, cache_dir=False, progress=False,
                                        prefix_cache=False)
    calls = {"block0": 0}
    model.blocks[0].register_forward_hook(lambda *a: calls.__setitem__("block0", calls["block0"] + 1))
    fast = measured_mod.measured_scores(model, x, names, cands, batch_size=4, cache_dir=False, progress=False)
    assert fast == full  # every float equal
    assert all(v > 0 for row in full["kl"] for v in row)
    # block 0 ran (or replayed: its hooks still fire) once per batch in every pass, 2 batches x (the
    # FP pass, the calibration pass, 5 x 2 perturbed passes)
    assert calls["block0"] == 2 * (2 + len(names) * len(cands))
    # and the cache really replays: a layer of block 2 skips blocks 0 and 1, the head skips all three
    prefix = measured_mod.PrefixCache(model, ["blocks.0", "blocks.1", "blocks.2"], names)
    with torch.no_grad(), prefix.recording(1e9):
        for b in x.split(4):
            prefix.new_batch()
            model(b)
    assert prefix.skipped_calls("blocks.0.attn.qkv") == 0
    assert prefix.skipped_calls("blocks.2.mlp.fc2") == 2 * 2 and prefix.skipped_calls("head") == 2 * 3


def test_measured_prefix_cache_skips_the_prefix_work(monkeypatch):
    """Fewer block forwards run: block 0's own code runs only for layers of block 0 (and the FP pass)."""
    from mixq.scores import measured as measured_mod

    model, x = _tiny_vit()
    names = ["blocks.0.attn.qkv", "blocks.0.mlp.fc2", "blocks.1.attn.qkv", "blocks.2.mlp.fc1"]
    ran = {"n": 0}
    attn0 = model.blocks[0].attn
    attn0.register_forward_hook(lambda *a: ran.__setitem__("n", ran["n"] + 1))
    measured_mod.measured_scores(model, x, names, [(4, 4)], batch_size=6, cache_dir=False, progress=False)
    assert ran["n"] == 2 + 2  # the FP and calibration passes, then the 2 layers of block 0 (replayed for the others)


def test_measured_prefix_cache_over_its_limit_falls_back_with_a_log_line(caplog):
    from mixq.scores.measured import measured_scores

    model, x = _tiny_vit()
    names = ["blocks.0.mlp.fc1", "blocks.1.attn.qkv"]
    full = measured_scores(model, x, names, [(4, 8)], cache_dir=False, progress=False, prefix_cache=False)
    with caplog.at_level("WARNING", logger="mixq"):
        tiny = measured_scores(model, x, names, [(4, 8)], cache_dir=False, progress=False, max_prefix_mb=1e-3)
    assert tiny == full
    assert any("prefix cache off" in r.getMessage() and "MB" in r.getMessage() for r in caplog.records)


def test_measured_without_blocks_falls_back_with_the_same_numbers(known):
    from mixq.scores.measured import measured_scores

    model, x = known
    args = (model, x, ["loud", "quiet", "dead"], [(4, 4), (8, 8)])
    assert (measured_scores(*args, batch_size=4, cache_dir=False, progress=False) ==
            measured_scores(*args, batch_size=4, cache_dir=False, progress=False, prefix_cache=False))


def test_measured_scores_report_progress_per_layer_and_candidate(known, monkeypatch):
    import mixq.scores.measured as measured_mod

    seen = []

    def fake_bar(items, desc, enabled=True, total=None):
        seen.append((desc, total))
        yield from items

    monkeypatch.setattr(measured_mod, "progress_bar", fake_bar)
    model, x = known
    measured_mod.measured_scores(model, x, ["loud", "quiet"], [(4, 4), (6, 8), (8, 8)], cache_dir=False)
    assert seen == [("measured costs (2 layers x 3 candidates)", 6)]


def test_measured_cache_keys_on_output_fn_and_model_structure(known, tmp_path):
    from mixq.scores.measured import measured_scores

    model, x = known
    a = measured_scores(model, x, ["loud"], [(4, 4)], cache_dir=tmp_path, progress=False,
                        output_fn=lambda m, b: torch.softmax(m(b), -1))
    b = measured_scores(model, x, ["loud"], [(4, 4)], cache_dir=tmp_path, progress=False,
                        output_fn=lambda m, b: torch.softmax(2 * m(b), -1))
    assert len(list(tmp_path.glob("measured-*.json"))) == 2 and a != b
    # same weights, different module settings (LayerNorm eps): different key
    m1, m2 = nn.Sequential(nn.LayerNorm(8, eps=1e-5)), nn.Sequential(nn.LayerNorm(8, eps=1e-3))
    assert cache.fingerprint(m1, x, {}) != cache.fingerprint(m2, x, {})
    assert cache.callable_key(lambda m, b: 1) != cache.callable_key(lambda m, b: 2)


def test_allocate_defaults_to_measured_without_synergy(known, monkeypatch):
    import inspect

    import mixq.scores.kl as kl_mod
    from mixq import allocate

    assert inspect.signature(allocate).parameters["scorer"].default == "measured"
    monkeypatch.setattr(kl_mod, "kl_importance", lambda *a, **k: pytest.fail("the default must not run KL probes"))
    model, x = known
    plan = allocate(model, x, budget=6.0, filter_fn=lambda n, m: n != "dead", cache_dir=False, progress=False)
    assert plan.scorer == "measured" and not plan.synergy and plan.lam == 0.0


def test_measured_prefix_cache_exact_on_tiny_sam_with_repeated_decoder_calls():
    """SAM: encoder blocks and the two-way decoder layers (called once per image, returning tuples)
    are both replayed where the perturbed layer cannot reach them; every KL equals a full forward's."""
    from mixq.models.sam import SamConfig, build_sam
    from mixq.scores.measured import find_blocks, measured_scores

    torch.manual_seed(0)
    model = build_sam(SamConfig(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), img_size=64,
                                window_size=2, prompt_dim=32, decoder_heads=2, decoder_mlp_dim=64, mask_in_chans=4))
    batch = {"images": torch.randn(2, 3, 64, 64), "boxes": torch.tensor([[[4.0, 4, 40, 50]], [[10.0, 0, 60, 30]]])}
    names = ["image_encoder.blocks.1.mlp.lin1", "mask_decoder.transformer.layers.1.mlp.lin2",
             "mask_decoder.transformer.final_attn_token_to_image.out_proj"]
    assert len(find_blocks(model, names)) == 4
    args = (model, [batch], names, [(4, 6)])
    kw = dict(output_fn=mask_probs, cache_dir=False, progress=False)
    full = measured_scores(*args, prefix_cache=False, **kw)
    ran = []
    model.image_encoder.blocks[0].attn.register_forward_hook(lambda *a: ran.append(1))
    assert measured_scores(*args, **kw) == full
    assert len(ran) == 2  # the FP and calibration passes only: every perturbed pass replayed block 0
