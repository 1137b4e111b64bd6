"""Issue 15, phase 2: quantized attention beyond ViT — timm Swin WindowAttention, SAM's image-encoder
and mask-decoder Attention — on tiny random-weight models, and checkpoints of quantized attention."""

import copy
import json
import struct

import pytest
import torch
from torch import nn

import mixq
from mixq import formats
from mixq.attention import (QuantAttention, QuantSamAttention, QuantSamDecoderAttention, QuantWindowAttention,
                            is_supported_attention, quantized_attention, wrap_attention)
from mixq.backends import available_backends
from mixq.checkpoint import CheckpointError, read
from mixq.config import AttentionConfig, LinearConfig, QuantConfig
from mixq.quantize import quantize_, set_simulate

timm = pytest.importorskip("timm")
pytest.importorskip("segment_anything")

BITS = (4, 6, 8)


# ----------------------------------------------------------------------------- tiny models


def _tiny_swin(seed: int = 0) -> nn.Module:
    """Two stages of two blocks: the second block of each stage is shifted (it gets the window mask)
    except where the grid is one window (stage 2 here: 8x8 tokens, window 4 -> 4 windows, shifted)."""
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(seed)
    return SwinTransformer(img_size=64, patch_size=4, window_size=4, embed_dim=24, depths=(2, 2),
                           num_heads=(2, 4), num_classes=10).eval()


