"""Fine-tuning text classifiers: peft LoRA on the encoder (head trained beside it) or in full.

The run is a plain accelerate loop. Its data order is a pure function of (seed, step): each
epoch is a seeded permutation of the training split, and the global RNG is re-seeded before
every step (dropout), so a checkpoint only needs the trainable weights, the optimizer and the
scheduler to continue exactly as an uninterrupted run would.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file

from workers.engine.text.architectures import architecture_for
from workers.engine.text.callbacks import EvalMetrics, TextTrainingCallbacks
from workers.engine.text.config import RESUME_FIXED_FIELDS, TextTrainConfig
from workers.engine.training.callbacks import CheckpointInfo, StepProgress
from workers.engine.training.errors import ConfigError, TrainingCancelled, TrainingDataError

TextItem = tuple[str, int]

ADAPTER_DIR = "adapter"  # method lora: a peft adapter folder
MODEL_DIR = "model"  # method full: a transformers model folder
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
_WEIGHTS_FILE = "trainable.safetensors"
_TRAINING_STATE_FILE = "training_state.pt"
_STATE_FILE = "state.json"
_EVAL_BATCH = 64
_LOSS_EMA_BETA = 0.9


@dataclass(frozen=True)
class TextTrainResult:
    """What a finished run produced."""

    method: str
    output_path: Path  # output_dir/adapter (lora) or output_dir/model (full)
    steps: int
    final_loss: float
    metrics: EvalMetrics | None  # the last evaluation; None without a validation split
    trainable_params: int
    total_params: int
    file_size_bytes: int  # the safetensors weights in output_path
    duration_s: float  # this call only
    samples_per_s: float
    resumed_from_step: int | None

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / self.total_params


def train_text_classifier(
    *,
    model_dir: Path,
    items: Sequence[TextItem],
    config: TextTrainConfig,
    output_dir: Path,
    callbacks: TextTrainingCallbacks,
    device: str | None = None,
) -> TextTrainResult:
    """Fine-tune the classifier in ``model_dir`` on (text, label) ``items``.

    Resumes from the newest checkpoint in ``output_dir/checkpoints``. Raises `ConfigError`,
    `TrainingDataError` or `TrainingCancelled`.
    """
    started = time.monotonic()
    run = _TextRun(
        model_dir=Path(model_dir),
        items=list(items),
        config=config,
        output_dir=Path(output_dir),
        callbacks=callbacks,
        device=device,
    )
    return run.execute(started)


def split_items(
    items: Sequence[TextItem], *, validation_split: float, seed: int
) -> tuple[list[TextItem], list[TextItem]]:
    """A seeded (train, validation) split; at least one item in each when the split is > 0."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = 0
    if validation_split > 0:
        n_val = min(len(items) - 1, max(1, round(len(items) * validation_split)))
    val = [items[i] for i in order[:n_val]]
    train = [items[i] for i in order[n_val:]]
    return train, val


