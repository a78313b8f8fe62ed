"""The LoRA trainer on the tiny pipeline: learning, adapter format, resume, cancel, plan."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from workers.engine.model_builder import TEXT_ENCODER_CONFIGS, UNET_CONFIGS, VAE_CONFIGS
from workers.engine.training import (
    CheckpointInfo,
    ConfigError,
    NullCallbacks,
    StepProgress,
    TrainConfig,
    TrainingCancelled,
    TrainItem,
    TrainResult,
    ValidationImage,
    train_lora,
)
from workers.engine.training.data import SampleStream, StreamPosition, load_image
from workers.engine.training.lora import inject_lora, load_adapter_into
from workers.engine.training.plan import plan_training


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    # The test machine's cores are shared; one thread avoids spin contention (10x faster).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class RecordingCallbacks(NullCallbacks):
    """Keeps every report; stops once ``stop_after`` steps have been reported."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.steps: list[StepProgress] = []
        self.checkpoints: list[CheckpointInfo] = []
        self.validations: list[tuple[int, list[ValidationImage]]] = []
        self.resumed: list[int] = []
        self.stop_checks = 0
        self.stop_after = stop_after

    def on_step(self, progress: StepProgress) -> None:
        self.steps.append(progress)

    def on_checkpoint(self, checkpoint: CheckpointInfo) -> None:
        self.checkpoints.append(checkpoint)

    def on_validation(self, step: int, images: list[ValidationImage]) -> None:
        self.validations.append((step, images))

    def on_resumed(self, step: int) -> None:
        self.resumed.append(step)

    def should_stop(self) -> bool:
        self.stop_checks += 1
        return self.stop_after is not None and len(self.steps) >= self.stop_after


# Small and fast: 32 px images (4 x 4 latents) unless a test needs the picture.
FAST = TrainConfig(resolution=32, rank=4, max_steps=4, seed=7, checkpoint_every=100)


def _train(
    pipeline_dir: Path,
    items: list[TrainItem],
    config: TrainConfig,
    output_dir: Path,
    callbacks: RecordingCallbacks | None = None,
) -> TrainResult:
    return train_lora(
        pipeline_dir=pipeline_dir,
        items=items,
        config=config,
        output_dir=output_dir,
        callbacks=callbacks or RecordingCallbacks(),
        device="cpu",
    )


def _fixed_eval_loss(pipe: Any, items: list[TrainItem]) -> float:
    """Noise-prediction MSE on every item at fixed timesteps and noise (no training RNG)."""
    generator = torch.Generator().manual_seed(123)
    pixels = torch.stack(
        [
            load_image(
                i.image_path, resolution=64, center_crop=True, crop_fraction=(0, 0), flip=False
            )
            for i in items
        ]
    )
    ids = pipe.tokenizer(
        [i.captions[0] for i in items], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    losses = []
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        embeddings = pipe.text_encoder(ids)[0]
        for timestep in (100, 300, 500, 700, 900):
            noise = torch.randn(latents.shape, generator=generator)
            t = torch.full((len(items),), timestep)
            noisy = pipe.scheduler.add_noise(latents, noise, t)
            prediction = pipe.unet(noisy, t, embeddings).sample
            losses.append(torch.nn.functional.mse_loss(prediction, noise).item())
    return sum(losses) / len(losses)


@pytest.fixture(scope="module")
def learned_run(
    tiny_pipeline_dir: Path, shape_items: list[TrainItem], tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainResult, RecordingCallbacks, TrainConfig]:
    config = TrainConfig(
        resolution=64,
        rank=8,
        alpha=4.0,  # alpha != rank: the saved adapter must load at scale 0.5
        learning_rate=3e-2,
        max_steps=32,
        batch_size=2,
        seed=1,
        center_crop=True,
        checkpoint_every=100,
        validation_prompts=("a red circle",),
        validation_every=16,
        validation_inference_steps=2,
        snr_gamma=5.0,
        noise_offset=0.02,
    )
    callbacks = RecordingCallbacks()
    result = _train(
        tiny_pipeline_dir, shape_items, config, tmp_path_factory.mktemp("learned"), callbacks
    )
    return result, callbacks, config


def test_short_run_lowers_the_loss_and_reports_progress(
    learned_run: tuple[TrainResult, RecordingCallbacks, TrainConfig],
    tiny_pipeline_dir: Path,
    shape_items: list[TrainItem],
) -> None:
    result, callbacks, _config = learned_run
    assert [p.step for p in callbacks.steps] == list(range(1, 33))
    assert all(p.total_steps == 32 and p.samples_per_s > 0 for p in callbacks.steps)
    assert callbacks.steps[-1].eta_s == 0.0
    assert result.steps == 32 and result.resumed_from_step is None
    assert result.final_loss == callbacks.steps[-1].loss

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    base_loss = _fixed_eval_loss(pipe, shape_items)
    pipe.load_lora_weights(str(result.adapter_path))
    lora_loss = _fixed_eval_loss(pipe, shape_items)
    assert lora_loss < base_loss * 0.95, (base_loss, lora_loss)


def test_adapter_is_lora_only_and_loads_at_trained_strength(
    learned_run: tuple[TrainResult, RecordingCallbacks, TrainConfig], tiny_pipeline_dir: Path
) -> None:
    result, _, config = learned_run
    assert result.adapter_path.name == "pytorch_lora_weights.safetensors"
    tensors = load_file(str(result.adapter_path))
    assert tensors and all(k.startswith("unet.") and ".lora." in k for k in tensors)
    assert sum(t.numel() for t in tensors.values()) == result.trainable_params.unet

    # The trainer's own models, rebuilt and given the adapter's tensors, are the reference.
    reference = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    inject_lora(unet=reference.unet, text_encoder=reference.text_encoder, config=config)
    load_adapter_into(result.adapter_path, unet=reference.unet, text_encoder=None)
    loaded = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    base = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    loaded.load_lora_weights(str(result.adapter_path))

    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, 32, generator=generator)
    t = torch.tensor([400])
    with torch.no_grad():
        expected = reference.unet(sample, t, context).sample
        got = loaded.unet(sample, t, context).sample
        untouched = base.unet(sample, t, context).sample
    assert torch.allclose(got, expected, atol=1e-5)
    assert (got - untouched).abs().max() > 1e-3


