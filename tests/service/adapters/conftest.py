"""Real LoRA files for the adapter-format tests, made on the tiny pipeline.

The source adapter is peft LoRA injected into the tiny UNet and text encoder with random,
non-zero lora_B and alpha != rank, saved with diffusers' own ``save_lora_weights``. Its
in-memory output is the ground truth every converted file must reproduce.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from workers.engine.model_builder import build_pipeline_folder

UNET_RANK, UNET_ALPHA = 4, 8
TEXT_RANK, TEXT_ALPHA = 2, 1
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "proj_in", "conv1"]
UNET_TARGETS += ["time_emb_proj"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]

LoadOutput = Callable[..., torch.Tensor]
# diffusers pipelines set their components dynamically, so mypy cannot see them.
Pipeline = Any


@dataclass(frozen=True)
class SourceLora:
    """A diffusers-format LoRA file and the outputs it must reproduce."""

    path: Path
    tensors: dict[str, torch.Tensor]
    lora_output: torch.Tensor
    base_output: torch.Tensor


def model_output(pipe: Pipeline) -> torch.Tensor:
    """Text encoder + one UNet step on fixed inputs: exercises both LoRA components."""
    ids = torch.tensor([[0, 17, 40, 99, 230, 1]])
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
        return pipe.unet(latents, 500, encoder_hidden_states=hidden).sample


def fresh_pipeline(base: Pipeline) -> Pipeline:
    """A pipeline sharing nothing trainable with ``base`` (LoRA injection mutates models)."""
    return StableDiffusionPipeline(
        vae=base.vae,
        text_encoder=copy.deepcopy(base.text_encoder),
        tokenizer=base.tokenizer,
        unet=copy.deepcopy(base.unet),
        scheduler=base.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def randomise_lora_b(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_pipeline_folder("tiny", tmp_path_factory.mktemp("adapters-base") / "tiny")


@pytest.fixture(scope="session")
def base_pipe(tiny_base_dir: Path) -> Pipeline:
    return StableDiffusionPipeline.from_pretrained(tiny_base_dir)


@pytest.fixture(scope="session")
def source_lora(base_pipe: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> SourceLora:
    pipe = fresh_pipeline(base_pipe)
    base_output = model_output(pipe)
    unet_config = LoraConfig(
        r=UNET_RANK,
        lora_alpha=UNET_ALPHA,
        init_lora_weights="gaussian",
        target_modules=UNET_TARGETS,
    )
    text_config = LoraConfig(
        r=TEXT_RANK,
        lora_alpha=TEXT_ALPHA,
        init_lora_weights="gaussian",
        target_modules=TEXT_TARGETS,
    )
    torch.manual_seed(1)
    pipe.unet.add_adapter(unet_config)
    pipe.text_encoder.add_adapter(text_config)
    randomise_lora_b(pipe.unet, seed=2)
    randomise_lora_b(pipe.text_encoder, seed=3)
    out_dir = tmp_path_factory.mktemp("source-lora")
    StableDiffusionPipeline.save_lora_weights(
        out_dir,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["default"].to_dict(),
    )
    path = out_dir / "pytorch_lora_weights.safetensors"
    return SourceLora(
        path=path,
        tensors=load_file(path),
        lora_output=model_output(pipe),
        base_output=base_output,
    )


@pytest.fixture
def load_output(base_pipe: Pipeline, tmp_path: Path) -> LoadOutput:
    """Write tensors + metadata (or take a file) and load it with plain load_lora_weights."""
    counter = iter(range(1000))

    def load(
        source: Path | Mapping[str, Any],
        metadata: Mapping[str, str] | None = None,
        **load_kwargs: Any,
    ) -> torch.Tensor:
        if isinstance(source, Path):
            path = source
        else:
            path = tmp_path / f"adapter-{next(counter)}.safetensors"
            tensors = {
                k: v if isinstance(v, torch.Tensor) else torch.from_numpy(v.copy())
                for k, v in source.items()
            }
            save_file(tensors, path, metadata=dict(metadata or {}))
        pipe = fresh_pipeline(base_pipe)
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, **load_kwargs)
        return model_output(pipe)

    return load