def _randomize_rel_pos(model: nn.Module, seed: int) -> nn.Module:
    """SAM initializes its relative positions to zero; random ones exercise the rel-pos path."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("rel_pos_h", "rel_pos_w")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _tiny_sam_encoder(seed: int = 0) -> nn.Module:
    """Block 0 windowed (window 3 on a 4x4 grid: padded to 6x6, four windows), block 1 global."""
    from segment_anything.modeling import ImageEncoderViT

    torch.manual_seed(seed)
    enc = ImageEncoderViT(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
                          out_chans=16, qkv_bias=True, use_rel_pos=True, window_size=3, global_attn_indexes=(1,))
    return _randomize_rel_pos(enc, seed).eval()


def _tiny_sam(seed: int = 0) -> nn.Module:
    from mixq.models.sam import SamBoxModel, SamConfig

    torch.manual_seed(seed)
    cfg = SamConfig(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), img_size=64, patch_size=16,
                    window_size=3, prompt_dim=32, decoder_depth=1, decoder_heads=2, decoder_mlp_dim=32,
                    mask_in_chans=4)
    return _randomize_rel_pos(SamBoxModel(cfg), seed).eval()


def _deit_s(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("deit_small_patch16_224", pretrained=False, img_size=32).eval()


def _sam_inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.randn(2, 3, 64, 64, generator=g),
            "boxes": torch.tensor([[[4.0, 8.0, 40.0, 60.0]], [[0.0, 0.0, 64.0, 64.0]]])}


def _run(model: nn.Module, x):
    with torch.no_grad():
        return model(**x) if isinstance(x, dict) else model(x)


# ----------------------------------------------------------------------------- one attention module
# (kind, a float module, its inputs): inputs are the module's forward arguments; qkv weights scaled up
# for peaked attention, as in trained models.


def _swin_case(seed: int, shifted: bool):
    from timm.models.swin_transformer import WindowAttention

    torch.manual_seed(seed)
    attn = WindowAttention(dim=24, num_heads=2, window_size=4).eval()
    with torch.no_grad():
        attn.qkv.weight.mul_(3)
        attn.relative_position_bias_table.normal_(0, 1)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(6, 16, 24, generator=g)  # 2 images x 3 windows of 16 tokens
    mask = None
    if shifted:  # 0 / -100 per window pair of tokens, as timm's shift mask
        mask = (torch.rand(3, 16, 16, generator=g) < 0.3).float() * -100.0
        mask.diagonal(dim1=1, dim2=2).zero_()
    return attn, (x,), ({"mask": mask} if shifted else {})


def _sam_encoder_case(seed: int, windowed: bool):
    from segment_anything.modeling.image_encoder import Attention

    torch.manual_seed(seed)
    h, w = (3, 3) if windowed else (4, 5)
    attn = Attention(dim=32, num_heads=2, qkv_bias=True, use_rel_pos=True, input_size=(h, w)).eval()
    _randomize_rel_pos(attn, seed)
    with torch.no_grad():
        attn.qkv.weight.mul_(3)
    x = torch.randn(3, h, w, 32, generator=torch.Generator().manual_seed(seed + 1))
    return attn, (x,), {}


def _sam_decoder_case(seed: int):
    from segment_anything.modeling.transformer import Attention

    torch.manual_seed(seed)
    attn = Attention(embedding_dim=32, num_heads=2, downsample_rate=2).eval()
    with torch.no_grad():
        attn.q_proj.weight.mul_(3)
    g = torch.Generator().manual_seed(seed + 1)
    q, kv = torch.randn(2, 5, 32, generator=g), torch.randn(2, 19, 32, generator=g)  # cross: N=5, M=19
    return attn, (q, kv, kv + 0.1 * torch.randn(2, 19, 32, generator=g)), {}


CASES = {
    "swin": lambda s: _swin_case(s, False),
    "swin_shifted": lambda s: _swin_case(s, True),
    "sam_window": lambda s: _sam_encoder_case(s, True),
    "sam_global": lambda s: _sam_encoder_case(s, False),
    "sam_decoder": _sam_decoder_case,
}
CLASSES = {"swin": QuantWindowAttention, "swin_shifted": QuantWindowAttention, "sam_window": QuantSamAttention,
           "sam_global": QuantSamAttention, "sam_decoder": QuantSamDecoderAttention}


def _qkv_of(case: str, attn: nn.Module, args: tuple):
    """(q, k, v) [..., tokens, head_dim] in float, as the float module computes them."""
    if case.startswith("swin"):
        x = args[0]
        q, k, v = attn.qkv(x).reshape(x.shape[0], x.shape[1], 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        return q, k, v
    if case.startswith("sam_") and case != "sam_decoder":
        x = args[0]
        b, h, w, _ = x.shape
        qkv = attn.qkv(x).reshape(b, h * w, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        return qkv.reshape(3, b * attn.num_heads, h * w, -1).unbind(0)
    return tuple(attn._separate_heads(p(t), attn.num_heads)
                 for p, t in zip((attn.q_proj, attn.k_proj, attn.v_proj), args))


def _float64_reference(case: str, attn: nn.Module, args: tuple, kw: dict, bits: int, kind: str) -> torch.Tensor:
    """Independent fake-quant re-implementation: formats' quantizers, matmuls in float64, and the float
    module's own additive terms (Swin bias and mask, SAM rel-pos from the float q) in its order."""
    from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

    q, k, v = _qkv_of(case, attn, args)
    qc, qs = formats.quantize_act_dynamic(q, bits)
    kc, ks = formats.quantize_act_dynamic(k, bits)
    vc, vs = formats.quantize_act_dynamic(v.transpose(-2, -1), bits)
    s = ((qc.double() * qs.double()[..., None]) @ (kc.double() * ks.double()[..., None]).transpose(-2, -1)).float()
    if case.startswith("swin"):
        s = s * attn.scale + attn._get_rel_pos_bias()
        if kw.get("mask") is not None:
            m = kw["mask"]
            s = (s.view(-1, m.shape[0], attn.num_heads, *m.shape[1:]) + m[None, :, None]).view(s.shape)
    elif case == "sam_decoder":
        s = s / q.shape[-1] ** 0.5
    else:
        b, h, w, _ = args[0].shape
        s = add_decomposed_rel_pos(s * attn.scale, q, attn.rel_pos_h, attn.rel_pos_w, (h, w), (h, w))
    pf = formats.prob_values(formats.quantize_probs(s.softmax(-1), bits, kind), bits, kind, torch.float64)
    o = (pf @ (vc.double() * vs.double()[..., None]).transpose(-2, -1)).float()
    if case.startswith("swin"):
        return attn.proj(o.transpose(1, 2).reshape(*args[0].shape[:2], -1))
    if case == "sam_decoder":
        return attn.out_proj(attn._recombine_heads(o))
    b, h, w, _ = args[0].shape
    return attn.proj(o.view(b, attn.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1))


