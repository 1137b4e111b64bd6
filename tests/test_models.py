"""Model adapters on tiny random configs of each family: build, filters, outputs, checkpoints, quantize."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mixq.models import get_adapter, list_models
from mixq.models.base import ModelAdapter
from mixq.models.checkpoints import load_state_dict_file
from mixq.config import LinearConfig, QuantConfig
from mixq.quantize import quantize_, quantized_layers

TINY_SAM = dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), img_size=64, window_size=2,
                prompt_dim=32, decoder_heads=2, decoder_mlp_dim=64, mask_in_chans=4)
TINY_TIMM = {
    "vit_tiny_patch16_224": dict(depth=2, img_size=32, num_classes=5),
    "deit_tiny_distilled_patch16_224": dict(depth=1, img_size=32, num_classes=5),
    "swin_tiny_patch4_window7_224": dict(depths=(1, 1), num_heads=(1, 2), embed_dim=16, img_size=32,
                                         window_size=4, num_classes=5),
}


def tiny_sam_adapter(checkpoint=None, **kw):
    from mixq.models.sam import SamAdapter, SamConfig

    return SamAdapter("vit_b", checkpoint, config=SamConfig(**TINY_SAM), **kw)


def write_images(folder, n: int, size=(40, 48)) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"img_{i}.png")


# ----------------------------------------------------------------------------- registry


def test_registry_lists_and_resolves_specs(tmp_path):
    names = list_models()
    assert names[0] == "dinov2-s" and any(n.startswith("sam-vit-h:") for n in names)
    assert get_adapter().name == "dinov2-s"
    ckpt = tmp_path / "sam.pth"
    torch.save(tiny_sam_adapter().build().state_dict(), ckpt)
    sam = get_adapter(f"sam-vit-l:{ckpt}")
    assert sam.variant == "vit_l" and sam.config.depth == 24
    assert get_adapter(f"timm:vit_tiny_patch16_224:{ckpt}").arch == "vit_tiny_patch16_224"


@pytest.mark.parametrize("spec, match", [
    ("resnet50", "unknown model spec"),
    ("sam-vit-b", "needs a checkpoint path"),
    ("timm:vit_tiny_patch16_224", "timm:<arch>:/path/checkpoint"),
    ("sam-vit-b:/does/not/exist.pth", "not found"),
    ("", "non-empty"),
])
def test_registry_rejects_bad_specs(spec, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        get_adapter(spec)


# ----------------------------------------------------------------------------- SAM


def test_sam_filter_quantizes_encoder_and_two_way_transformer_only():
    adapter = tiny_sam_adapter()
    model = adapter.build()
    chosen = adapter.quantizable_linears(model)
    # encoder: 4 Linears x 2 blocks; decoder: 2 two-way layers x (3 attentions x 4 + mlp 2) + final attention 4
    assert len(chosen) == 8 + 2 * 14 + 4
    kept = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in chosen]
    assert kept and all("output_hypernetworks_mlps" in n or "iou_prediction_head" in n for n in kept)
    assert not any(n.startswith(("image_encoder.neck", "image_encoder.patch_embed", "prompt_encoder")) for n in chosen)


def test_sam_forward_output_and_calibration(tmp_path):
    write_images(tmp_path / "calib", 3)
    adapter = tiny_sam_adapter(calib_dir=tmp_path / "calib")
    model = adapter.build()
    batches = adapter.calibration_batches(n=2)
    assert len(batches) == 2 and batches[0]["images"].shape == (1, 3, 64, 64)
    box = batches[0]["boxes"][0, 0]
    assert box[2] == 64 or box[3] == 64  # whole-image box in the resized frame
    with torch.no_grad():
        probs = adapter.output_fn(model, batches[0])
    assert probs.shape == (1, 16 * 16)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1), rtol=0, atol=1e-5)
    assert "mask_decoder.iou_prediction_head" in " ".join(adapter.describe().kept_float)


def test_sam_checkpoint_roundtrip_and_mismatch(tmp_path):
    torch.manual_seed(1)
    src = tiny_sam_adapter().build()
    good = tmp_path / "sam_tiny.pth"
    torch.save({"model": src.state_dict()}, good)  # wrapped dicts are unwrapped
    loaded = tiny_sam_adapter(good).build()
    for (k, a), (_, b) in zip(src.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    sd = src.state_dict()
    sd["image_encoder.blocks.1.mlp.lin1.weight"] = torch.zeros(3, 3)
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    with pytest.raises(ValueError, match=r"image_encoder\.blocks\.1\.mlp\.lin1\.weight"):
        tiny_sam_adapter(bad).build()
    del sd["image_encoder.blocks.1.mlp.lin1.weight"]
    torch.save(sd, bad)
    with pytest.raises(ValueError, match=r"missing.*|.*lin1\.weight.*missing"):
        tiny_sam_adapter(bad).build()


def test_sam_quantizes_with_adapter_filter(tmp_path):
    write_images(tmp_path / "calib", 2)
    adapter = tiny_sam_adapter(calib_dir=tmp_path / "calib")
    torch.manual_seed(0)
    model = adapter.build()
    batches = adapter.calibration_batches(n=2)
    with torch.no_grad():
        ref = adapter.output_fn(model, batches[0])
        quantize_(model, QuantConfig(LinearConfig(8, 8), simulate=True), batches, filter_fn=adapter.quant_filter,
                  progress=False)
        out = adapter.output_fn(model, batches[0])
    assert set(quantized_layers(model)) == set(adapter.quantizable_linears(tiny_sam_adapter().build()))
    assert (out - ref).abs().sum() < 0.05  # W8A8 keeps the mask distribution (total variation x2)


# ----------------------------------------------------------------------------- timm


@pytest.mark.parametrize("arch", list(TINY_TIMM))
def test_timm_tiny_families(arch, tmp_path):
    from mixq.models.timm_models import TimmAdapter

    write_images(tmp_path / "calib" / "a", 2)
    adapter = TimmAdapter(arch, calib_dir=tmp_path / "calib", **TINY_TIMM[arch])
    model = adapter.build()
    chosen = adapter.quantizable_linears(model)
    heads = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in chosen]
    assert chosen and heads and all(n.startswith("head") for n in heads)
    calib = adapter.calibration_batches(n=2)
    assert calib.shape == (2, 3, 32, 32)
    with torch.no_grad():
        ref = adapter.output_fn(model, calib)
        quantize_(model, QuantConfig(LinearConfig(8, 8), simulate=True), calib, filter_fn=adapter.quant_filter,
                  progress=False)
        out = adapter.output_fn(model, calib)
    assert ref.shape == (2, 5)
    torch.testing.assert_close(ref.sum(-1), torch.ones(2, dtype=ref.dtype), rtol=0, atol=1e-5)
    assert len(quantized_layers(model)) == len(chosen)
    assert (out - ref).abs().max() < 0.05


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_checkpoint_roundtrip_and_mismatch(suffix, tmp_path):
    from safetensors.torch import save_file

    from mixq.models.timm_models import TimmAdapter

    kw = TINY_TIMM["vit_tiny_patch16_224"]
    torch.manual_seed(2)
    src = TimmAdapter("vit_tiny_patch16_224", **kw).build()
    path = tmp_path / f"vit{suffix}"
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path)
    loaded = TimmAdapter("vit_tiny_patch16_224", path, **kw).build()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), src(x), rtol=0, atol=0)
    # the same checkpoint into a deeper model: the first missing tensor is named
    with pytest.raises(ValueError, match=r"'blocks\.2\."):
        TimmAdapter("vit_tiny_patch16_224", path, **dict(kw, depth=3)).build()
    with pytest.raises(ValueError, match="unexpected tensor 'extra.weight'"):
        sd["extra.weight"] = torch.zeros(1)
        bad = tmp_path / "extra.pth"
        torch.save(sd, bad)
        TimmAdapter("vit_tiny_patch16_224", bad, **kw).build()


def test_checkpoint_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_state_dict_file(tmp_path / "none.pth")
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported checkpoint type"):
        load_state_dict_file(tmp_path / "w.onnx")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_state_dict_file(tmp_path / "list.pth")


def test_timm_calibration_needs_images(tmp_path):
    from mixq.models.timm_models import TimmAdapter

    adapter = TimmAdapter("vit_tiny_patch16_224", **TINY_TIMM["vit_tiny_patch16_224"])
    with pytest.raises(ValueError, match="calib_dir"):
        adapter.calibration_batches()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        TimmAdapter("vit_tiny_patch16_224", calib_dir=tmp_path / "empty").calibration_batches()


# ----------------------------------------------------------------------------- DINOv2 (built-in)


def test_dinov2_adapter_filter_calibration_and_description():
    from mixq.models.textile import textile_split

    adapter = get_adapter("dinov2-s")
    assert isinstance(adapter, ModelAdapter)
    model = adapter.build()
    chosen = adapter.quantizable_linears(model)
    assert len(chosen) == 48
    assert {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in chosen} == {
        "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"}
    calib_paths = adapter.calibration_paths(n=32)
    assert len(set(calib_paths)) == 32
    assert not set(calib_paths) & set(textile_split("test").paths)  # calibration never sees test images
    x = adapter.calibration_batches(n=2)
    assert x.shape == (2, 3, 224, 224)
    with torch.no_grad():
        p = adapter.output_fn(model, x)
    assert p.shape == (2, 224 * 224)
    torch.testing.assert_close(p.sum(-1), torch.ones(2), rtol=0, atol=1e-4)
    text = str(adapter.describe())
    assert "48 Linears" in text and "saliency decoder" in text
