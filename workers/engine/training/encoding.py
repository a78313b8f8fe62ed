"""From drawn samples to the UNet's inputs: scaled VAE latents and CLIP text embeddings.

With ``cache_latents`` every item's latent distribution (one per flip) is encoded once, before
the first step, and the frozen text encoder's output is kept per caption; without it, each batch
is loaded and encoded as it is drawn.
"""

from __future__ import annotations

from typing import Any

import torch

from workers.engine.training.config import TrainConfig
from workers.engine.training.data import SampleDraw, TrainItem, cache_crop_fraction, load_image


class SampleEncoder:
    """Encodes the run's items; ``text_encoder`` is the one the run trains (or keeps frozen)."""

    def __init__(
        self,
        *,
        items: list[TrainItem],
        config: TrainConfig,
        seed: int,
        vae: Any,
        tokenizer: Any,
        text_encoder: Any,
        device: torch.device,
        weight_dtype: torch.dtype,
    ) -> None:
        self.items = items
        self.config = config
        self.seed = seed
        self.vae = vae
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.device = device
        self.weight_dtype = weight_dtype
        self._latent_cache: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] = {}
        self._text_cache: dict[str, torch.Tensor] = {}

    def fill_latent_cache(self) -> None:
        """Encode every item (and its mirror image with ``random_flip``) once."""
        flips = (False, True) if self.config.random_flip else (False,)
        for item_index, item in enumerate(self.items):
            crop = cache_crop_fraction(seed=self.seed, item_index=item_index)
            for flip in flips:
                pixels = self._load(item, crop=crop, flip=flip)
                mean, std = self._encode_pixels(pixels[None])
                self._latent_cache[(item_index, flip)] = (mean[0], std[0])

    def latents(self, draws: list[SampleDraw], generator: torch.Generator) -> torch.Tensor:
        """Latents sampled from each draw's distribution, scaled as the UNet expects."""
        if self.config.cache_latents:
            mean = torch.stack([self._latent_cache[(d.item_index, d.flip)][0] for d in draws])
            std = torch.stack([self._latent_cache[(d.item_index, d.flip)][1] for d in draws])
        else:
            pixels = torch.stack(
                [
                    self._load(self.items[d.item_index], crop=d.crop_fraction, flip=d.flip)
                    for d in draws
                ]
            )
            mean, std = self._encode_pixels(pixels)
        sample = torch.randn(mean.shape, generator=generator).to(self.device)
        latents = mean + std * sample
        scale: float = self.vae.config.scaling_factor
        return latents * scale

    def text_embeddings(self, captions: list[str]) -> torch.Tensor:
        """The text encoder's last hidden states, with gradients when it is trained."""
        if self.config.train_text_encoder:
            hidden: torch.Tensor = self.text_encoder(self._tokens(captions), return_dict=False)[0]
            return hidden
        missing = [c for c in dict.fromkeys(captions) if c not in self._text_cache]
        if missing:
            with torch.no_grad():
                encoded = self.text_encoder(self._tokens(missing), return_dict=False)[0]
            if not self.config.cache_latents:
                return torch.stack([encoded[missing.index(c)] for c in captions])
            self._text_cache.update(zip(missing, encoded, strict=True))
        return torch.stack([self._text_cache[c] for c in captions])

    def _encode_pixels(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            dist = self.vae.encode(pixels.to(self.device, self.weight_dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def _load(self, item: TrainItem, *, crop: tuple[float, float], flip: bool) -> torch.Tensor:
        return load_image(
            item.image_path,
            resolution=self.config.resolution,
            center_crop=self.config.center_crop,
            crop_fraction=crop,
            flip=flip,
        )

    def _tokens(self, captions: list[str]) -> torch.Tensor:
        ids: torch.Tensor = self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return ids.to(self.device)