@pytest.mark.parametrize("case", list(CASES))
def test_structure_with_quantization_off_is_the_float_module(case):
    """With both matmuls replaced by plain fp32 ones, the quantized module is the float module:
    scale, bias, mask, rel-pos, softmax and the reshapes are timm's / SAM's."""
    attn, args, kw = CASES[case](0)
    qa = wrap_attention(attn, 8)
    assert type(qa) is CLASSES[case]
    qa._scores = lambda q, k: q.float() @ k.float().transpose(-2, -1)
    qa._mix = lambda p, v: p.float() @ v.float()
    with torch.no_grad():
        torch.testing.assert_close(qa(*args, **kw), attn(*args, **kw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", formats.P_GRIDS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("case", list(CASES))
def test_module_matches_float64_fake_quant_simulation_and_backends(case, bits, kind):
    attn, args, kw = CASES[case](bits)
    with torch.no_grad():
        ref = _float64_reference(case, attn, args, kw, bits, kind)
        qa = wrap_attention(attn, bits, p_grid=kind, backend="reference")
        out = qa(*args, **kw)
        assert torch.equal(qa.set_simulate(True)(*args, **kw), out)
        for backend in available_backends("cpu"):  # cpu (native kernels or its reference fallback)
            assert torch.equal(wrap_attention(attn, bits, p_grid=kind, backend=backend)(*args, **kw), out)
    # float rounding only: an ulp-moved score can flip one probability code, allow rare such elements
    err = (out - ref).abs()
    assert (err > 1e-4 * ref.abs().max()).float().mean() < 0.02, float(err.max())
    assert not torch.equal(out, attn(*args, **kw))


@pytest.mark.parametrize("case", list(CASES))
def test_mixed_bits_and_float_ops(case):
    attn, args, kw = CASES[case](3)
    with torch.no_grad():
        full = wrap_attention(attn, 8, v_bits=4)(*args, **kw)
        for float_op in ("qk", "pv"):
            qa = wrap_attention(attn, 8, v_bits=4, float_ops=(float_op,))
            out = qa(*args, **kw)
            assert torch.equal(qa.set_simulate(True)(*args, **kw), out)
            assert not torch.equal(out, full)
            assert qa.layer_config()["ops"] == [op for op in ("qk", "pv") if op != float_op]


@pytest.mark.parametrize("case", list(CASES))
def test_simulation_gives_gradients(case):
    attn, args, kw = CASES[case](1)
    args = tuple(a.clone().requires_grad_(True) for a in args)
    qa = wrap_attention(attn, 6, simulate=True)
    qa(*args, **kw).square().sum().backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in args)
    for name, p in qa.named_parameters():  # the projections, Swin's bias table, SAM's rel-pos tables
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# 8-bit Q/K/V codes cost ~0.5% (a step of amax/127 per token/channel); the uniform 8-bit probability grid
# (step 1/255) a few percent of an output that averages a few peaked tokens. The log2 grid rounds every
# probability to a power of two (up to 41% off one probability, see DESIGN_NOTES), so its bound is loose.
CLOSE_AT_8 = {"uniform": 0.05, "log2": 0.3}


@pytest.mark.parametrize("kind", formats.P_GRIDS)
@pytest.mark.parametrize("case", list(CASES))
def test_close_to_float_at_8_bits(case, kind):
    attn, args, kw = CASES[case](7)
    with torch.no_grad():
        fp = attn(*args, **kw)
        out = wrap_attention(attn, 8, p_grid=kind)(*args, **kw)
    rel = float((out - fp).norm() / fp.norm())
    assert rel < CLOSE_AT_8[kind], rel


# ----------------------------------------------------------------------------- whole models


def _quantized(model: nn.Module, attention: AttentionConfig = AttentionConfig(), backend=None,
               filter_fn=None) -> nn.Module:
    config = QuantConfig(LinearConfig(act_quant="dynamic", weight_method="rtn"), attention, backend=backend)
    return quantize_(model, config, filter_fn=filter_fn, progress=False)


MODELS = {
    "swin": (_tiny_swin, lambda: torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)),
             {QuantWindowAttention: 4}),
    "sam_encoder": (_tiny_sam_encoder, lambda: torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)),
                    {QuantSamAttention: 2}),
    # 1 two-way block (self, token->image, image->token) + the final token->image attention
    "sam": (_tiny_sam, _sam_inputs, {QuantSamAttention: 2, QuantSamDecoderAttention: 4}),
    "deit_s": (_deit_s, lambda: torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)),
               {QuantAttention: 12}),
}


