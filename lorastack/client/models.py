"""Typed requests and responses of the lorastack API, as the client sees them.

Every model here names a component of ``openapi/openapi.json`` (``__schema_name__``) and has
exactly its properties and required fields; tests/client/test_models_schema.py holds them to
that, so a server change that the client misses fails the suite. Responses accept fields that a
newer server adds (``extra="allow"``); requests send only the fields a caller set, so the
server's defaults apply to the rest.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field


class Response(BaseModel):
    """A body the server answers."""

    model_config = ConfigDict(extra="allow")
    __schema_name__: ClassVar[str]


class Request(BaseModel):
    """A body the client sends: unknown fields are a mistake, caught before the request."""

    model_config = ConfigDict(extra="forbid")
    __schema_name__: ClassVar[str]

    def body(self) -> dict[str, Any]:
        """The JSON body: the fields that were set, so the server's defaults fill the rest."""
        return self.model_dump(mode="json", exclude_unset=True)


# -- datasets ---------------------------------------------------------------------------------


class DatasetSummary(Response):
    __schema_name__ = "DatasetSummary"

    id: str
    name: str
    status: str
    sha256: str
    layout: str | None = None
    image_count: int
    caption_count: int
    pair_count: int
    total_bytes: int
    created_at: datetime


class Dataset(DatasetSummary):
    __schema_name__ = "DatasetOut"

    report: dict[str, Any]


class DatasetList(Response):
    __schema_name__ = "DatasetList"

    data: list[DatasetSummary]
    has_more: bool


# -- jobs -------------------------------------------------------------------------------------


class JobError(Response):
    __schema_name__ = "JobError"

    code: str
    message: str | None = None


FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


class Job(Response):
    __schema_name__ = "JobOut"

    id: str
    kind: str
    status: str
    queue: str
    queue_position: int | None = None
    dataset_id: str | None = None
    base_model: str | None = None
    adapter_name: str | None = None
    params: dict[str, Any]
    progress: dict[str, Any]
    attempts: int
    max_attempts: int
    error: JobError | None = None
    result: dict[str, Any] | None = None
    created_at: datetime
    queued_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    heartbeat_at: datetime | None = None

    @property
    def done(self) -> bool:
        """True once the job reached a final status (succeeded, failed or cancelled)."""
        return self.status in FINAL_STATUSES


class JobList(Response):
    __schema_name__ = "JobList"

    data: list[Job]
    has_more: bool


class JobEvent(Response):
    __schema_name__ = "JobEventOut"

    seq: int
    type: str
    level: str
    data: dict[str, Any]
    created_at: datetime


class JobEventList(Response):
    __schema_name__ = "JobEventList"

    data: list[JobEvent]
    has_more: bool


class Checkpoint(Response):
    __schema_name__ = "CheckpointOut"

    step: int
    metrics: dict[str, Any]
    created_at: datetime


class CheckpointList(Response):
    __schema_name__ = "CheckpointList"

    data: list[Checkpoint]
    has_more: bool = False


class Hyperparameters(Request):
    """Training hyperparameters; unset ones take the server's defaults (see docs/training.md)."""

    __schema_name__ = "Hyperparameters"

    rank: int | None = None
    alpha: float | None = None
    target_modules: str | list[str] | None = None
    train_text_encoder: bool | None = None
    text_encoder_lr: float | None = None
    text_encoder_target_modules: list[str] | None = None
    learning_rate: float | None = None
    lr_scheduler: str | None = None
    warmup_steps: int | None = None
    max_steps: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    mixed_precision: str | None = None
    gradient_checkpointing: bool | None = None
    use_dora: bool | None = None
    resolution: int | None = None
    center_crop: bool | None = None
    random_flip: bool | None = None
    caption_dropout: float | None = None
    noise_offset: float | None = None
    snr_gamma: float | None = None
    seed: int | None = None
    cache_latents: bool | None = None
    checkpoint_every: int | None = None
    checkpoints_keep: int | None = None
    validation_prompts: list[str] | None = None
    validation_every: int | None = None


