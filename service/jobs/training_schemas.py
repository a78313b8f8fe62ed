"""The training request as the API takes it: every hyperparameter, its default and its bounds.

The worker's engine validates the same settings again (it is usable without the API); this
schema is what clients see in the OpenAPI document and what answers 422 before anything is
queued. A test holds its fields, defaults and presets equal to the trainer's config.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.job_params import DEFAULT_MAX_STEPS, unet_targets
from service.registry import ADAPTER_NAME_PATTERN

EvaluationMetric = Literal["clip_score", "fidelity", "strength", "leakage", "cmmd"]
EVALUATION_METRICS: tuple[EvaluationMetric, ...] = (
    "clip_score",
    "fidelity",
    "strength",
    "leakage",
    "cmmd",
)
DEFAULT_EVAL_SEEDS = (0, 1)
MAX_EVAL_IMAGES = 64
# The metric that computes each selectable figure.
SELECT_NEEDS = {
    "clip_score": "clip_score",
    "clip_score_base": "clip_score",
    "clip_score_gain": "clip_score",
    "fidelity_dino": "fidelity",
    "fidelity_clip_i": "fidelity",
    "strength": "strength",
    "leakage": "leakage",
    "cmmd": "cmmd",
}

TargetPreset = Literal["attn", "cross-attn-qkv"]


class Hyperparameters(BaseModel):
    """LoRA training settings. All optional; unknown keys answer 422."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(16, gt=0, le=1024, description="LoRA rank")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; default = rank (scale 1)")
    target_modules: TargetPreset | list[str] = Field(
        "attn",
        description="'attn' (to_q,to_k,to_v,to_out.0), 'cross-attn-qkv' (attn2 q/k/v) "
        "or a list of UNet module-name suffixes",
    )
    train_text_encoder: bool = False
    text_encoder_lr: float | None = Field(None, gt=0, le=1)
    text_encoder_target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    learning_rate: float = Field(1e-4, gt=0, le=1)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    max_steps: int | None = Field(None, gt=0, le=1_000_000, description="default 1000")
    epochs: int | None = Field(None, gt=0, le=10_000, description="instead of max_steps")
    batch_size: int = Field(1, gt=0, le=256)
    gradient_accumulation_steps: int = Field(1, gt=0, le=1024)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    use_dora: bool = False
    resolution: int = Field(512, ge=8, le=4096, multiple_of=8)
    center_crop: bool = False
    random_flip: bool = False
    caption_dropout: float = Field(0.0, ge=0, lt=1)
    noise_offset: float = Field(0.0, ge=0, le=1)
    snr_gamma: float | None = Field(None, gt=0)
    seed: int | None = Field(None, ge=0, lt=2**32)
    cache_latents: bool = False
    checkpoint_every: int = Field(500, gt=0)
    checkpoints_keep: int = Field(3, gt=0, le=100)
    validation_prompts: list[str] = Field(default_factory=list, max_length=16)
    validation_every: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> Hyperparameters:
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("set max_steps or epochs, not both")
        if self.validation_every is not None and not self.validation_prompts:
            raise ValueError("validation_every needs at least one validation prompt")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules must not be empty")
        return self

    def unet_targets(self) -> tuple[str, ...]:
        """UNet module-name suffixes that receive LoRA layers."""
        return unet_targets(self.target_modules)

    def resolved(self) -> dict[str, Any]:
        """Every setting with its default filled in (what lineage records)."""
        data = self.model_dump()
        if data["max_steps"] is None and data["epochs"] is None:
            data["max_steps"] = DEFAULT_MAX_STEPS
        return data


SelectableMetric = Literal[
    "clip_score",
    "clip_score_base",
    "clip_score_gain",
    "fidelity_dino",
    "fidelity_clip_i",
    "strength",
    "leakage",
    "cmmd",
]
EvalPrompt = Annotated[str, Field(min_length=1, max_length=500)]


class CheckpointSelect(BaseModel):
    """Which aggregate figure picks the best checkpoint, and whether more is better."""

    model_config = ConfigDict(extra="forbid")

    metric: SelectableMetric = "clip_score"
    mode: Literal["max", "min"] = "max"


class Evaluation(BaseModel):
    """Base model vs LoRA at the same seeds, scored at each checkpoint (docs/evaluation.md)."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[EvalPrompt] = Field(min_length=1, max_length=16, description="target prompts")
    control_prompts: list[EvalPrompt] = Field(
        default_factory=list, max_length=16, description="unrelated prompts, for leakage"
    )
    seeds: list[Annotated[int, Field(ge=0, lt=2**32)]] = Field(
        default_factory=lambda: list(DEFAULT_EVAL_SEEDS), min_length=1, max_length=8
    )
    every: bool = Field(True, description="evaluate at each checkpoint (else the final only)")
    num_inference_steps: int = Field(20, ge=1, le=150)
    guidance_scale: float = Field(7.5, ge=0, le=50)
    metrics: list[EvaluationMetric] = Field(
        default_factory=lambda: list(EVALUATION_METRICS), min_length=1
    )
    select: CheckpointSelect = Field(default_factory=CheckpointSelect)

    @model_validator(mode="after")
    def _consistent(self) -> Evaluation:
        images = (len(self.prompts) + len(self.control_prompts)) * len(self.seeds)
        if images > MAX_EVAL_IMAGES:
            raise ValueError(
                f"(prompts + control_prompts) x seeds is {images} image pairs; "
                f"at most {MAX_EVAL_IMAGES} per evaluation"
            )
        needs = SELECT_NEEDS[self.select.metric]
        if needs not in self.metrics:
            raise ValueError(f"select.metric {self.select.metric!r} needs the metric {needs!r}")
        if self.select.metric == "leakage" and not self.control_prompts:
            raise ValueError("select.metric 'leakage' needs at least one control prompt")
        return self


class TrainJobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset_id: str = Field(max_length=40)
    adapter_name: str = Field(pattern=ADAPTER_NAME_PATTERN, description="new or existing")
    base_model: str | None = Field(None, description="a configured base model; default first")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    evaluation: Evaluation | None = Field(None, description="score checkpoints against the base")
    publish: Literal["final", "best"] = Field(
        "final", description="'best' publishes the best checkpoint (needs evaluation)"
    )
    dry_run: bool = Field(False, description="answer the plan without queuing")

    @model_validator(mode="after")
    def _publish_needs_evaluation(self) -> TrainJobCreate:
        if self.publish == "best" and self.evaluation is None:
            raise ValueError("publish 'best' needs an evaluation to pick the best checkpoint")
        return self


class TrainingPlanOut(BaseModel):
    dry_run: Literal[True] = True
    base_model: str
    dataset_id: str
    total_steps: int | None
    trainable_params: dict[str, int]
    adapter_file_bytes: int
    peak_memory_bytes: int
    memory: dict[str, int]
    seconds_per_step: float
    estimated_duration_s: float | None
    assumptions: dict[str, Any]
    hyperparameters: dict[str, Any]


class CheckpointOut(BaseModel):
    step: int
    metrics: dict[str, Any]
    created_at: Any


class CheckpointList(BaseModel):
    data: list[CheckpointOut]
    has_more: bool = False
