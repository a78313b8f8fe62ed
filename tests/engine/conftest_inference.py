"""Fixtures for the inference tests: the tiny pipeline and random LoRA files made by peft.

Imported by the test modules (tests/engine/conftest.py belongs to another package's tests).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionPipeline

from tests.fixtures.random_lora import RandomLoraSpec, RandomLoraWriter
from workers.engine.model_builder import build_pipeline_folder

# The adapters the tests use: different ranks, alphas, targets (Linear and 1x1 Conv2d), text
# encoder LoRA, and one file without alpha metadata.
LORA_SPECS: dict[str, RandomLoraSpec] = {
    "a": RandomLoraSpec(rank=4, alpha=8),
    "b": RandomLoraSpec(
        rank=8,
        alpha=4,
        unet_targets=("to_k", "to_v", "proj_in", "ff.net.2"),
        text_encoder_targets=("q_proj", "fc1"),
    ),
    "no_metadata": RandomLoraSpec(rank=8, alpha=2, with_metadata=False),
    "text_only": RandomLoraSpec(rank=4, alpha=2, unet_targets=(), text_encoder_targets=("k_proj",)),
    "rank16": RandomLoraSpec(rank=16, alpha=16),
}


@pytest.fixture(scope="module", autouse=True)
def single_cpu_thread() -> Iterator[None]:
    """One torch thread: on a small shared CPU more threads contend and run several times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_pipeline_folder("tiny", tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def lora_writer(tiny_pipeline_dir: Path) -> RandomLoraWriter:
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    return RandomLoraWriter(pipeline)


@pytest.fixture(scope="session")
def lora_files(
    tmp_path_factory: pytest.TempPathFactory, lora_writer: RandomLoraWriter
) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("loras")
    return {
        name: lora_writer.write(out / f"{name}.safetensors", spec, seed=index + 1)
        for index, (name, spec) in enumerate(LORA_SPECS.items())
    }


@pytest.fixture
def fresh_pipeline(tiny_pipeline_dir: Path) -> Callable[[], Any]:
    """A factory of pristine diffusers pipelines (the reference the engine must match)."""

    def make() -> Any:
        pipeline = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    return make


def reference_latents(pipeline: Any, *, prompt: str, seeds: list[int], steps: int) -> torch.Tensor:
    """The latents a plain diffusers call gives with one generator per image."""
    return pipeline(
        prompt=[prompt] * len(seeds),
        negative_prompt=[""] * len(seeds),
        num_inference_steps=steps,
        generator=[torch.Generator().manual_seed(seed) for seed in seeds],
        output_type="latent",
        return_dict=False,
    )[0]


def reference_images(pipeline: Any, *, prompt: str, seeds: list[int], steps: int) -> list:
    return pipeline(
        prompt=[prompt] * len(seeds),
        negative_prompt=[""] * len(seeds),
        num_inference_steps=steps,
        generator=[torch.Generator().manual_seed(seed) for seed in seeds],
    ).images


def rss_bytes() -> int:
    """The process's resident set size."""
    try:
        import psutil
    except ImportError:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return int(psutil.Process().memory_info().rss)