def test_validation_renders_base_and_lora_images(
    learned_run: tuple[TrainResult, RecordingCallbacks, TrainConfig],
) -> None:
    _, callbacks, config = learned_run
    assert [step for step, _ in callbacks.validations] == [16, 32]
    first, last = callbacks.validations[0][1][0], callbacks.validations[1][1][0]
    assert first.prompt == "a red circle" and first.seed == last.seed == config.seed
    assert last.base_image.size == (64, 64)
    assert last.base_image.tobytes() == first.base_image.tobytes()  # the base never moves
    assert last.lora_image.tobytes() != last.base_image.tobytes()


def _adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_resume_after_interrupt_is_exact(
    tiny_pipeline_dir: Path, shape_items: list[TrainItem], tmp_path: Path
) -> None:
    config = dataclasses.replace(
        FAST,
        max_steps=5,
        batch_size=2,
        gradient_accumulation_steps=2,
        checkpoint_every=2,
        random_flip=True,
        caption_dropout=0.3,
        lr_scheduler="cosine",
        warmup_steps=1,
        learning_rate=1e-3,
    )
    straight = _train(tiny_pipeline_dir, shape_items, config, tmp_path / "straight")

    interrupted = RecordingCallbacks(stop_after=2)  # stops right after checkpoint-2
    with pytest.raises(TrainingCancelled) as cancelled:
        _train(tiny_pipeline_dir, shape_items, config, tmp_path / "resumed", interrupted)
    assert cancelled.value.step == 2
    assert [c.step for c in interrupted.checkpoints] == [2]

    resumed = RecordingCallbacks()
    result = _train(tiny_pipeline_dir, shape_items, config, tmp_path / "resumed", resumed)
    assert resumed.resumed == [2] and result.resumed_from_step == 2
    assert [p.step for p in resumed.steps] == [3, 4, 5]  # steps are counted once
    assert result.steps == 5

    expected = _adapter_tensors(straight.adapter_path)
    got = _adapter_tensors(result.adapter_path)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.allclose(got[key], expected[key], rtol=0, atol=1e-7), key
    assert result.final_loss == pytest.approx(straight.final_loss, abs=1e-6)


