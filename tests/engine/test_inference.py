"""The inference engine against a fresh diffusers pipeline on the tiny model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler
from diffusers.utils import is_scipy_available

from lorafile import canonical_file_bytes
from tests.engine.conftest_inference import (
    fresh_pipeline,
    lora_files,
    lora_writer,
    reference_images,
    reference_latents,
    single_cpu_thread,
    tiny_pipeline_dir,
)
from tests.fixtures.random_lora import RandomLoraSpec, RandomLoraWriter
from workers.engine.inference import (
    SCHEDULER_NAMES,
    AdapterFormatError,
    AdapterRef,
    GenerationRequest,
    InferenceEngine,
    load_lora_file,
)

__all__ = ["fresh_pipeline", "lora_files", "lora_writer", "single_cpu_thread", "tiny_pipeline_dir"]

PROMPT = "a photo of a cat"
STEPS = 2
# Latents of the tiny model are O(1); the adapters move them by O(1). Float32 sums in another
# order (zero-padded ranks) differ far below this.
LATENT_ATOL = 1e-3


@pytest.fixture(scope="module")
def engine(tiny_pipeline_dir: Path) -> InferenceEngine:
    return InferenceEngine(pipeline_dir=tiny_pipeline_dir, max_active=3, max_rank=8)


@pytest.fixture(scope="module")
def static_engine(tiny_pipeline_dir: Path) -> InferenceEngine:
    return InferenceEngine(
        pipeline_dir=tiny_pipeline_dir, max_active=3, max_rank=8, static_graph=True
    )


@pytest.fixture(params=["dynamic", "static_graph"])
def any_engine(request: pytest.FixtureRequest) -> InferenceEngine:
    """Both slot modes: per-layer active lists, and a fixed graph with zero scales."""
    name = "engine" if request.param == "dynamic" else "static_engine"
    engine: InferenceEngine = request.getfixturevalue(name)
    return engine


def _request(
    adapters: list[AdapterRef], *, seed: int = 11, num_images: int = 1
) -> GenerationRequest:
    return GenerationRequest(
        prompt=PROMPT,
        adapters=adapters,
        num_inference_steps=STEPS,
        seed=seed,
        num_images=num_images,
    )


def _seeds(seed: int, count: int) -> list[int]:
    return [seed + i for i in range(count)]


def test_two_adapters_match_fresh_pipeline_with_set_adapters(
    any_engine: InferenceEngine,
    lora_files: dict[str, Path],
    fresh_pipeline: Callable[[], Any],
) -> None:
    reference = fresh_pipeline()
    base = reference_latents(reference, prompt=PROMPT, seeds=_seeds(11, 2), steps=STEPS)
    reference.load_lora_weights(str(lora_files["a"]), adapter_name="A")
    reference.load_lora_weights(str(lora_files["b"]), adapter_name="B")
    reference.set_adapters(["A", "B"], [0.7, 0.3])
    expected = reference_latents(reference, prompt=PROMPT, seeds=_seeds(11, 2), steps=STEPS)
    expected_images = reference_images(reference, prompt=PROMPT, seeds=_seeds(11, 2), steps=STEPS)

    result = any_engine.generate(
        _request(
            [AdapterRef("a", lora_files["a"], 0.7), AdapterRef("b", lora_files["b"], 0.3)],
            num_images=2,
        )
    )

    assert (expected - base).abs().max() > 0.1, "the adapters must change the output"
    torch.testing.assert_close(result.latents, expected, atol=LATENT_ATOL, rtol=0)
    assert result.seeds == [11, 12]
    assert result.adapters == (("a", 0.7), ("b", 0.3))
    for ours, theirs in zip(result.images, expected_images, strict=True):
        diff = np.abs(np.asarray(ours, np.int16) - np.asarray(theirs, np.int16))
        assert diff.max() <= 1


@pytest.mark.parametrize(
    ("name", "weight"), [("a", 1.0), ("b", 0.5), ("no_metadata", 0.8), ("text_only", 1.0)]
)
def test_single_adapter_matches_fresh_pipeline(
    engine: InferenceEngine,
    lora_files: dict[str, Path],
    fresh_pipeline: Callable[[], Any],
    name: str,
    weight: float,
) -> None:
    reference = fresh_pipeline()
    base = reference_latents(reference, prompt=PROMPT, seeds=[5], steps=STEPS)
    reference.load_lora_weights(str(lora_files[name]), adapter_name="X")
    reference.set_adapters(["X"], [weight])
    expected = reference_latents(reference, prompt=PROMPT, seeds=[5], steps=STEPS)

    result = engine.generate(_request([AdapterRef(name, lora_files[name], weight)], seed=5))

    assert (expected - base).abs().max() > 0.01, "the adapter must change the output"
    torch.testing.assert_close(result.latents, expected, atol=LATENT_ATOL, rtol=0)


def test_no_adapters_after_use_equals_pristine_base_exactly(
    any_engine: InferenceEngine,
    lora_files: dict[str, Path],
    fresh_pipeline: Callable[[], Any],
) -> None:
    reference = fresh_pipeline()
    expected = reference_latents(reference, prompt=PROMPT, seeds=_seeds(3, 2), steps=STEPS)
    expected_images = reference_images(reference, prompt=PROMPT, seeds=_seeds(3, 2), steps=STEPS)

    any_engine.generate(
        _request([AdapterRef("a", lora_files["a"], 1.0), AdapterRef("b", lora_files["b"], 1.0)])
    )
    result = any_engine.generate(_request([], seed=3, num_images=2))

    assert torch.equal(result.latents, expected)
    for ours, theirs in zip(result.images, expected_images, strict=True):
        assert ours.tobytes() == theirs.tobytes()
    assert any_engine.slots.active == ()


def test_slot_reuse_gives_the_same_output_as_a_first_switch(
    tiny_pipeline_dir: Path, lora_files: dict[str, Path]
) -> None:
    # One slot: b (rank 8, other modules) then a (rank 4) must leave nothing of b behind.
    fresh = InferenceEngine(pipeline_dir=tiny_pipeline_dir, max_active=1, max_rank=8)
    first = fresh.generate(_request([AdapterRef("a", lora_files["a"], 0.9)]))
    fresh.generate(_request([AdapterRef("b", lora_files["b"], 1.0)]))
    again = fresh.generate(_request([AdapterRef("a", lora_files["a"], 0.9)]))
    fresh.generate(_request([AdapterRef("b", lora_files["b"], 1.0)]))
    fresh.cache.evict("a")
    reloaded = fresh.generate(_request([AdapterRef("a", lora_files["a"], 0.9)]))

    assert torch.equal(first.latents, again.latents)
    assert torch.equal(first.latents, reloaded.latents)


def test_adapter_order_and_weights_are_applied_per_request(
    engine: InferenceEngine, lora_files: dict[str, Path]
) -> None:
    a, b = lora_files["a"], lora_files["b"]
    ab = engine.generate(_request([AdapterRef("a", a, 0.7), AdapterRef("b", b, 0.3)]))
    ba = engine.generate(_request([AdapterRef("b", b, 0.3), AdapterRef("a", a, 0.7)]))
    other = engine.generate(_request([AdapterRef("a", a, 0.3), AdapterRef("b", b, 0.7)]))

    torch.testing.assert_close(ab.latents, ba.latents, atol=LATENT_ATOL, rtol=0)
    assert (ab.latents - other.latents).abs().max() > 0.01


def test_alpha_comes_from_metadata_or_defaults_to_rank(lora_files: dict[str, Path]) -> None:
    with_metadata = load_lora_file(lora_files["b"])
    without = load_lora_file(lora_files["no_metadata"])

    assert {m.scaling for m in with_metadata.modules.values()} == {4 / 8}
    assert {m.scaling for m in without.modules.values()} == {1.0}
    assert with_metadata.target_modules("text_encoder")
    assert without.max_rank == 8


def test_the_canonical_file_the_service_stores_loads_like_the_trained_one(
    engine: InferenceEngine, lora_files: dict[str, Path], tiny_pipeline_dir: Path, tmp_path: Path
) -> None:
    """Stored versions are lorafile's canonical form: same modules, scales and images."""
    trained = lora_files["b"]
    stored = tmp_path / "canonical.safetensors"
    stored.write_bytes(
        canonical_file_bytes(trained, base_model_dir=tiny_pipeline_dir, base_model="tiny")
    )
    original, canonical = load_lora_file(trained), load_lora_file(stored)
    assert canonical.modules.keys() == original.modules.keys()
    for key, module in canonical.modules.items():
        assert module.scaling == original.modules[key].scaling == 4 / 8
        torch.testing.assert_close(module.lora_A, original.modules[key].lora_A, rtol=0, atol=0)
        torch.testing.assert_close(module.lora_B, original.modules[key].lora_B, rtol=0, atol=0)

    from_trained = engine.generate(_request([AdapterRef("trained-b", trained, 1.0)]))
    from_stored = engine.generate(_request([AdapterRef("stored-b", stored, 1.0)]))
    torch.testing.assert_close(from_stored.latents, from_trained.latents, rtol=0, atol=0)