class CheckpointSelect(Request):
    """Which aggregate picks the best checkpoint (docs/evaluation.md)."""

    __schema_name__ = "CheckpointSelect"

    metric: str | None = None
    mode: str | None = None


class Evaluation(Request):
    """Base model vs LoRA at the same seeds, scored at each checkpoint (docs/evaluation.md)."""

    __schema_name__ = "Evaluation"

    prompts: list[str]
    control_prompts: list[str] | None = None
    seeds: list[int] | None = None
    every: bool | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    metrics: list[str] | None = None
    select: CheckpointSelect | None = None


class TrainJobCreate(Request):
    __schema_name__ = "TrainJobCreate"

    dataset_id: str
    adapter_name: str
    base_model: str | None = None
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    evaluation: Evaluation | None = None
    publish: str | None = None
    dry_run: bool = False


class TrainingPlan(Response):
    __schema_name__ = "TrainingPlanOut"

    dry_run: bool = True
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


# -- adapters ---------------------------------------------------------------------------------


class AdapterVersion(Response):
    __schema_name__ = "AdapterVersionOut"

    adapter: str
    version: int
    ref: str
    base_model: str
    source: str
    job_id: str | None = None
    checkpoint_step: int | None = None
    sha256: str
    size_bytes: int
    rank: int | None = None
    alpha: float | None = None
    target_modules: list[str]
    trainable_params: int | None = None
    lineage: dict[str, Any]
    metrics: dict[str, Any]
    aliases: list[str]
    created_at: datetime


class AliasEvent(Response):
    __schema_name__ = "AliasEventOut"

    alias: str
    from_version: int | None = None
    to_version: int | None = None
    actor: str | None = None
    created_at: datetime


class AdapterSummary(Response):
    __schema_name__ = "AdapterSummaryOut"

    id: str
    name: str
    base_model: str
    version_count: int
    latest_version: int | None = None
    aliases: dict[str, int]
    created_at: datetime


class Adapter(AdapterSummary):
    __schema_name__ = "AdapterOut"

    versions: list[AdapterVersion]
    alias_history: list[AliasEvent]


class AdapterList(Response):
    __schema_name__ = "AdapterList"

    data: list[AdapterSummary]
    has_more: bool


class Alias(Response):
    __schema_name__ = "AliasOut"

    adapter: str
    alias: str
    version: int
    updated_at: datetime


class AliasPut(Request):
    __schema_name__ = "AliasPut"

    version: int


class LintReport(Response):
    __schema_name__ = "LintReportOut"

    format: str | None = None
    rank: int | None = None
    ranks: dict[str, Any] = Field(default_factory=dict)
    alpha: float | None = None
    alphas: dict[str, Any] = Field(default_factory=dict)
    alpha_source: str | None = None
    target_modules: list[str] = Field(default_factory=list)
    param_count: int = 0
    matched_keys: list[str] = Field(default_factory=list)
    unmatched_keys: list[str] = Field(default_factory=list)
    ignored_keys: list[str] = Field(default_factory=list)
    errors: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)


class ImportedVersion(AdapterVersion):
    __schema_name__ = "ImportedVersionOut"

    report: LintReport


class PromotedVersion(AdapterVersion):
    __schema_name__ = "PromotedVersionOut"

    created: bool


# -- generation -------------------------------------------------------------------------------


class AdapterWeight(Request):
    __schema_name__ = "AdapterWeight"

    ref: str
    weight: float = 1.0


class GenerateRequest(Request):
    __schema_name__ = "GenerateRequest"

    prompt: str
    negative_prompt: str | None = None
    adapters: list[AdapterWeight] | None = None
    base_model: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    num_images: int | None = None
    scheduler: str | None = None
    response_format: Literal["url", "b64_json"] | None = None
    wait: float | None = None


class ImageInfo(Response):
    __schema_name__ = "ImageOut"

    id: str
    seed: int | None = None
    width: int
    height: int
    url: str | None = None
    b64_json: str | None = None