def test_checkpoints_are_numbered_complete_and_pruned(
    tiny_pipeline_dir: Path, shape_items: list[TrainItem], tmp_path: Path
) -> None:
    config = dataclasses.replace(FAST, max_steps=5, checkpoint_every=1, checkpoints_keep=2)
    callbacks = RecordingCallbacks()
    _train(tiny_pipeline_dir, shape_items, config, tmp_path, callbacks)
    assert [c.step for c in callbacks.checkpoints] == [1, 2, 3, 4, 5]
    remaining = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert remaining == ["checkpoint-4", "checkpoint-5"]
    newest = tmp_path / "checkpoints" / "checkpoint-5"
    state = json.loads((newest / "state.json").read_text())
    assert state["step"] == 5 and state["seed"] == 7
    assert (state["epoch"], state["index_in_epoch"]) == (0, 5)
    assert {p.name for p in newest.iterdir()} >= {
        "pytorch_lora_weights.safetensors",
        "training_state.pt",
        "rng-0.pt",
    }

    # A checkpoint at the last step: a second call resumes there and only rewrites the adapter.
    again = RecordingCallbacks()
    result = _train(tiny_pipeline_dir, shape_items, config, tmp_path, again)
    assert again.resumed == [5] and again.steps == [] and result.steps == 5


def test_cancel_stops_within_one_step(
    tiny_pipeline_dir: Path, shape_items: list[TrainItem], tmp_path: Path
) -> None:
    callbacks = RecordingCallbacks(stop_after=1)
    with pytest.raises(TrainingCancelled) as cancelled:
        _train(
            tiny_pipeline_dir,
            shape_items,
            dataclasses.replace(FAST, max_steps=50),
            tmp_path,
            callbacks,
        )
    assert cancelled.value.step == 1
    assert len(callbacks.steps) == 1 and callbacks.stop_checks == 2
    assert not (tmp_path / "adapter").exists()


def test_dora_with_text_encoder_trains_and_loads(
    tiny_pipeline_dir: Path, shape_items: list[TrainItem], tmp_path: Path
) -> None:
    config = dataclasses.replace(
        FAST,
        max_steps=2,
        use_dora=True,
        train_text_encoder=True,
        text_encoder_lr=1e-3,
        alpha=8.0,
        learning_rate=1e-2,
        cache_latents=True,
        gradient_checkpointing=True,
    )
    result = _train(tiny_pipeline_dir, shape_items, config, tmp_path)
    assert result.trainable_params.unet > 0 and result.trainable_params.text_encoder > 0
    tensors = load_file(str(result.adapter_path))
    assert any(k.startswith("text_encoder.") for k in tensors)
    assert any("lora_magnitude_vector" in k for k in tensors)

    reference = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    inject_lora(unet=reference.unet, text_encoder=reference.text_encoder, config=config)
    load_adapter_into(result.adapter_path, unet=reference.unet, text_encoder=reference.text_encoder)
    loaded = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    loaded.load_lora_weights(str(result.adapter_path))
    base = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    ids = base.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        expected = reference.text_encoder(ids.input_ids)[0]
        got = loaded.text_encoder(ids.input_ids)[0]
        untouched = base.text_encoder(ids.input_ids)[0]
    assert torch.allclose(got, expected, atol=1e-5)
    assert (got - untouched).abs().max() > 1e-4


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"rank": 0}, "rank"),
        ({"target_modules": "everything"}, "target_modules"),
        ({"target_modules": []}, "target_modules"),
        ({"lr_scheduler": "step"}, "lr_scheduler"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"max_steps": 10, "epochs": 2}, "epochs"),
        ({"resolution": 100}, "resolution"),
        ({"caption_dropout": 1.0}, "caption_dropout"),
        ({"batch_size": True}, "batch_size"),
        ({"validation_every": 5}, "validation_prompts"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"batchsize": 2}, "batchsize"),
    ],
)
def test_config_errors_name_the_field(settings: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as error:
        TrainConfig.from_dict(settings)
    assert error.value.field == field


def test_config_round_trips_through_json() -> None:
    config = TrainConfig(target_modules=("attn1.to_q",), validation_prompts=("a cat",), epochs=3)
    again = TrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert again.max_steps is None and TrainConfig().max_steps == 1000
    assert config.total_steps(num_items=10) == 30
    assert TrainConfig(epochs=2, batch_size=4).total_steps(num_items=10) == 5


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"target_modules": ("to_nothing",)}, "target_modules"),
        ({"target_modules": ("attn1",)}, "target_modules"),  # a block, not a layer
        (
            {"train_text_encoder": True, "text_encoder_target_modules": ("to_q",)},
            "text_encoder_target_modules",
        ),
        ({"mixed_precision": "fp16"}, "mixed_precision"),  # no GPU here
    ],
)
def test_model_dependent_errors_at_start(
    tiny_pipeline_dir: Path,
    shape_items: list[TrainItem],
    tmp_path: Path,
    settings: dict[str, object],
    field: str,
) -> None:
    config = dataclasses.replace(FAST, **settings)  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as error:
        _train(tiny_pipeline_dir, shape_items, config, tmp_path)
    assert error.value.field == field
    if field != "mixed_precision":
        with pytest.raises(ConfigError) as planned:
            plan_training(pipeline_dir_or_config=tiny_pipeline_dir, config=config)
        assert planned.value.field == field