def _kinds(model: nn.Module) -> dict[type, int]:
    out: dict[type, int] = {}
    for m in quantized_attention(model).values():
        out[type(m)] = out.get(type(m), 0) + 1
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_model_quantize_forward_save_load(name, tmp_path):
    """quantize_ -> forward -> (simulate equal, near float) -> save -> load into a fresh, differently
    initialized float model -> bit-identical outputs."""
    build, inputs, kinds = MODELS[name]
    model, x = build(0), inputs()
    fp = _run(model, x)
    heavy = name == "deit_s"  # 22M weights: one quantization only (the backends are compared on the others)
    q = _quantized(model if heavy else copy.deepcopy(model), AttentionConfig(qk_bits=8),
                   backend=None if heavy else "reference")
    assert _kinds(q) == kinds
    out = _run(q, x)
    assert torch.equal(_run(set_simulate(q, True), x), out)
    set_simulate(q, False)
    # random weights: near-uniform attention, where the log2 grid costs most (see DESIGN_NOTES)
    assert float((out - fp).norm() / fp.norm()) < 0.3
    for backend in [] if heavy else available_backends("cpu"):
        assert torch.equal(_run(_quantized(copy.deepcopy(model), AttentionConfig(qk_bits=8), backend=backend), x), out)
    path = mixq.save(q, tmp_path / f"{name}.safetensors")
    _, meta = read(path)
    assert meta["format_version"] == "3"
    assert {n: r["config"] for n, r in meta["attention"].items()} == {
        n: m.layer_config() for n, m in quantized_attention(q).items()}
    loaded = mixq.load(path, build(1))
    assert _kinds(loaded) == kinds
    for n, m in quantized_attention(loaded).items():
        assert m.layer_config() == quantized_attention(q)[n].layer_config()
    assert torch.equal(_run(loaded, x), out)


def test_swin_model_exercises_the_shift_mask():
    model = _tiny_swin()
    shifted = [n for n, m in model.named_modules() if getattr(m, "attn_mask", None) is not None]
    assert shifted, "no shifted-window block: the mask path would be untested"
    q = _quantized(model)
    assert all(isinstance(q.get_submodule(n).attn, QuantWindowAttention) for n in shifted)


def test_mixed_per_matmul_bits_round_trip(tmp_path):
    """Per-module settings, as an allocator would set them, survive save/load."""
    model, x = _tiny_sam(), _sam_inputs()
    q = quantize_(model, QuantConfig(LinearConfig(act_quant="dynamic", weight_method="rtn")), progress=False)
    names = [n for n, m in q.named_modules() if is_supported_attention(m)]
    assert len(names) == 6
    for i, n in enumerate(names):
        q.set_submodule(n, wrap_attention(q.get_submodule(n), (4, 6, 8)[i % 3], v_bits=(8, 4, 6)[i % 3],
                                          p_grid=("log2", "uniform")[i % 2],
                                          float_ops=((), ("qk",), ("pv",))[i % 3]))
    out = _run(q, x)
    loaded = mixq.load(mixq.save(q, tmp_path / "m.safetensors"), _tiny_sam(2))
    assert {n: m.layer_config() for n, m in quantized_attention(loaded).items()} == {
        n: m.layer_config() for n, m in quantized_attention(q).items()}
    assert torch.equal(_run(loaded, x), out)


def test_sam_encoder_alone_by_filter_or_skip():
    from mixq.models.sam import SamAdapter

    adapter_filter = SamAdapter.quant_filter
    enc_only = lambda n, m: isinstance(m, nn.Linear) and n.startswith("image_encoder.blocks.")  # noqa: E731
    q = _quantized(_tiny_sam(), filter_fn=enc_only)
    assert _kinds(q) == {QuantSamAttention: 2}
    q = _quantized(_tiny_sam(), AttentionConfig(skip=("mask_decoder.*",)))
    assert _kinds(q) == {QuantSamAttention: 2}
    q = _quantized(_tiny_sam(), filter_fn=lambda n, m: adapter_filter(None, n, m))
    assert _kinds(q) == {QuantSamAttention: 2, QuantSamDecoderAttention: 4}


# ----------------------------------------------------------------------------- checkpoint errors