def load_classifier(model_dir: Path) -> Any:
    """The sequence classifier of ``model_dir`` (transformers' own from_pretrained)."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(model_dir)


def make_text_accelerator(device: str | None) -> Accelerator:
    """A fresh single-process Accelerator on ``device`` (None: CUDA when available)."""
    device_type = torch.device(device).type if device else None
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "CUDA was asked for but is not available")
    if device and device.startswith("cuda:"):
        torch.cuda.set_device(torch.device(device))
    # accelerate's state is process-wide; a long-lived worker runs one job after another.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return Accelerator(cpu=device_type == "cpu")


class _TextRun:
    """One call of train_text_classifier."""

    def __init__(
        self,
        *,
        model_dir: Path,
        items: list[TextItem],
        config: TextTrainConfig,
        output_dir: Path,
        callbacks: TextTrainingCallbacks,
        device: str | None,
    ) -> None:
        self.model_dir = model_dir
        self.config = config
        self.output_dir = output_dir
        self.callbacks = callbacks
        self.checkpoints_dir = output_dir / CHECKPOINTS_DIR
        if not items:
            raise TrainingDataError("no training items")
        self.train_items, self.val_items = split_items(
            items, validation_split=config.validation_split, seed=config.seed
        )
        self.total_steps = config.total_steps(len(self.train_items))
        self.accelerator = make_text_accelerator(device)
        self.device = self.accelerator.device
        # Raw exponential moving average of the loss and its length, carried across resumes.
        self.loss_ema = 0.0
        self.loss_ema_count = 0

    # -- setup ---------------------------------------------------------------------------

    def _load(self) -> None:
        from transformers import AutoTokenizer, get_scheduler

        config = self.config
        set_seed(config.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        model = load_classifier(self.model_dir)
        num_labels = int(model.config.num_labels)
        bad = [
            label
            for _, label in (*self.train_items, *self.val_items)
            if not 0 <= label < num_labels
        ]
        if bad:
            raise TrainingDataError(f"label {bad[0]} is outside 0..{num_labels - 1}")
        self.total_params = sum(p.numel() for p in model.parameters())
        if config.method == "lora":
            model = self._with_lora(model)
        self.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=config.learning_rate,
            weight_decay=config.weight_decay,
        )
        self.lr_scheduler = get_scheduler(
            config.lr_schedule,
            optimizer=optimizer,
            num_warmup_steps=config.warmup_steps,
            num_training_steps=self.total_steps,
        )
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)

    def _with_lora(self, model: Any) -> Any:
        from peft import LoraConfig, TaskType, get_peft_model

        arch = architecture_for(str(model.config.model_type))
        lora_config = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=self.config.rank,
            lora_alpha=self.config.alpha,
            lora_dropout=self.config.dropout,
            target_modules=list(self.config.target_modules or arch.lora_targets),
            modules_to_save=list(arch.head_modules),
        )
        return get_peft_model(model, lora_config)

    def _unwrapped(self) -> Any:
        return self.accelerator.unwrap_model(self.model)

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {
            name: param.detach().cpu().contiguous()
            for name, param in self._unwrapped().named_parameters()
            if param.requires_grad
        }

    # -- data ----------------------------------------------------------------------------

    def _micro_batch(self, index: int) -> list[TextItem]:
        """The ``index``-th micro-batch of the run (a pure function of seed and index)."""
        batch_size = self.config.batch_size
        per_epoch = math.ceil(len(self.train_items) / batch_size)
        epoch, within = divmod(index, per_epoch)
        order = list(range(len(self.train_items)))
        random.Random(f"{self.config.seed}:{epoch}").shuffle(order)
        chosen = order[within * batch_size : (within + 1) * batch_size]
        return [self.train_items[i] for i in chosen]

    def _encode(self, batch: Sequence[TextItem]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(
            [text for text, _ in batch],
            padding=True,
            truncation=True,
            max_length=self.config.max_length,
            return_tensors="pt",
        )
        inputs = {key: value.to(self.device) for key, value in encoded.items()}
        inputs["labels"] = torch.tensor([label for _, label in batch], device=self.device)
        return inputs

    # -- the run -------------------------------------------------------------------------

    def execute(self, started: float) -> TextTrainResult:
        self._load()
        start_step = self._resume()
        if start_step:
            self.callbacks.on_resumed(start_step)
        train_started = time.monotonic()
        loss = self._train(start_step)
        trained_s = time.monotonic() - train_started
        metrics = self.evaluate(self.total_steps) if self.val_items else None
        if metrics is not None:
            self.callbacks.on_evaluation(metrics)
        output_path = self._save()
        steps_run = max(0, self.total_steps - start_step)
        samples = steps_run * self.config.batch_size * self.config.gradient_accumulation_steps
        return TextTrainResult(
            method=self.config.method,
            output_path=output_path,
            steps=self.total_steps,
            final_loss=loss,
            metrics=metrics,
            trainable_params=self.trainable_params,
            total_params=self.total_params,
            file_size_bytes=sum(p.stat().st_size for p in output_path.glob("*.safetensors")),
            duration_s=time.monotonic() - started,
            samples_per_s=samples / trained_s if trained_s > 0 else 0.0,
            resumed_from_step=start_step or None,
        )

    def _train(self, start_step: int) -> float:
        config = self.config
        accumulation = config.gradient_accumulation_steps
        self.model.train()
        loss_value = math.nan
        started = time.monotonic()
        for step in range(start_step + 1, self.total_steps + 1):
            if self.callbacks.should_stop():
                raise TrainingCancelled(step - 1)
            # Dropout draws from the global RNG: seeding it per step makes resume exact.
            torch.manual_seed(config.seed * 1_000_003 + step)
            losses = []
            for micro in range(accumulation):
                index = (step - 1) * accumulation + micro
                output = self.model(**self._encode(self._micro_batch(index)))
                self.accelerator.backward(output.loss / accumulation)
                losses.append(float(output.loss.detach()))
            if config.max_grad_norm is not None:
                self.accelerator.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            loss_value = sum(losses) / len(losses)
            self.loss_ema = _LOSS_EMA_BETA * self.loss_ema + (1 - _LOSS_EMA_BETA) * loss_value
            self.loss_ema_count += 1
            self._report(step, start_step, loss_value, started)
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                self._checkpoint(step, loss_value)
            if (
                self.val_items
                and config.eval_every
                and step % config.eval_every == 0
                and step != self.total_steps  # the final evaluation follows the loop
            ):
                self.callbacks.on_evaluation(self.evaluate(step))
        return loss_value

    def _report(self, step: int, start_step: int, loss: float, started: float) -> None:
        config = self.config
        elapsed = time.monotonic() - started
        per_step = elapsed / (step - start_step)
        samples = config.batch_size * config.gradient_accumulation_steps
        per_epoch = math.ceil(len(self.train_items) / config.batch_size)
        self.callbacks.on_step(
            StepProgress(
                step=step,
                total_steps=self.total_steps,
                epoch=(step - 1) * config.gradient_accumulation_steps // per_epoch,
                loss=loss,
                # Bias-corrected: without it the average leans towards the zero it starts from.
                smoothed_loss=self.loss_ema / (1 - _LOSS_EMA_BETA**self.loss_ema_count),
                lr=float(self.lr_scheduler.get_last_lr()[0]),
                samples_per_s=samples / per_step if per_step > 0 else 0.0,
                eta_s=(self.total_steps - step) * per_step,
            )
        )

    @torch.no_grad()
    def evaluate(self, step: int) -> EvalMetrics:
        """Accuracy, macro F1 and mean loss on the validation split."""
        self.model.eval()
        predictions: list[int] = []
        loss_sum = 0.0
        for start in range(0, len(self.val_items), _EVAL_BATCH):
            batch = self.val_items[start : start + _EVAL_BATCH]
            output = self.model(**self._encode(batch))
            loss_sum += float(output.loss) * len(batch)
            predictions.extend(output.logits.argmax(dim=-1).tolist())
        self.model.train()
        labels = [label for _, label in self.val_items]
        return EvalMetrics(
            step=step,
            accuracy=sum(p == t for p, t in zip(predictions, labels, strict=True)) / len(labels),
            f1=macro_f1(predictions, labels),
            loss=loss_sum / len(labels),
            count=len(labels),
        )

    # -- checkpoints and output ----------------------------------------------------------

    def _checkpoint(self, step: int, loss: float) -> None:
        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        final = self.checkpoints_dir / f"{CHECKPOINT_PREFIX}{step}"
        tmp = self.checkpoints_dir / f".tmp-{final.name}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file(self._trainable_state(), str(tmp / _WEIGHTS_FILE))
        torch.save(
            {
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(),
            },
            tmp / _TRAINING_STATE_FILE,
        )
        state = {
            "step": step,
            "loss": loss,
            "loss_ema": self.loss_ema,
            "loss_ema_count": self.loss_ema_count,
            "config": self.config.to_dict(),
        }
        (tmp / _STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in _checkpoints(self.checkpoints_dir)[: -self.config.checkpoints_keep]:
            shutil.rmtree(old, ignore_errors=True)
        self.callbacks.on_checkpoint(CheckpointInfo(step=step, path=final, loss=loss))

    def _resume(self) -> int:
        """Load the newest checkpoint, if any; the step it was written at (0 when none)."""
        found = _checkpoints(self.checkpoints_dir)
        if not found:
            return 0
        step, path = found[-1]
        state = json.loads((path / _STATE_FILE).read_text(encoding="utf-8"))
        saved = state["config"]
        now = self.config.to_dict()
        for field in RESUME_FIXED_FIELDS:
            if saved.get(field) != now[field]:
                raise ConfigError(
                    field,
                    f"is {now[field]!r} but {path.name} was trained with {saved.get(field)!r}; "
                    "use a fresh output_dir to start over",
                )
        weights = load_file(str(path / _WEIGHTS_FILE), device=str(self.device))
        result = self._unwrapped().load_state_dict(weights, strict=False)
        if result.unexpected_keys:
            raise ConfigError("model_dir", f"{path.name} does not match this model")
        training_state = torch.load(
            path / _TRAINING_STATE_FILE, map_location="cpu", weights_only=True
        )
        self.optimizer.load_state_dict(training_state["optimizer"])
        self.lr_scheduler.load_state_dict(training_state["lr_scheduler"])
        self.loss_ema = float(state["loss_ema"])
        self.loss_ema_count = int(state["loss_ema_count"])
        return step

    def _save(self) -> Path:
        """Write the adapter (lora) or the whole model and tokenizer (full), swapped in whole."""
        name = ADAPTER_DIR if self.config.method == "lora" else MODEL_DIR
        final = self.output_dir / name
        tmp = self.output_dir / f".tmp-{name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        self._unwrapped().save_pretrained(tmp, safe_serialization=True)
        if self.config.method == "full":
            self.tokenizer.save_pretrained(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        return final


def _checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for path in checkpoints_dir.iterdir():
        suffix = path.name.removeprefix(CHECKPOINT_PREFIX)
        if path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit():
            found.append((int(suffix), path))
    return sorted(found)


def macro_f1(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """The unweighted mean of each label's F1 (labels seen in either list)."""
    scores = []
    for label in sorted(set(labels) | set(predictions)):
        tp = sum(p == label and t == label for p, t in zip(predictions, labels, strict=True))
        fp = sum(p == label and t != label for p, t in zip(predictions, labels, strict=True))
        fn = sum(p != label and t == label for p, t in zip(predictions, labels, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores) if scores else 0.0
