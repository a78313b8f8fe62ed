"""The LoRA trainer: the diffusers text-to-image LoRA recipe on top of accelerate.

Frozen base model, LoRA layers from peft kept in fp32 under fp16/bf16 autocast, noise-prediction
MSE (min-SNR weighting, noise offset), AdamW and a diffusers lr schedule. The same code runs in
one process or under ``accelerate launch`` on several GPUs: each process trains on its own
slice of every global batch and accelerate averages the gradients. Loading the models, encoding
samples and rendering validation images live in `models`, `encoding` and `validation`.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_snr

from workers.engine.training import checkpoints
from workers.engine.training.accelerator import make_accelerator, out_of_memory
from workers.engine.training.callbacks import CheckpointInfo, StepProgress, TrainingCallbacks
from workers.engine.training.config import WEIGHT_SHAPE_FIELDS, TrainConfig
from workers.engine.training.data import SampleDraw, SampleStream, TrainItem, noise_generator
from workers.engine.training.encoding import SampleEncoder
from workers.engine.training.errors import ConfigError, TrainingCancelled, TrainingDataError
from workers.engine.training.lora import (
    ADAPTER_WEIGHT_NAME,
    TrainableParams,
    load_adapter_into,
    save_adapter,
)
from workers.engine.training.models import load_training_models
from workers.engine.training.validation import ValidationRenderer

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
    accelerator = make_accelerator(config, device)
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
        raise out_of_memory(exc, config) from exc
    except RuntimeError as exc:
        # MPS and the CPU allocator report exhaustion as a plain RuntimeError.
        if "out of memory" in str(exc).lower() or "can't allocate memory" in str(exc):
            raise out_of_memory(exc, config) from exc
        raise


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

    # -- setup ---------------------------------------------------------------------------

    def _load_models(self) -> None:
        models = load_training_models(
            self.pipeline_dir,
            config=self.config,
            device=self.device,
            weight_dtype=self.weight_dtype,
        )
        self.noise_scheduler = models.noise_scheduler
        self.inference_scheduler = models.inference_scheduler
        self.tokenizer = models.tokenizer
        self.vae = models.vae
        self.trainable = models.trainable
        # Replaced by accelerate's wrappers once prepared (see _make_optimizer).
        self.unet = models.unet
        self.text_encoder = models.text_encoder

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

    # -- the step ------------------------------------------------------------------------

    def _loss(self, draws: list[SampleDraw], generator: torch.Generator) -> torch.Tensor:
        latents = self.encoder.latents(draws, generator)
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
        encoder_hidden_states = self.encoder.text_embeddings([d.caption for d in draws])
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

    # -- the run -------------------------------------------------------------------------

    def execute(self, started: float) -> TrainResult:
        resumed = self._prepare()
        start_step = resumed.step if resumed is not None else 0
        stream = SampleStream(
            self.items,
            seed=self.seed,
            caption_dropout=self.config.caption_dropout,
            random_flip=self.config.random_flip,
            position=resumed.position if resumed is not None else None,
        )
        running_loss = _RunningLoss.resumed_from(resumed)
        if resumed is not None and self.accelerator.is_main_process:
            self.callbacks.on_resumed(resumed.step)
        if self.config.cache_latents:
            self.encoder.fill_latent_cache()
        self._train(start_step, stream, running_loss)
        adapter_dir = self._save_adapter()
        return TrainResult(
            adapter_path=adapter_dir / ADAPTER_WEIGHT_NAME,
            steps=max(start_step, self.total_steps),
            final_loss=running_loss.last,
            duration_s=time.monotonic() - started,
            trainable_params=self.trainable,
            resumed_from_step=resumed.step if resumed is not None else None,
        )

    def _prepare(self) -> checkpoints.CheckpointState | None:
        """Seed, models and optimizer; the newest checkpoint's state when there is one."""
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
        # Built after prepare(): a trained text encoder must be called through its wrapper.
        self.encoder = SampleEncoder(
            items=self.items,
            config=config,
            seed=self.seed,
            vae=self.vae,
            tokenizer=self.tokenizer,
            text_encoder=self.text_encoder,
            device=self.device,
            weight_dtype=self.weight_dtype,
        )
        self.validation = ValidationRenderer(
            accelerator=accelerator,
            config=config,
            seed=self.seed,
            scheduler=self.inference_scheduler,
        )
        return self._resume(resume_path) if resume_path is not None else None

    def _train(self, start_step: int, stream: SampleStream, running_loss: _RunningLoss) -> None:
        """Steps start_step + 1 to total_steps, with their reports, checkpoints and validation."""
        config = self.config
        step_times: deque[float] = deque(maxlen=_SPEED_WINDOW)
        validated_at = None
        for step in range(start_step + 1, self.total_steps + 1):
            if self._should_stop():
                raise TrainingCancelled(step - 1)
            step_started = time.monotonic()
            loss, epoch = self._train_step(step, stream)
            step_times.append(time.monotonic() - step_started)
            running_loss.add(loss)
            if self.accelerator.is_main_process:
                self.callbacks.on_step(self._progress(step, epoch, running_loss, step_times))
            if step % config.checkpoint_every == 0:
                self._checkpoint(step, stream, running_loss)
            if config.validation_every is not None and step % config.validation_every == 0:
                self._validate(step)
                validated_at = step
        if config.validation_prompts and validated_at != self.total_steps:
            self._validate(self.total_steps)

    def _progress(
        self, step: int, epoch: int, running_loss: _RunningLoss, step_times: deque[float]
    ) -> StepProgress:
        config = self.config
        samples_per_step = (
            config.batch_size * config.gradient_accumulation_steps * self.accelerator.num_processes
        )
        mean_step_s = sum(step_times) / len(step_times)
        return StepProgress(
            step=step,
            total_steps=self.total_steps,
            epoch=epoch,
            loss=running_loss.last,
            smoothed_loss=running_loss.smoothed,
            lr=float(self.lr_scheduler.get_last_lr()[0]),
            samples_per_s=samples_per_step / mean_step_s if mean_step_s else 0.0,
            eta_s=(self.total_steps - step) * mean_step_s,
        )

    def _checkpoint(self, step: int, stream: SampleStream, running_loss: _RunningLoss) -> None:
        config = self.config
        path = checkpoints.write_checkpoint(
            self.checkpoints_dir,
            state=checkpoints.CheckpointState(
                step=step,
                position=stream.position,
                seed=self.seed,
                loss=running_loss.last,
                loss_ema=running_loss.ema,
                loss_ema_count=running_loss.count,
                config=config.to_dict(),
                num_processes=self.accelerator.num_processes,
            ),
            accelerator=self.accelerator,
            unet=self._unwrap(self.unet),
            text_encoder=self._unwrap(self.text_encoder) if config.train_text_encoder else None,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            keep=config.checkpoints_keep,
        )
        if self.accelerator.is_main_process:
            self.callbacks.on_checkpoint(
                CheckpointInfo(step=step, path=path, loss=running_loss.last)
            )

    def _validate(self, step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        images = self.validation.render(
            unet=self._unwrap(self.unet),
            text_encoder=self._unwrap(self.text_encoder),
            vae=self.vae,
            tokenizer=self.tokenizer,
        )
        self.callbacks.on_validation(step, images)

    def _save_adapter(self) -> Path:
        """Write output_dir/adapter (swapped in whole, from the main process); its path."""
        adapter_dir = self.output_dir / ADAPTER_DIR
        if self.accelerator.is_main_process:
            tmp = self.output_dir / f".tmp-{ADAPTER_DIR}-{os.getpid()}"
            if tmp.exists():
                shutil.rmtree(tmp)
            save_adapter(
                tmp,
                unet=self._unwrap(self.unet),
                text_encoder=self._unwrap(self.text_encoder)
                if self.config.train_text_encoder
                else None,
            )
            checkpoints.replace_dir(tmp, adapter_dir)
        self.accelerator.wait_for_everyone()
        return adapter_dir


@dataclass
class _RunningLoss:
    """The latest step's loss and its exponential moving average, carried across resumes."""

    last: float = math.nan
    ema: float = 0.0
    count: int = 0

    @classmethod
    def resumed_from(cls, state: checkpoints.CheckpointState | None) -> _RunningLoss:
        if state is None:
            return cls()
        return cls(last=state.loss, ema=state.loss_ema, count=state.loss_ema_count)

    def add(self, loss: float) -> None:
        self.last = loss
        self.ema = _LOSS_EMA_BETA * self.ema + (1 - _LOSS_EMA_BETA) * loss
        self.count += 1

    @property
    def smoothed(self) -> float:
        """The moving average without its bias towards the zero it starts from."""
        return self.ema / (1 - _LOSS_EMA_BETA**self.count)
