"""Validation images: each prompt rendered without and with the LoRA, from the same seed.

The images without the LoRA do not change while training, so each (prompt, seed) is rendered
once per run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from accelerate import Accelerator
from diffusers import StableDiffusionPipeline

from workers.engine.training.callbacks import ValidationImage
from workers.engine.training.config import TrainConfig


class ValidationRenderer:
    """Renders ``config.validation_prompts`` with the models being trained."""

    def __init__(
        self, *, accelerator: Accelerator, config: TrainConfig, seed: int, scheduler: Any
    ) -> None:
        self.accelerator = accelerator
        self.config = config
        self.seed = seed
        self.scheduler = scheduler
        self._base_images: dict[tuple[str, int], Any] = {}

    def render(
        self,
        *,
        unet: torch.nn.Module,
        text_encoder: torch.nn.Module,
        vae: torch.nn.Module,
        tokenizer: Any,
    ) -> list[ValidationImage]:
        """One image pair per prompt; the trained models are back in train mode afterwards."""
        pipe: Any = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        images = []
        unet.eval()
        text_encoder.eval()
        try:
            for index, prompt in enumerate(self.config.validation_prompts):
                seed = self.seed + index
                if (prompt, seed) not in self._base_images:
                    with _adapters_disabled(unet, text_encoder):
                        self._base_images[(prompt, seed)] = self._image(pipe, prompt, seed)
                lora_image = self._image(pipe, prompt, seed)
                images.append(
                    ValidationImage(prompt, seed, self._base_images[(prompt, seed)], lora_image)
                )
        finally:
            unet.train()
            if self.config.train_text_encoder:
                text_encoder.train()
        return images

    def _image(self, pipe: Any, prompt: str, seed: int) -> Any:
        generator = torch.Generator("cpu").manual_seed(seed)
        with torch.no_grad(), self.accelerator.autocast():
            output = pipe(
                prompt,
                num_inference_steps=self.config.validation_inference_steps,
                height=self.config.resolution,
                width=self.config.resolution,
                generator=generator,
            )
        return output.images[0]


@contextmanager
def _adapters_disabled(*models: torch.nn.Module) -> Iterator[None]:
    with_adapters = [m for m in models if getattr(m, "peft_config", None)]
    for model in with_adapters:
        model.disable_adapters()  # type: ignore[operator]
    try:
        yield
    finally:
        for model in with_adapters:
            model.enable_adapters()  # type: ignore[operator]