def test_unservable_adapters_are_rejected(
    engine: InferenceEngine,
    tiny_pipeline_dir: Path,
    lora_writer: RandomLoraWriter,
    tmp_path: Path,
) -> None:
    too_big = lora_writer.write(tmp_path / "r16.safetensors", RandomLoraSpec(rank=16), seed=3)
    uncovered = lora_writer.write(
        tmp_path / "conv.safetensors", RandomLoraSpec(rank=4, unet_targets=("conv1",)), seed=4
    )
    with pytest.raises(AdapterFormatError, match="max_rank"):
        engine.generate(_request([AdapterRef("r16", too_big, 1.0)]))
    with pytest.raises(AdapterFormatError, match="does not cover"):
        engine.generate(_request([AdapterRef("conv", uncovered, 1.0)]))
    with pytest.raises(ValueError, match="slots"):
        engine.switch_adapters([AdapterRef(f"k{i}", too_big, 1.0) for i in range(4)])


def test_generate_batch_matches_single_requests(
    engine: InferenceEngine, lora_files: dict[str, Path]
) -> None:
    a, b = AdapterRef("a", lora_files["a"], 0.6), AdapterRef("b", lora_files["b"], 1.0)
    requests = [
        _request([a], seed=1),
        _request([b], seed=2),
        _request([a], seed=3, num_images=2),
    ]
    batched = engine.generate_batch(requests)
    single = [engine.generate(r) for r in requests]

    assert [r.seeds for r in batched] == [[1], [2], [3, 4]]
    # One pipeline call for all three: "a" and "b" rows are a mixed batch.
    assert batched[0].timings is batched[1].timings is batched[2].timings
    for got, want in zip(batched, single, strict=True):
        assert got.adapters == want.adapters
        torch.testing.assert_close(got.latents, want.latents, atol=1e-4, rtol=0)