class ResolvedAdapter(Response):
    __schema_name__ = "ResolvedAdapter"

    ref: str
    name: str
    version: int | None = None
    weight: float
    job_id: str | None = None
    checkpoint_step: int | None = None


class Generation(Response):
    __schema_name__ = "GenerateOut"

    job_id: str
    status: str
    base_model: str
    images: list[ImageInfo]
    adapters: list[ResolvedAdapter]
    seed: int
    timings: dict[str, Any]


class GridAxis(Request):
    """One axis of a grid: prompts, seeds, adapter refs (None = base model) or weights."""

    __schema_name__ = "GridAxis"

    axis: str
    values: list[str | int | float | None]


class GridCreate(Request):
    """A labeled image grid (POST /grids; docs/inference.md)."""

    __schema_name__ = "GridCreate"

    x: GridAxis
    y: GridAxis | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    adapter: str | None = None
    weight: float | None = None
    seed: int | None = None
    base_model: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None
    wait: float | None = None


class Grid(Response):
    __schema_name__ = "GridOut"

    job_id: str
    status: str
    image_id: str | None = None
    url: str | None = None
    rows: list[str]
    columns: list[str]
    cells: list[list[dict[str, Any]]]
    layout: dict[str, int] | None = None


class ExperimentCreate(Request):
    """A grid of training runs (POST /experiments; docs/evaluation.md#experiments)."""

    __schema_name__ = "ExperimentCreate"

    dataset_id: str
    adapter_name: str
    grid: dict[str, list[Any]]
    base_model: str | None = None
    hyperparameters: Hyperparameters | None = None
    evaluation: Evaluation | None = None
    publish: str | None = None


class ExperimentRun(Response):
    __schema_name__ = "ExperimentRun"

    index: int
    job_id: str
    adapter_name: str
    parameters: dict[str, Any]
    status: str
    trainable_params: int | None = None
    adapter_file_bytes: int | None = None
    duration_s: float | None = None
    final_loss: float | None = None
    version: int | None = None
    best_step: int | None = None
    best_version: int | None = None
    metrics: dict[str, float]


class Experiment(Response):
    __schema_name__ = "ExperimentOut"

    id: str
    status: str
    dataset_id: str | None = None
    base_model: str
    adapter_name: str
    grid: dict[str, list[Any]]
    select: dict[str, str] | None = None
    runs: list[ExperimentRun]
    best_run: int | None = None
    created_at: datetime


class ExperimentList(Response):
    __schema_name__ = "ExperimentList"

    data: list[Experiment]
    has_more: bool


# -- workers ----------------------------------------------------------------------------------


class WorkerInfo(Response):
    __schema_name__ = "WorkerOut"

    id: str
    hostname: str
    queues: list[str]
    base_model: str | None
    device: str | None
    current_job_id: str | None
    info: dict[str, Any]
    started_at: datetime
    heartbeat_at: datetime


class WorkerList(Response):
    __schema_name__ = "WorkerList"

    data: list[WorkerInfo]
    has_more: bool = False
    queue_lengths: dict[str, int] = {}  # queued jobs of every tenant, per queue


ALL_MODELS: tuple[type[Response] | type[Request], ...] = (
    ExperimentCreate,
    ExperimentRun,
    Experiment,
    ExperimentList,
    GridAxis,
    GridCreate,
    Grid,
    CheckpointSelect,
    Evaluation,
    DatasetSummary,
    Dataset,
    DatasetList,
    JobError,
    Job,
    JobList,
    JobEvent,
    JobEventList,
    Checkpoint,
    CheckpointList,
    Hyperparameters,
    TrainJobCreate,
    TrainingPlan,
    AdapterVersion,
    AliasEvent,
    AdapterSummary,
    Adapter,
    AdapterList,
    Alias,
    AliasPut,
    LintReport,
    ImportedVersion,
    PromotedVersion,
    AdapterWeight,
    GenerateRequest,
    ImageInfo,
    ResolvedAdapter,
    Generation,
    WorkerInfo,
    WorkerList,
)
