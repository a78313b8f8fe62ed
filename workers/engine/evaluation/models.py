"""Evaluator models: CLIP (text-image and image-image) and DINO (image-image), loaded once per
worker with the real ``from_pretrained`` from a hub id or a local folder.

``build_tiny_evaluators`` writes randomly initialised ones (like the tiny base model): their
numbers mean nothing, but every code path is the one real evaluator models take.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

EVALUATOR_NAMES = ("clip", "dino")

_TINY_IMAGE_SIDE = 32
_IMAGENET_MEAN = [0.485, 0.456, 0.406]
_IMAGENET_STD = [0.229, 0.224, 0.225]
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_tiny_evaluators(out_dir: Path, *, seed: int = 0) -> dict[str, Path]:
    """Write a tiny CLIP and a tiny DINOv2 (random weights, with tokenizer and image
    processors) under ``out_dir``; returns name -> folder."""
    from transformers import (
        BitImageProcessorPil,
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        CLIPTokenizer,
        Dinov2Config,
        Dinov2Model,
    )

    from workers.engine.model_builder import write_tokenizer

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    clip_dir = out_dir / "clip"
    write_tokenizer(clip_dir)
    CLIPTokenizer.from_pretrained(clip_dir).save_pretrained(clip_dir)
    clip = CLIPModel(
        CLIPConfig(
            text_config={
                "vocab_size": 1000,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "max_position_embeddings": 77,
                "bos_token_id": 0,
                "eos_token_id": 1,
                "pad_token_id": 1,
            },
            vision_config={
                "image_size": _TINY_IMAGE_SIDE,
                "patch_size": 8,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
            },
            projection_dim=32,
        )
    )
    clip.save_pretrained(clip_dir)
    side = {"shortest_edge": _TINY_IMAGE_SIDE}
    crop = {"height": _TINY_IMAGE_SIDE, "width": _TINY_IMAGE_SIDE}
    CLIPImageProcessorPil(
        size=side, crop_size=crop, image_mean=_CLIP_MEAN, image_std=_CLIP_STD
    ).save_pretrained(clip_dir)
    dino_dir = out_dir / "dino"
    dino = Dinov2Model(
        Dinov2Config(
            image_size=_TINY_IMAGE_SIDE,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            mlp_ratio=2,
        )
    )
    dino.save_pretrained(dino_dir)
    BitImageProcessorPil(
        size=side, crop_size=crop, image_mean=_IMAGENET_MEAN, image_std=_IMAGENET_STD
    ).save_pretrained(dino_dir)
    return {"clip": clip_dir, "dino": dino_dir}


@dataclass
class _Loaded:
    model: Any
    processor: Any
    tokenizer: Any = None


class EvaluatorModels:
    """CLIP and DINO in eval mode on one device; every method returns L2-normalised embeddings
    (CPU, float32), one row per input, in the order given."""

    def __init__(self, sources: dict[str, str], *, device: str = "cpu") -> None:
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, CLIPModel

        missing = [name for name in EVALUATOR_NAMES if name not in sources]
        if missing:
            raise ValueError(f"evaluator models not configured: {', '.join(missing)}")
        self.device = torch.device(device)
        self.sources = dict(sources)
        # Any: mypy misreads the decorated .to() of transformers models.
        clip: Any = CLIPModel.from_pretrained(sources["clip"])
        clip = clip.to(self.device).eval()
        self._clip = _Loaded(
            model=clip,
            processor=AutoImageProcessor.from_pretrained(sources["clip"]),
            tokenizer=AutoTokenizer.from_pretrained(sources["clip"]),
        )
        dino: Any = AutoModel.from_pretrained(sources["dino"])
        dino = dino.to(self.device).eval()
        self._dino = _Loaded(
            model=dino, processor=AutoImageProcessor.from_pretrained(sources["dino"])
        )

    @torch.no_grad()
    def clip_text(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self._clip.tokenizer(
            list(texts), padding=True, truncation=True, return_tensors="pt"
        ).to(self.device)
        return _normalised(_features(self._clip.model.get_text_features(**tokens)))

    @torch.no_grad()
    def clip_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self._pixels(self._clip, images)
        return _normalised(_features(self._clip.model.get_image_features(pixel_values=pixels)))

    @torch.no_grad()
    def dino_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self._pixels(self._dino, images)
        hidden = self._dino.model(pixel_values=pixels).last_hidden_state
        return _normalised(hidden[:, 0])  # the class token, as DINO's own evaluations use

    def _pixels(self, loaded: _Loaded, images: Sequence[Image.Image]) -> torch.Tensor:
        batch = loaded.processor(images=[i.convert("RGB") for i in images], return_tensors="pt")
        pixels: torch.Tensor = batch["pixel_values"].to(self.device, loaded.model.dtype)
        return pixels


def _features(output: Any) -> torch.Tensor:
    """The projected embeddings (transformers 5 may wrap them in an output object)."""
    if isinstance(output, torch.Tensor):
        return output
    pooled: torch.Tensor = output.pooler_output
    return pooled


def _normalised(features: torch.Tensor) -> torch.Tensor:
    features = features.float().cpu()
    return features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
