"""The pipeline's models made ready to train: frozen base, LoRA layers in fp32, modes set."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from workers.engine.training.config import TrainConfig
from workers.engine.training.lora import TrainableParams, inject_lora


@dataclass(frozen=True)
class TrainingModels:
    """Everything a run loads from a diffusers pipeline folder."""

    noise_scheduler: Any  # the DDPM schedule training adds noise with
    inference_scheduler: Any  # the pipeline's own sampler, for validation images
    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    trainable: TrainableParams


def load_training_models(
    pipeline_dir: Path, *, config: TrainConfig, device: torch.device, weight_dtype: torch.dtype
) -> TrainingModels:
    """Load ``pipeline_dir`` onto ``device`` and inject the LoRA layers ``config`` asks for."""
    path = pipeline_dir
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    inference_scheduler = _inference_scheduler(path)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    # Frozen weights in the compute dtype; LoRA weights are added after and kept in fp32.
    # Any: mypy misreads the decorated .to() of transformers models.
    text_encoder: Any = CLIPTextModel.from_pretrained(
        path, subfolder="text_encoder", dtype=weight_dtype
    )
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=weight_dtype)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=weight_dtype)
    vae.requires_grad_(False)
    for model in (vae, text_encoder, unet):
        model.to(device)
    trainable = inject_lora(unet=unet, text_encoder=text_encoder, config=config)
    for model in (unet, text_encoder):
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            text_encoder.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
    vae.eval()
    unet.train()
    if config.train_text_encoder:
        text_encoder.train()
    else:
        text_encoder.eval()
    return TrainingModels(
        noise_scheduler=noise_scheduler,
        inference_scheduler=inference_scheduler,
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        trainable=trainable,
    )


def _inference_scheduler(pipeline_dir: Path) -> Any:
    """The sampler the pipeline ships (validation renders with it, as users will)."""
    config_path = pipeline_dir / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    scheduler_class = getattr(diffusers, config["_class_name"])
    return scheduler_class.from_pretrained(pipeline_dir, subfolder="scheduler")
