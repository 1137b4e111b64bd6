"""Segment Anything (vit_b / vit_l / vit_h) with box prompts: builder, wrapper, pre/post-processing, adapter.

The wrapper :class:`SamBoxModel` holds segment_anything's ``image_encoder``, ``prompt_encoder`` and
``mask_decoder`` under their original names (so a ``sam_vit_*.pth`` state dict loads unchanged) and
takes one call ``model(images=..., boxes=...)``, which is what ``mixq.quantize_`` calibrates with.

What is quantized (Mix-QSAM / PTQ4SAM practice, stated in :meth:`SamAdapter.describe`): every Linear
of the image encoder's blocks (attn.qkv, attn.proj, mlp.lin1, mlp.lin2) and of the mask decoder's
two-way transformer (q/k/v/out projections of all attentions, mlp.lin1/lin2). Kept in float: the
patch-embedding conv, the neck (1x1/3x3 convs and LayerNorm2d: no Linear), the prompt encoder, the
decoder's output upscaling convs, its hypernetwork MLPs and the IoU head (the output heads).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import ModelAdapter, ModelDescription, mask_probs
from .checkpoints import load_checked, load_state_dict_file

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class SamConfig:
    """Architecture hyper-parameters (the public variants and tiny test configs)."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    img_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_dim: int = 256
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    mask_in_chans: int = 16


SAM_VARIANTS: dict[str, SamConfig] = {
    "vit_b": SamConfig(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamConfig(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamConfig(1280, 32, 16, (7, 15, 23, 31)),
}


class SamBoxModel(nn.Module):
    """SAM driven by box prompts: ``forward(images [B,3,S,S], boxes [B,NB,4])`` -> mask logits [B,NB,s,s].

    ``images`` are preprocessed (normalized, padded to S); ``boxes`` are XYXY in the S-pixel frame.
    One mask per box (``multimask_output=False``, the COCO box-prompt protocol); the logits are the
    decoder's low-resolution masks (S/4).
    """

    def __init__(self, config: SamConfig) -> None:
        super().__init__()
        from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer

        c = config
        grid = c.img_size // c.patch_size
        self.config = c
        self.image_encoder = ImageEncoderViT(
            depth=c.depth, embed_dim=c.embed_dim, img_size=c.img_size, mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=c.num_heads, patch_size=c.patch_size,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=c.global_attn_indexes,
            window_size=c.window_size, out_chans=c.prompt_dim,
        )
        self.prompt_encoder = PromptEncoder(embed_dim=c.prompt_dim, image_embedding_size=(grid, grid),
                                            input_image_size=(c.img_size, c.img_size), mask_in_chans=c.mask_in_chans)
        self.mask_decoder = MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=c.decoder_depth, embedding_dim=c.prompt_dim,
                                          mlp_dim=c.decoder_mlp_dim, num_heads=c.decoder_heads),
            transformer_dim=c.prompt_dim, iou_head_depth=3, iou_head_hidden_dim=c.prompt_dim,
        )

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or boxes.dim() != 3 or boxes.shape[0] != images.shape[0] or boxes.shape[-1] != 4:
            raise ValueError(f"expected images [B,3,S,S] and boxes [B,NB,4], got {tuple(images.shape)} "
                             f"and {tuple(boxes.shape)}")
        embeddings = self.image_encoder(images)
        dense_pe = self.prompt_encoder.get_dense_pe()
        out = []
        for emb, img_boxes in zip(embeddings, boxes):
            sparse, dense = self.prompt_encoder(points=None, boxes=img_boxes, masks=None)
            logits, _ = self.mask_decoder(image_embeddings=emb[None], image_pe=dense_pe,
                                          sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                          multimask_output=False)
            out.append(logits[:, 0])
        return torch.stack(out)


@dataclass(frozen=True)
class SamInput:
    """One preprocessed image: tensor [3,S,S], boxes in the S frame, and what postprocessing needs."""

    image: torch.Tensor
    boxes: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]


def resized_shape(h: int, w: int, target: int) -> tuple[int, int]:
    scale = target / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def preprocess(image: np.ndarray, boxes_xyxy: np.ndarray, img_size: int) -> SamInput:
    """SAM's preprocessing: longest side to ``img_size`` (bilinear), normalize, pad bottom-right."""
    from PIL import Image

    h, w = image.shape[:2]
    nh, nw = resized_shape(h, w, img_size)
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR), dtype=np.float32)
    x = (resized - np.asarray(PIXEL_MEAN, np.float32)) / np.asarray(PIXEL_STD, np.float32)
    x = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))
    x = F.pad(x, (0, img_size - nw, 0, img_size - nh))
    boxes = torch.as_tensor(np.asarray(boxes_xyxy, np.float32).reshape(-1, 4)).clone()
    boxes[:, 0::2] *= nw / w
    boxes[:, 1::2] *= nh / h
    return SamInput(x, boxes, (h, w), (nh, nw))