def test_stream_resumes_from_its_position(shape_items: list[TrainItem]) -> None:
    def stream(position: StreamPosition | None = None) -> SampleStream:
        return SampleStream(
            shape_items, seed=3, caption_dropout=0.2, random_flip=True, position=position
        )

    whole = stream().take(20)
    first = stream()
    head = first.take(11)
    tail = stream(first.position).take(9)
    assert head + tail == whole
    assert sorted(d.item_index for d in whole[:8]) == list(range(8))  # an epoch sees all
    assert whole[8].epoch == 1
    assert {d.caption for d in whole} > {""}  # dropout and both captions occur


def test_load_image_crops_flips_and_normalises(shape_items: list[TrainItem]) -> None:
    path = shape_items[0].image_path
    pixels = load_image(
        path, resolution=32, center_crop=False, crop_fraction=(0.0, 0.0), flip=False
    )
    flipped = load_image(
        path, resolution=32, center_crop=False, crop_fraction=(0.0, 0.0), flip=True
    )
    right = load_image(
        path, resolution=32, center_crop=False, crop_fraction=(0.99, 0.0), flip=False
    )
    assert pixels.shape == (3, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1
    assert torch.equal(flipped, pixels.flip(-1))
    assert not torch.equal(right, pixels)  # the source is wider than tall: crops differ


def _write_configs(folder: Path, preset: str) -> Path:
    for name, configs in (
        ("unet", UNET_CONFIGS),
        ("text_encoder", TEXT_ENCODER_CONFIGS),
        ("vae", VAE_CONFIGS),
    ):
        (folder / name).mkdir(parents=True)
        (folder / name / "config.json").write_text(json.dumps(configs[preset]))  # type: ignore[index]
    return folder


def test_plan_counts_match_a_real_run(
    learned_run: tuple[TrainResult, RecordingCallbacks, TrainConfig], tmp_path: Path
) -> None:
    result, _, config = learned_run
    plan = plan_training(pipeline_dir_or_config=_write_configs(tmp_path, "tiny"), config=config)
    assert plan.trainable_params == result.trainable_params
    assert plan.adapter_bytes == result.adapter_path.stat().st_size
    assert plan.total_steps == 32


def test_plan_sd15_from_config_only(tmp_path: Path) -> None:
    folder = _write_configs(tmp_path, "sd15")
    plan = plan_training(pipeline_dir_or_config=folder, config=TrainConfig())
    # SD 1.5 rank-16 LoRA on to_q/k/v/out: the well-known 3.19 M parameters, 12.8 MB fp32.
    assert plan.trainable_params.unet == 3_188_736
    assert plan.trainable_params.text_encoder == 0
    assert 4 * 3_188_736 < plan.adapter_bytes < 4 * 3_188_736 + 200_000
    assert plan.total_steps == 1000
    assert 2e12 < plan.flops_per_step < 4e12  # ~0.8 TFLOP forward at 64x64 latents, x2 + VAE
    assert 6 * 2**30 < plan.memory.total < 24 * 2**30

    lean = plan_training(
        pipeline_dir_or_config=folder,
        config=TrainConfig(
            mixed_precision="fp16", gradient_checkpointing=True, train_text_encoder=True
        ),
    )
    assert lean.trainable_params.text_encoder == 12 * 2 * 16 * (768 + 768)
    assert lean.memory.total < plan.memory.total / 2
    assert lean.seconds_per_step < plan.seconds_per_step


def test_bf16_autocast_keeps_lora_weights_fp32(
    tiny_pipeline_dir: Path, shape_items: list[TrainItem], tmp_path: Path
) -> None:
    config = dataclasses.replace(FAST, max_steps=2, mixed_precision="bf16", learning_rate=1e-2)
    result = _train(tiny_pipeline_dir, shape_items, config, tmp_path)
    tensors = load_file(str(result.adapter_path))
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert torch.isfinite(torch.tensor(result.final_loss))
