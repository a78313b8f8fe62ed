"""Mixed-adapter batches: each image of one pipeline call uses its own adapters and weights."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.engine.conftest_inference import (
    fresh_pipeline,
    lora_files,
    lora_writer,
    reference_images,
    single_cpu_thread,
    tiny_pipeline_dir,
)
from workers.engine.inference import AdapterRef, GenerationRequest, InferenceEngine

__all__ = ["fresh_pipeline", "lora_files", "lora_writer", "single_cpu_thread", "tiny_pipeline_dir"]

STEPS = 2
# The bound: each image of a mixed batch within 2/255 per pixel of the request alone.
PIXEL_ATOL = 2


@pytest.fixture(scope="module", params=["dynamic", "static_graph"])
def engine(request: pytest.FixtureRequest, tiny_pipeline_dir: Path) -> InferenceEngine:
    return InferenceEngine(
        pipeline_dir=tiny_pipeline_dir,
        max_active=3,
        max_rank=8,
        static_graph=request.param == "static_graph",
    )


def _request(
    adapters: list[AdapterRef],
    *,
    prompt: str = "a photo of a cat",
    seed: int = 11,
    num_images: int = 1,
    negative_prompt: str | None = None,
) -> GenerationRequest:
    return GenerationRequest(
        prompt=prompt,
        negative_prompt=negative_prompt,
        adapters=adapters,
        num_inference_steps=STEPS,
        seed=seed,
        num_images=num_images,
    )


def _pixels(image: Any) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _max_diff(one: Any, other: Any) -> int:
    return int(np.abs(_pixels(one) - _pixels(other)).max())


def test_each_image_of_a_mixed_batch_equals_its_request_alone(
    engine: InferenceEngine, lora_files: dict[str, Path]
) -> None:
    a, b, text = lora_files["a"], lora_files["b"], lora_files["text_only"]
    requests = [
        _request([AdapterRef("a", a, 0.7)], seed=1),
        _request([AdapterRef("b", b, 1.0)], prompt="a red house", seed=2, num_images=2),
        _request([], prompt="a dog", seed=3),  # the base model, in the same call
        _request([AdapterRef("b", b, 0.3), AdapterRef("a", a, 0.8)], seed=4),
        _request([AdapterRef("text_only", text, 1.0)], seed=5, negative_prompt="blurry"),
        _request([AdapterRef("a", a, -0.5)], seed=1),  # a again, at its own weight
    ]

    batched = engine.generate_batch(requests)
    alone = [engine.generate(r) for r in requests]

    assert len({id(r.timings) for r in batched}) == 1, "one pipeline call for the whole batch"
    for got, want, request in zip(batched, alone, requests, strict=True):
        assert got.seeds == want.seeds
        assert got.adapters == tuple((ref.key, ref.weight) for ref in request.adapter_refs())
        for ours, theirs in zip(got.images, want.images, strict=True):
            assert _max_diff(ours, theirs) <= PIXEL_ATOL
        torch.testing.assert_close(got.latents, want.latents, atol=1e-3, rtol=0)
    # The adapters (text-encoder only, too) and the weights do reach their own images.
    same_seed_base = engine.generate(_request([], seed=1))
    assert (batched[0].latents - same_seed_base.latents).abs().max() > 0.01
    assert (batched[5].latents - batched[0].latents).abs().max() > 0.01
    text_base = engine.generate(_request([], seed=5, negative_prompt="blurry"))
    assert (batched[4].latents - text_base.latents).abs().max() > 0.01


def test_a_base_only_image_in_a_mixed_batch_equals_the_pristine_model(
    engine: InferenceEngine, lora_files: dict[str, Path], fresh_pipeline: Callable[[], Any]
) -> None:
    requests = [
        _request([AdapterRef("a", lora_files["a"], 1.0)], seed=21),
        _request([], seed=22, num_images=2),
        _request([AdapterRef("b", lora_files["b"], 1.0)], seed=24),
    ]
    batched = engine.generate_batch(requests)
    expected = reference_images(
        fresh_pipeline(), prompt="a photo of a cat", seeds=[22, 23], steps=STEPS
    )

    for ours, theirs in zip(batched[1].images, expected, strict=True):
        assert _max_diff(ours, theirs) <= PIXEL_ATOL
    assert _max_diff(batched[0].images[0], expected[0]) > PIXEL_ATOL  # the adapters did act


def test_a_batch_whose_adapters_overflow_the_slots_is_split(
    engine: InferenceEngine, lora_files: dict[str, Path]
) -> None:
    names = ("a", "b", "no_metadata", "text_only")
    requests = [_request([AdapterRef(n, lora_files[n], 1.0)], seed=i) for i, n in enumerate(names)]

    batched = engine.generate_batch(requests)

    # Four adapters, three slots: the first three share a call, the fourth runs after them.
    assert len({id(r.timings) for r in batched[:3]}) == 1
    assert batched[3].timings is not batched[0].timings
    alone = engine.generate(requests[3])
    torch.testing.assert_close(batched[3].latents, alone.latents, atol=1e-3, rtol=0)


def test_without_classifier_free_guidance_the_unet_sees_each_row_once(
    engine: InferenceEngine, lora_files: dict[str, Path]
) -> None:
    requests = [
        GenerationRequest(
            prompt="a photo of a cat",
            adapters=adapters,
            num_inference_steps=STEPS,
            guidance_scale=1.0,
            seed=seed,
        )
        for seed, adapters in enumerate(
            [[AdapterRef("a", lora_files["a"], 1.0)], [], [AdapterRef("b", lora_files["b"], 0.5)]]
        )
    ]
    batched = engine.generate_batch(requests)
    for got, request in zip(batched, requests, strict=True):
        want = engine.generate(request)
        torch.testing.assert_close(got.latents, want.latents, atol=1e-3, rtol=0)


@pytest.fixture
def dynamo_counters() -> Iterator[Any]:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def test_a_new_mix_does_not_recompile_the_static_graph(
    tiny_pipeline_dir: Path, lora_files: dict[str, Path], dynamo_counters: Any
) -> None:
    compiled = InferenceEngine(
        pipeline_dir=tiny_pipeline_dir, max_active=3, max_rank=8, static_graph=True
    )
    reference = InferenceEngine(pipeline_dir=tiny_pipeline_dir, max_active=3, max_rank=8)
    for module in (compiled.pipeline.unet, compiled.pipeline.text_encoder):
        # The eager backend: dynamo traces and guards as with inductor, without a C compiler.
        module.compile(backend="eager", fullgraph=True)
    a, b, text = (AdapterRef(n, lora_files[n], 0.9) for n in ("a", "b", "text_only"))
    mixes = [
        [_request([a], seed=1), _request([b], seed=2)],
        [_request([b, text], seed=3), _request([], seed=4)],  # a new mix, same batch size
        [_request([text], seed=5), _request([a, b], seed=6)],
        [_request([a], seed=7), _request([a], seed=8)],  # one adapter for both rows
    ]

    first = compiled.generate_batch(mixes[0])
    graphs = dynamo_counters["stats"]["unique_graphs"]
    later = [compiled.generate_batch(mix) for mix in mixes[1:]]

    assert graphs > 0, "the UNet and the text encoder were compiled"
    assert dynamo_counters["stats"]["unique_graphs"] == graphs, "a new mix recompiled"
    assert not dynamo_counters["graph_break"]
    for mix, results in zip(mixes, [first, *later], strict=True):
        for request, result in zip(mix, results, strict=True):
            want = reference.generate(request)
            torch.testing.assert_close(result.latents, want.latents, atol=1e-3, rtol=0)