def postprocess(mask_logits: torch.Tensor, sample: SamInput, img_size: int) -> torch.Tensor:
    """Low-res logits [NB, s, s] -> logits at the original image size [NB, H, W] (as Sam.postprocess_masks)."""
    m = F.interpolate(mask_logits[:, None].float(), (img_size, img_size), mode="bilinear", align_corners=False)
    nh, nw = sample.input_size
    m = m[..., :nh, :nw]
    return F.interpolate(m, sample.original_size, mode="bilinear", align_corners=False)[:, 0]


def build_sam(config: SamConfig, checkpoint: Optional[str | Path] = None) -> SamBoxModel:
    """A :class:`SamBoxModel` in eval mode; weights from ``checkpoint`` (a sam_vit_*.pth) when given."""
    model = SamBoxModel(config)
    if checkpoint is not None:
        load_checked(model, load_state_dict_file(checkpoint), str(checkpoint))
    return model.eval()


class SamAdapter(ModelAdapter):
    """``sam-vit-b|l|h:/path/sam_vit_*.pth``; calibration images from ``calib_dir`` (whole-image box)
    or from COCO-format ``calib_coco`` (json, image dir) with ground-truth boxes."""

    def __init__(self, variant: str = "vit_b", checkpoint: Optional[str | Path] = None,
                 config: Optional[SamConfig] = None, calib_dir: Optional[str | Path] = None,
                 calib_coco: Optional[tuple[str | Path, str | Path]] = None, max_boxes: int = 16) -> None:
        if config is None:
            if variant not in SAM_VARIANTS:
                raise ValueError(f"unknown SAM variant {variant!r}; allowed: {sorted(SAM_VARIANTS)}")
            config = SAM_VARIANTS[variant]
        self.variant, self.config = variant, config
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        if self.checkpoint is not None and not self.checkpoint.is_file():
            raise FileNotFoundError(f"SAM checkpoint not found: {self.checkpoint}")
        self.calib_dir, self.calib_coco, self.max_boxes = calib_dir, calib_coco, max_boxes
        self.name = f"sam-{variant.replace('_', '-')}"

    def build(self) -> nn.Module:
        return build_sam(self.config, self.checkpoint)

    def quant_filter(self, name: str, module: nn.Module) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        return name.startswith("image_encoder.blocks.") or name.startswith("mask_decoder.transformer.")

    def output_fn(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return mask_probs(model, batch)

    def prepare(self, image: np.ndarray, boxes_xyxy: np.ndarray) -> SamInput:
        return preprocess(image, boxes_xyxy, self.config.img_size)

    def calibration_batches(self, n: int = 32, seed: int = 0) -> list[dict[str, torch.Tensor]]:
        """``n`` single-image batches {"images": [1,3,S,S], "boxes": [1,NB,4]}."""
        from .images import list_images, read_rgb, sample_paths

        samples: list[tuple[np.ndarray, np.ndarray]] = []
        if self.calib_coco is not None:
            from ..coco import load_coco

            coco = load_coco(self.calib_coco[0], self.calib_coco[1])
            for img in coco.sample_images(n, seed):
                boxes = coco.gt_boxes_xyxy(img["id"])[: self.max_boxes]
                if len(boxes):
                    samples.append((read_rgb(coco.image_path(img)), boxes))
        elif self.calib_dir is not None:
            for p in sample_paths(list_images(self.calib_dir), n, seed):
                img = read_rgb(p)
                samples.append((img, np.array([[0, 0, img.shape[1], img.shape[0]]], np.float32)))
        else:
            raise ValueError("SAM calibration needs images: pass calib_dir (a folder) or calib_coco (json, images)")
        batches = []
        for img, boxes in samples:
            s = self.prepare(img, boxes)
            batches.append({"images": s.image[None], "boxes": s.boxes[None]})
        return batches

    def describe(self) -> ModelDescription:
        c = self.config
        return ModelDescription(
            name=self.name, family=f"Segment Anything {self.variant} (img {c.img_size}, depth {c.depth})",
            weights=str(self.checkpoint) if self.checkpoint else "random init (no checkpoint)",
            quantized=[f"image_encoder.blocks.{{0..{c.depth - 1}}}.attn.qkv, attn.proj, mlp.lin1, mlp.lin2",
                       "mask_decoder.transformer: self/cross attention q/k/v/out_proj, mlp.lin1/lin2, "
                       "final_attn_token_to_image"],
            kept_float=["image_encoder.patch_embed (conv)", "image_encoder.neck (convs + LayerNorm2d)",
                        "prompt_encoder", "mask_decoder.output_upscaling", "mask_decoder.output_hypernetworks_mlps",
                        "mask_decoder.iou_prediction_head", "attention matmuls and softmax"],
            calibration=f"32 images by default from {self.calib_coco or self.calib_dir}; box prompts "
                        f"{'from ground truth' if self.calib_coco else 'covering the whole image'}",
        )