def test_schedulers_swap_without_reload(
    engine: InferenceEngine, fresh_pipeline: Callable[[], Any]
) -> None:
    outputs = {}
    for name in SCHEDULER_NAMES:
        request = GenerationRequest(
            prompt=PROMPT, num_inference_steps=STEPS, seed=9, scheduler=name
        )
        if name == "lms" and not is_scipy_available():
            with pytest.raises(RuntimeError, match="scipy"):
                engine.generate(request)
            continue
        outputs[name] = engine.generate(request).latents
        assert torch.isfinite(outputs[name]).all()
    assert len({round(float(t.abs().sum()), 3) for t in outputs.values()}) == len(outputs)

    reference = fresh_pipeline()
    reference.scheduler = EulerAncestralDiscreteScheduler.from_config(reference.scheduler.config)
    expected = reference_latents(reference, prompt=PROMPT, seeds=[9], steps=STEPS)
    assert torch.equal(outputs["euler_a"], expected)


def test_requests_are_validated(engine: InferenceEngine) -> None:
    with pytest.raises(ValueError, match="scheduler"):
        engine.generate(GenerationRequest(prompt="x", scheduler="nope"))
    with pytest.raises(ValueError, match="multiples of 8"):
        engine.generate(GenerationRequest(prompt="x", width=60))
    with pytest.raises(ValueError, match="num_inference_steps"):
        engine.generate(GenerationRequest(prompt="x", num_inference_steps=0))


def test_results_carry_images_seeds_and_timings(engine: InferenceEngine) -> None:
    result = engine.generate(
        GenerationRequest(prompt=PROMPT, num_inference_steps=STEPS, num_images=2)
    )

    assert len(result.images) == 2
    assert result.images[0].size == (64, 64)
    assert result.seeds[1] == result.seeds[0] + 1
    timings = result.timings
    assert timings.denoise_s > 0 and timings.decode_s > 0
    assert timings.total_s >= timings.denoise_s + timings.decode_s + timings.adapter_switch_s
    snapshot = engine.snapshot()
    assert snapshot["max_active"] == 3
    assert set(snapshot["cache"]) == {"disk", "cpu", "device"}