def _rewrite_header(raw: bytes, attention=None, **changes) -> bytes:
    """The file with its metadata changed and the checksum recomputed (a well-formed but edited file)."""
    from mixq.checkpoint import _digest
    from safetensors.torch import load

    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8: 8 + n])
    meta = header["__metadata__"]
    if attention is not None:
        meta["attention"] = json.dumps(attention, sort_keys=True)
    meta.update(changes)
    meta["sha256"] = _digest(load(raw), meta)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    return struct.pack("<Q", len(new)) + new + raw[8 + n:]


@pytest.fixture(scope="module")
def deit_file(tmp_path_factory):
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=1, img_size=32).eval()
    path = mixq.save(_quantized(copy.deepcopy(model)), tmp_path_factory.mktemp("ck") / "deit.safetensors")
    return model, path, read(path)[1]["attention"]


def _edited(records, name, **cfg_changes):
    out = copy.deepcopy(records)
    rec = out[name]
    rec["config"].update({k: v for k, v in cfg_changes.items() if k != "kind"})
    if "kind" in cfg_changes:
        rec["kind"] = cfg_changes["kind"]
    return out


@pytest.mark.parametrize("change, match", [
    (dict(kind="timm_flash"), r"kind 'timm_flash'.*known kinds: \['sam_decoder', 'sam_encoder', 'timm_swin'"),
    (dict(kind="timm_swin"), r"is timm_swin .*WindowAttention\) but the model has timm\S*\.Attention there"),
    (dict(qk_bits=5), r"invalid config .*qk_bits=5"),
    (dict(p_grid="log_sqrt2"), r"invalid config .*p_grid='log_sqrt2'"),
    (dict(softmax_quant="log2"), r"has both 'softmax_quant' and 'p_grid', the old and the new name"),
    (dict(ops=[]), r"ops must be a non-empty subset"),
    (dict(ops=["pv", "qk"]), r"does not round-trip"),
])
def test_load_refuses_bad_attention_records(deit_file, tmp_path, change, match):
    model, path, records = deit_file
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(_rewrite_header(path.read_bytes(), _edited(records, "blocks.0.attn", **change)))
    fresh = copy.deepcopy(model)
    with pytest.raises(CheckpointError, match=match):
        mixq.load(bad, fresh)
    assert not quantized_attention(fresh) and isinstance(fresh.blocks[0].attn.qkv, nn.Linear)  # untouched


def test_load_refuses_attention_at_a_missing_or_wrong_module(deit_file, tmp_path):
    model, path, records = deit_file
    for name, match in (("blocks.7.attn", "missing from the model"), ("blocks.0.mlp", "but the model has")):
        recs = {name: records["blocks.0.attn"]}
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(_rewrite_header(path.read_bytes(), recs))
        with pytest.raises(CheckpointError, match=match):
            mixq.load(bad, copy.deepcopy(model))


def test_version_2_files_are_unchanged_and_cannot_carry_attention(deit_file, tmp_path):
    model, path, records = deit_file
    linear_only = QuantConfig(LinearConfig(act_quant="dynamic", weight_method="rtn"))
    plain = mixq.save(quantize_(copy.deepcopy(model), linear_only, progress=False), tmp_path / "plain.safetensors")
    _, meta = read(plain)  # a model without quantized attention: the version-2 file of before, plus its config
    assert meta["format_version"] == "2" and meta["attention"] == {}
    from safetensors import safe_open

    with safe_open(str(plain), framework="pt") as f:
        assert sorted(f.metadata()) == ["config", "extra", "format", "format_version", "layers", "mixq_version",
                                        "model_spec", "sha256"]
    assert not quantized_attention(mixq.load(plain, copy.deepcopy(model)))
    bad = tmp_path / "v2attn.safetensors"
    bad.write_bytes(_rewrite_header(path.read_bytes(), format_version="2"))
    with pytest.raises(CheckpointError, match="version-2 checkpoint with an 'attention' entry"):
        mixq.load(bad, copy.deepcopy(model))


@pytest.mark.parametrize("build", [_tiny_swin, _tiny_sam_encoder])
def test_compile_fullgraph_traces_swin_and_sam_attention(build):
    model = _quantized(build())
    x = torch.randn(1, 3, 64, 64)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, backend=record)(x)
    n = len(quantized_attention(model))
    assert len(graphs) == 1
    assert graphs[0].count("mixq.quantized_qk") == n and graphs[0].count("mixq.quantized_pv") == n
    assert torch.equal(compiled, eager)
