"""The LoRA trainer: the diffusers text-to-image LoRA recipe on top of accelerate.

Frozen base model, LoRA layers from peft kept in fp32 under fp16/bf16 autocast, noise-prediction
MSE (min-SNR weighting, noise offset), AdamW and a diffusers lr schedule. The same code runs in
one process or under ``accelerate launch`` on several GPUs: each process trains on its own
slice of every global batch and accelerate averages the gradients.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_snr
from transformers import CLIPTextModel, CLIPTokenizer

from workers.engine.training import checkpoints
from workers.engine.training.callbacks import (
    CheckpointInfo,
    StepProgress,
    TrainingCallbacks,
    ValidationImage,
)
from workers.engine.training.config import WEIGHT_SHAPE_FIELDS, TrainConfig
from workers.engine.training.data import (
    SampleDraw,
    SampleStream,
    TrainItem,
    cache_crop_fraction,
    load_image,
    noise_generator,
)
from workers.engine.training.errors import (
    ConfigError,
    TrainingCancelled,
    TrainingDataError,
    TrainingOutOfMemory,
)
from workers.engine.training.lora import (
    ADAPTER_WEIGHT_NAME,
    TrainableParams,
    inject_lora,
    load_adapter_into,
    save_adapter,
)

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
_LOSS_EMA_BETA = 0.9
_SPEED_WINDOW = 20  # steps averaged for samples/s and the ETA
_WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class TrainResult:
    """What a finished run produced."""

    adapter_path: Path
    steps: int  # the last optimizer step reached (counted across resumes)
    final_loss: float
    duration_s: float  # this call only
    trainable_params: TrainableParams
    resumed_from_step: int | None


def train_lora(
    *,
    pipeline_dir: Path,
    items: Sequence[TrainItem],
    config: TrainConfig,
    output_dir: Path,
    callbacks: TrainingCallbacks,
    device: str | None = None,
) -> TrainResult:
    """Train a LoRA on ``items`` and write ``output_dir/adapter/pytorch_lora_weights.safetensors``.

    Resumes from the newest complete checkpoint in ``output_dir/checkpoints``. Raises
    `ConfigError`, `TrainingDataError`, `TrainingCancelled` or `TrainingOutOfMemory`.
    """
    started = time.monotonic()
    if not items:
        raise TrainingDataError("no training items")
    accelerator = _make_accelerator(config, device)
    try:
        run = _TrainingRun(
            accelerator=accelerator,
            pipeline_dir=Path(pipeline_dir),
            items=list(items),
            config=config,
            output_dir=Path(output_dir),
            callbacks=callbacks,
        )
        return run.execute(started)
    except torch.OutOfMemoryError as exc:
        raise _out_of_memory(exc, config) from exc
    except RuntimeError as exc:
        # MPS and the CPU allocator report exhaustion as a plain RuntimeError.
        if "out of memory" in str(exc).lower() or "can't allocate memory" in str(exc):
            raise _out_of_memory(exc, config) from exc
        raise


def _out_of_memory(exc: BaseException, config: TrainConfig) -> TrainingOutOfMemory:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    hints = []
    if config.batch_size > 1:
        hints.append(
            f"lower batch_size (now {config.batch_size}; raise gradient_accumulation_steps "
            "to keep the effective batch)"
        )
    if not config.gradient_checkpointing:
        hints.append("enable gradient_checkpointing")
    if config.mixed_precision == "no":
        hints.append("use mixed_precision fp16 or bf16")
    hints.append(f"lower resolution (now {config.resolution})")
    if not config.cache_latents:
        hints.append("enable cache_latents")
    return TrainingOutOfMemory(f"the device ran out of memory: {exc}", "; ".join(hints))


def _make_accelerator(config: TrainConfig, device: str | None) -> Accelerator:
    device_type = _check_device(config, device)
    if device and device.startswith("cuda:"):
        torch.cuda.set_device(torch.device(device))
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # accelerate keeps its state in process-wide singletons; a long-lived worker runs jobs
        # with different precisions and devices one after another, so each starts afresh.
        # (Under `accelerate launch` on several processes the launcher's state must stay.)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        cpu=device_type == "cpu",
    )


def _check_device(config: TrainConfig, device: str | None) -> str:
    """The device type the run will use; precision it does not support is a ConfigError."""
    if device is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device_type = torch.device(device).type
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "CUDA was asked for but is not available")
    if config.mixed_precision == "fp16" and device_type not in ("cuda", "mps", "xpu", "npu"):
        raise ConfigError("mixed_precision", f"fp16 needs a GPU; this run is on {device_type}")
    if (
        config.mixed_precision == "bf16"
        and device_type == "cuda"
        and not torch.cuda.is_bf16_supported()
    ):
        raise ConfigError("mixed_precision", "this GPU does not support bf16; use fp16")
    return device_type


class _TrainingRun:
    """One call of train_lora: models, data, optimizer and the loop."""

    def __init__(
        self,
        *,
        accelerator: Accelerator,
        pipeline_dir: Path,
        items: list[TrainItem],
        config: TrainConfig,
        output_dir: Path,
        callbacks: TrainingCallbacks,
    ) -> None:
        self.accelerator = accelerator
        self.pipeline_dir = pipeline_dir
        self.items = items
        self.config = config
        self.output_dir = output_dir
        self.callbacks = callbacks
        self.checkpoints_dir = output_dir / CHECKPOINTS_DIR
        self.device = accelerator.device
        self.weight_dtype = _WEIGHT_DTYPES[config.mixed_precision]
        self.total_steps = config.total_steps(
            num_items=len(items), num_processes=accelerator.num_processes
        )
        self._latent_cache: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] = {}
        self._text_cache: dict[str, torch.Tensor] = {}
        self._base_images: dict[tuple[str, int], Any] = {}

    # -- setup ---------------------------------------------------------------------------

    def _load_models(self) -> None:
        path = self.pipeline_dir
        self.noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        # Validation samples with the scheduler the pipeline ships, as users will.
        self.inference_scheduler = _scheduler_class(path / "scheduler").from_pretrained(
            path, subfolder="scheduler"
        )
        self.tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        # Frozen weights in the compute dtype; LoRA weights are added after and kept in fp32.
        dtype = self.weight_dtype
        self.text_encoder = CLIPTextModel.from_pretrained(
            path, subfolder="text_encoder", dtype=dtype
        )
        self.vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype)
        self.unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
        self.vae.requires_grad_(False)
        for model in (self.vae, self.text_encoder, self.unet):
            model.to(self.device)
        self.trainable = inject_lora(
            unet=self.unet,
            text_encoder=self.text_encoder,
            config=self.config,
        )
        for model in (self.unet, self.text_encoder):
            for param in model.parameters():
                if param.requires_grad:
                    param.data = param.data.float()
        if self.config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if self.config.train_text_encoder:
                self.text_encoder.activation_checkpointing_enable(
                    activation_checkpointing_kwargs={"use_reentrant": False}
                )
        self.vae.eval()
        self.unet.train()
        if self.config.train_text_encoder:
            self.text_encoder.train()
        else:
            self.text_encoder.eval()

    def _make_optimizer(self) -> None:
        groups: list[dict[str, Any]] = [
            {
                "params": [p for p in self.unet.parameters() if p.requires_grad],
                "lr": self.config.learning_rate,
            }
        ]
        if self.config.train_text_encoder:
            groups.append(
                {
                    "params": [p for p in self.text_encoder.parameters() if p.requires_grad],
                    "lr": self.config.effective_text_encoder_lr,
                }
            )
        self.params_to_clip = [p for group in groups for p in group["params"]]
        optimizer = torch.optim.AdamW(groups, weight_decay=self.config.weight_decay)
        # Stepped by us once per optimizer step (not prepared): the schedule is in steps.
        self.lr_scheduler = get_scheduler(
            self.config.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=self.config.warmup_steps,
            num_training_steps=self.total_steps,
        )
        if self.config.train_text_encoder:
            self.unet, self.text_encoder, self.optimizer = self.accelerator.prepare(
                self.unet, self.text_encoder, optimizer
            )
            self.trained_models: tuple[torch.nn.Module, ...] = (self.unet, self.text_encoder)
        else:
            self.unet, self.optimizer = self.accelerator.prepare(self.unet, optimizer)
            self.trained_models = (self.unet,)

    def _resume(self, path: Path) -> checkpoints.CheckpointState:
        state = checkpoints.read_state(path)
        for field in WEIGHT_SHAPE_FIELDS:
            before = state.config.get(field)
            now = self.config.to_dict()[field]
            if before != now:
                raise ConfigError(
                    field,
                    f"is {now!r} but {path.name} was trained with {before!r}; "
                    "use a fresh output_dir to start over",
                )
        load_adapter_into(
            path / ADAPTER_WEIGHT_NAME,
            unet=self._unwrap(self.unet),
            text_encoder=self._unwrap(self.text_encoder)
            if self.config.train_text_encoder
            else None,
        )
        checkpoints.restore_training_state(
            path,
            accelerator=self.accelerator,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
        )
        return state

    def _unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        unwrapped: torch.nn.Module = self.accelerator.unwrap_model(model)
        return unwrapped

    # -- data ----------------------------------------------------------------------------

    def _encode_pixels(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            dist = self.vae.encode(pixels.to(self.device, self.weight_dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def _fill_latent_cache(self) -> None:
        flips = (False, True) if self.config.random_flip else (False,)
        for item_index, item in enumerate(self.items):
            crop = cache_crop_fraction(seed=self.seed, item_index=item_index)
            for flip in flips:
                pixels = self._load(item, crop=crop, flip=flip)
                mean, std = self._encode_pixels(pixels[None])
                self._latent_cache[(item_index, flip)] = (mean[0], std[0])

    def _load(self, item: TrainItem, *, crop: tuple[float, float], flip: bool) -> torch.Tensor:
        return load_image(
            item.image_path,
            resolution=self.config.resolution,
            center_crop=self.config.center_crop,
            crop_fraction=crop,
            flip=flip,
        )

    def _latents(self, draws: list[SampleDraw], generator: torch.Generator) -> torch.Tensor:
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

    def _tokens(self, captions: list[str]) -> torch.Tensor:
        ids: torch.Tensor = self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return ids.to(self.device)

    def _text_embeddings(self, captions: list[str]) -> torch.Tensor:
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

    # -- the step ------------------------------------------------------------------------

    def _loss(self, draws: list[SampleDraw], generator: torch.Generator) -> torch.Tensor:
        latents = self._latents(draws, generator)
        batch = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator)
        if self.config.noise_offset:
            offset = torch.randn((batch, latents.shape[1], 1, 1), generator=generator)
            noise = noise + self.config.noise_offset * offset
        noise = noise.to(self.device)
        num_timesteps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, num_timesteps, (batch,), generator=generator).to(self.device)
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ConfigError("pipeline_dir", f"unsupported prediction type {prediction_type!r}")
        encoder_hidden_states = self._text_embeddings([d.caption for d in draws])
        prediction = self.unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[
            0
        ]
        if self.config.snr_gamma is None:
            return F.mse_loss(prediction.float(), target.float())
        # Min-SNR weighting (Hang et al. 2023): cap each timestep's weight at snr_gamma.
        snr = compute_snr(self.noise_scheduler, timesteps)
        weights = torch.clamp(snr, max=self.config.snr_gamma)
        weights = weights / (snr + 1) if prediction_type == "v_prediction" else weights / snr
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none")
        return (per_sample.mean(dim=(1, 2, 3)) * weights).mean()

    def _train_step(self, step: int, stream: SampleStream) -> tuple[float, int]:
        """One optimizer step over gradient_accumulation_steps micro-batches."""
        accelerator = self.accelerator
        batch_size = self.config.batch_size
        rank = accelerator.process_index
        losses = []
        epoch = stream.position.epoch
        for micro_step in range(self.config.gradient_accumulation_steps):
            # Every process draws the whole global batch and keeps its own slice, so the data
            # order does not depend on how many processes there are.
            global_batch = stream.take(batch_size * accelerator.num_processes)
            if micro_step == 0:
                epoch = global_batch[0].epoch
            draws = global_batch[rank * batch_size : (rank + 1) * batch_size]
            generator = noise_generator(
                seed=self.seed, step=step, micro_step=micro_step, process_index=rank
            )
            with accelerator.accumulate(*self.trained_models):
                loss = self._loss(draws, generator)
                accelerator.backward(loss)
                if accelerator.sync_gradients and self.config.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(self.params_to_clip, self.config.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        self.lr_scheduler.step()
        mean_loss = torch.stack(losses).mean()
        if accelerator.num_processes > 1:
            mean_loss = accelerator.gather(mean_loss[None]).mean()
        return float(mean_loss.item()), epoch

    def _should_stop(self) -> bool:
        stop = bool(self.callbacks.should_stop())
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([1.0 if stop else 0.0], device=self.device)
            stop = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
        return stop

    # -- validation ----------------------------------------------------------------------

    def _validate(self, step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        unet = self._unwrap(self.unet)
        text_encoder = self._unwrap(self.text_encoder)
        pipe: Any = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=text_encoder,
            tokenizer=self.tokenizer,
            unet=unet,
            scheduler=self.inference_scheduler,
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
                        self._base_images[(prompt, seed)] = self._render(pipe, prompt, seed)
                lora_image = self._render(pipe, prompt, seed)
                images.append(
                    ValidationImage(prompt, seed, self._base_images[(prompt, seed)], lora_image)
                )
        finally:
            unet.train()
            if self.config.train_text_encoder:
                text_encoder.train()
        self.callbacks.on_validation(step, images)

    def _render(self, pipe: Any, prompt: str, seed: int) -> Any:
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

    # -- the run -------------------------------------------------------------------------

    def execute(self, started: float) -> TrainResult:
        config = self.config
        accelerator = self.accelerator
        if accelerator.is_main_process:
            checkpoints.remove_stale_temporaries(self.checkpoints_dir)
        accelerator.wait_for_everyone()
        resume_path = checkpoints.latest_checkpoint(self.checkpoints_dir)
        saved_seed = checkpoints.read_state(resume_path).seed if resume_path else None
        if saved_seed is not None:
            self.seed = saved_seed
        else:
            self.seed = config.seed if config.seed is not None else secrets.randbits(31)
        # As in the diffusers recipe: seeds every global RNG, so the LoRA init is reproducible.
        set_seed(self.seed)
        self._load_models()
        self._make_optimizer()
        resumed = self._resume(resume_path) if resume_path is not None else None
        start_step = resumed.step if resumed is not None else 0
        stream = SampleStream(
            self.items,
            seed=self.seed,
            caption_dropout=config.caption_dropout,
            random_flip=config.random_flip,
            position=resumed.position if resumed is not None else None,
        )
        loss = resumed.loss if resumed is not None else math.nan
        loss_ema = resumed.loss_ema if resumed is not None else 0.0
        loss_ema_count = resumed.loss_ema_count if resumed is not None else 0
        if resumed is not None and accelerator.is_main_process:
            self.callbacks.on_resumed(resumed.step)
        if config.cache_latents:
            self._fill_latent_cache()

        samples_per_step = (
            config.batch_size * config.gradient_accumulation_steps * accelerator.num_processes
        )
        step_times: deque[float] = deque(maxlen=_SPEED_WINDOW)
        validated_at = None
        for step in range(start_step + 1, self.total_steps + 1):
            if self._should_stop():
                raise TrainingCancelled(step - 1)
            step_started = time.monotonic()
            loss, epoch = self._train_step(step, stream)
            step_times.append(time.monotonic() - step_started)
            loss_ema = _LOSS_EMA_BETA * loss_ema + (1 - _LOSS_EMA_BETA) * loss
            loss_ema_count += 1
            mean_step_s = sum(step_times) / len(step_times)
            if accelerator.is_main_process:
                self.callbacks.on_step(
                    StepProgress(
                        step=step,
                        total_steps=self.total_steps,
                        epoch=epoch,
                        loss=loss,
                        smoothed_loss=loss_ema / (1 - _LOSS_EMA_BETA**loss_ema_count),
                        lr=float(self.lr_scheduler.get_last_lr()[0]),
                        samples_per_s=samples_per_step / mean_step_s if mean_step_s else 0.0,
                        eta_s=(self.total_steps - step) * mean_step_s,
                    )
                )
            if step % config.checkpoint_every == 0:
                path = checkpoints.write_checkpoint(
                    self.checkpoints_dir,
                    state=checkpoints.CheckpointState(
                        step=step,
                        position=stream.position,
                        seed=self.seed,
                        loss=loss,
                        loss_ema=loss_ema,
                        loss_ema_count=loss_ema_count,
                        config=config.to_dict(),
                        num_processes=accelerator.num_processes,
                    ),
                    accelerator=accelerator,
                    unet=self._unwrap(self.unet),
                    text_encoder=self._unwrap(self.text_encoder)
                    if config.train_text_encoder
                    else None,
                    optimizer=self.optimizer,
                    lr_scheduler=self.lr_scheduler,
                    keep=config.checkpoints_keep,
                )
                if accelerator.is_main_process:
                    self.callbacks.on_checkpoint(CheckpointInfo(step=step, path=path, loss=loss))
            if config.validation_every is not None and step % config.validation_every == 0:
                self._validate(step)
                validated_at = step
        if config.validation_prompts and validated_at != self.total_steps:
            self._validate(self.total_steps)

        adapter_dir = self.output_dir / ADAPTER_DIR
        if accelerator.is_main_process:
            tmp = self.output_dir / f".tmp-{ADAPTER_DIR}-{os.getpid()}"
            if tmp.exists():
                shutil.rmtree(tmp)
            save_adapter(
                tmp,
                unet=self._unwrap(self.unet),
                text_encoder=self._unwrap(self.text_encoder) if config.train_text_encoder else None,
            )
            checkpoints.replace_dir(tmp, adapter_dir)
        accelerator.wait_for_everyone()
        return TrainResult(
            adapter_path=adapter_dir / ADAPTER_WEIGHT_NAME,
            steps=max(start_step, self.total_steps),
            final_loss=loss,
            duration_s=time.monotonic() - started,
            trainable_params=self.trainable,
            resumed_from_step=resumed.step if resumed is not None else None,
        )


def _scheduler_class(config_dir: Path) -> Any:
    config = json.loads((config_dir / "scheduler_config.json").read_text(encoding="utf-8"))
    return getattr(diffusers, config["_class_name"])


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
