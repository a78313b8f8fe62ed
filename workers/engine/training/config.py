"""Training settings: a frozen dataclass that validates itself."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from workers.engine.training.errors import ConfigError

LrSchedulerName = Literal["constant", "constant_with_warmup", "linear", "cosine"]
MixedPrecision = Literal["no", "fp16", "bf16"]

LR_SCHEDULERS: tuple[str, ...] = ("constant", "constant_with_warmup", "linear", "cosine")
MIXED_PRECISIONS: tuple[str, ...] = ("no", "fp16", "bf16")
DEFAULT_MAX_STEPS = 1000

# Named sets of UNet module-name suffixes, resolved by `TrainConfig.unet_target_modules`.
# "attn" is the diffusers LoRA recipe; "cross-attn-qkv" touches only how text steers the image.
TARGET_MODULE_PRESETS: dict[str, tuple[str, ...]] = {
    "attn": ("to_q", "to_k", "to_v", "to_out.0"),
    "cross-attn-qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
}

# Settings that change the shape or meaning of the LoRA weights: a checkpoint written with other
# values cannot be resumed.
WEIGHT_SHAPE_FIELDS: tuple[str, ...] = (
    "rank",
    "alpha",
    "target_modules",
    "train_text_encoder",
    "text_encoder_target_modules",
    "use_dora",
)


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one LoRA training run; invalid values raise `ConfigError`."""

    rank: int = 16
    alpha: float | None = None  # None: equal to rank (scale 1.0)
    target_modules: str | tuple[str, ...] = "attn"
    train_text_encoder: bool = False
    text_encoder_lr: float | None = None  # None: learning_rate
    text_encoder_target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    learning_rate: float = 1e-4
    lr_scheduler: LrSchedulerName = "constant"
    warmup_steps: int = 0
    max_steps: int | None = None  # None with epochs None: DEFAULT_MAX_STEPS
    epochs: int | None = None
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    mixed_precision: MixedPrecision = "no"
    gradient_checkpointing: bool = False
    use_dora: bool = False
    resolution: int = 512
    center_crop: bool = False
    random_flip: bool = False
    caption_dropout: float = 0.0
    noise_offset: float = 0.0
    snr_gamma: float | None = None
    seed: int | None = None
    cache_latents: bool = False
    checkpoint_every: int = 500
    checkpoints_keep: int = 3
    validation_prompts: tuple[str, ...] = ()
    validation_every: int | None = None
    validation_inference_steps: int = 20
    weight_decay: float = 1e-2
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        # Lists from JSON become tuples so that the config stays hashable and frozen.
        for name in ("text_encoder_target_modules", "validation_prompts"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.max_steps is None and self.epochs is None:
            object.__setattr__(self, "max_steps", DEFAULT_MAX_STEPS)
        self._validate()

    def _validate(self) -> None:
        _positive_int(self, "rank")
        if self.alpha is not None:
            _positive_number(self, "alpha")
        self._validate_target_modules()
        _bool(self, "train_text_encoder")
        _suffix_tuple(self, "text_encoder_target_modules")
        _positive_number(self, "learning_rate")
        if self.text_encoder_lr is not None:
            _positive_number(self, "text_encoder_lr")
        _choice(self, "lr_scheduler", LR_SCHEDULERS)
        _non_negative_int(self, "warmup_steps")
        if self.max_steps is not None and self.epochs is not None:
            raise ConfigError("epochs", "set max_steps or epochs, not both")
        if self.max_steps is not None:
            _positive_int(self, "max_steps")
        if self.epochs is not None:
            _positive_int(self, "epochs")
        _positive_int(self, "batch_size")
        _positive_int(self, "gradient_accumulation_steps")
        _choice(self, "mixed_precision", MIXED_PRECISIONS)
        for name in ("gradient_checkpointing", "use_dora", "center_crop", "random_flip"):
            _bool(self, name)
        _positive_int(self, "resolution")
        if self.resolution % 8:
            raise ConfigError("resolution", "must be a multiple of 8 (the VAE downsamples by 8)")
        _number(self, "caption_dropout")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError("caption_dropout", "must be in [0, 1)")
        _number(self, "noise_offset")
        if self.noise_offset < 0:
            raise ConfigError("noise_offset", "must be >= 0")
        if self.snr_gamma is not None:
            _positive_number(self, "snr_gamma")
        if self.seed is not None:
            _non_negative_int(self, "seed")
        _bool(self, "cache_latents")
        _positive_int(self, "checkpoint_every")
        _positive_int(self, "checkpoints_keep")
        if not isinstance(self.validation_prompts, tuple) or not all(
            isinstance(p, str) for p in self.validation_prompts
        ):
            raise ConfigError("validation_prompts", "must be a list of strings")
        if self.validation_every is not None:
            _positive_int(self, "validation_every")
            if not self.validation_prompts:
                raise ConfigError(
                    "validation_prompts", "validation_every needs at least one prompt"
                )
        _positive_int(self, "validation_inference_steps")
        _number(self, "weight_decay")
        if self.weight_decay < 0:
            raise ConfigError("weight_decay", "must be >= 0")
        if self.max_grad_norm is not None:
            _positive_number(self, "max_grad_norm")

    def _validate_target_modules(self) -> None:
        value = self.target_modules
        if isinstance(value, str):
            if value not in TARGET_MODULE_PRESETS:
                names = ", ".join(TARGET_MODULE_PRESETS)
                raise ConfigError(
                    "target_modules",
                    f"unknown preset {value!r}; use one of {names} or a list of module suffixes",
                )
            return
        _suffix_tuple(self, "target_modules")

    @property
    def lora_alpha(self) -> float:
        """The LoRA alpha in use (rank when unset): weights are scaled by alpha / rank."""
        return float(self.rank) if self.alpha is None else float(self.alpha)

    @property
    def unet_target_modules(self) -> tuple[str, ...]:
        """UNet module-name suffixes that receive LoRA layers."""
        if isinstance(self.target_modules, str):
            return TARGET_MODULE_PRESETS[self.target_modules]
        return self.target_modules

    @property
    def effective_text_encoder_lr(self) -> float:
        """Learning rate of the text encoder's LoRA layers."""
        return self.learning_rate if self.text_encoder_lr is None else self.text_encoder_lr

    def total_steps(self, *, num_items: int, num_processes: int = 1) -> int:
        """Optimizer steps of the whole run: max_steps, or what `epochs` passes over the items."""
        if self.max_steps is not None:
            return self.max_steps
        assert self.epochs is not None
        samples_per_step = self.batch_size * self.gradient_accumulation_steps * num_processes
        return max(1, math.ceil(self.epochs * num_items / samples_per_step))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; `from_dict(to_dict())` gives an equal config."""
        data = dataclasses.asdict(self)
        for name, value in data.items():
            if isinstance(value, tuple):
                data[name] = list(value)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build from a mapping (JSON hyperparameters); an unknown key raises `ConfigError`."""
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise ConfigError(str(key), "unknown setting")
        return cls(**dict(data))


def _number(config: TrainConfig, name: str) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(name, f"must be a finite number, got {value!r}")


def _positive_number(config: TrainConfig, name: str) -> None:
    _number(config, name)
    if getattr(config, name) <= 0:
        raise ConfigError(name, f"must be > 0, got {getattr(config, name)!r}")


def _int(config: TrainConfig, name: str) -> int:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"must be an integer, got {value!r}")
    return value


def _positive_int(config: TrainConfig, name: str) -> None:
    if _int(config, name) < 1:
        raise ConfigError(name, f"must be >= 1, got {getattr(config, name)!r}")


def _non_negative_int(config: TrainConfig, name: str) -> None:
    if _int(config, name) < 0:
        raise ConfigError(name, f"must be >= 0, got {getattr(config, name)!r}")


def _bool(config: TrainConfig, name: str) -> None:
    if not isinstance(getattr(config, name), bool):
        raise ConfigError(name, f"must be true or false, got {getattr(config, name)!r}")


def _choice(config: TrainConfig, name: str, choices: tuple[str, ...]) -> None:
    if getattr(config, name) not in choices:
        raise ConfigError(
            name, f"must be one of {', '.join(choices)}, got {getattr(config, name)!r}"
        )


def _suffix_tuple(config: TrainConfig, name: str) -> None:
    value = getattr(config, name)
    if (
        not isinstance(value, tuple)
        or not value
        or not all(isinstance(s, str) and s.strip(".") == s and s for s in value)
    ):
        raise ConfigError(name, "must be a non-empty list of module-name suffixes")
