"""The tiny and SD 1.5 builders write folders the real from_pretrained loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from workers.engine.model_builder import UNET_CONFIGS


def test_tiny_pipeline_loads_and_generates(tiny_model_dir: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    assert pipe.unet.config.cross_attention_dim == 32
    ids = pipe.tokenizer("a red square").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id
    out = pipe(
        "a red square",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert out.shape == (1, 64, 64, 3)
    again = pipe(
        "a red square",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert (out == again).all()


def test_sd15_config_is_the_full_architecture() -> None:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_CONFIGS["sd15"])
    params = sum(p.numel() for p in unet.parameters())
    assert params == 859_520_964  # SD 1.5 UNet


@pytest.mark.slow
def test_init_model_sd15_loads_with_from_pretrained(tmp_path: Path) -> None:
    out = tmp_path / "sd15"
    subprocess.run(
        [sys.executable, "-m", "lorastack.cli", "init-model", "--preset", "sd15", str(out)],
        check=True,
        env=os.environ.copy(),
    )
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.unet.config.block_out_channels == [320, 640, 1280, 1280]
    assert pipe.text_encoder.config.hidden_size == 768
