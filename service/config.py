"""The one Settings object, read from ``LORASTACK_*`` environment variables."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

TINY_MODEL_NAME = "tiny"
MiB = 1024 * 1024


@dataclass(frozen=True)
class DatasetLimits:
    """Every cap on a dataset upload; each is named in the error that enforces it."""

    # Size of the uploaded zip itself (the route enforces it while streaming the body).
    max_upload_bytes: int = 512 * MiB
    # Entries in the zip's central directory (files and folders).
    max_entries: int = 5000
    # Bytes actually decompressed from any one entry (counted while streaming).
    max_file_bytes: int = 32 * MiB
    # Bytes actually decompressed from the whole archive.
    max_total_bytes: int = 2048 * MiB
    # Decompressed / compressed bytes of one entry; checked once an entry has produced
    # compression_ratio_min_bytes, so small, very repetitive text files still pass.
    max_compression_ratio: float = 200.0
    compression_ratio_min_bytes: int = 1 * MiB
    # Width * height of one image (after the header is read, before pixels are decoded).
    max_image_pixels: int = 40_000_000
    # One caption file (.txt / .caption), in bytes of UTF-8.
    max_caption_bytes: int = 16 * 1024
    # One metadata file (captions.jsonl, metadata.jsonl, metadata.csv, results.csv); a file
    # over max_file_bytes is refused whole before this per-file cap applies.
    max_metadata_bytes: int = 32 * MiB
    # A zip member name, in bytes of UTF-8.
    max_name_bytes: int = 1024
    # Captions kept for one image (Flickr30k has 5).
    max_captions_per_image: int = 64

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"DatasetLimits.{field.name} must be a positive number")

    def as_dict(self) -> dict[str, Any]:
        """The caps as a plain dict (for the report)."""
        return dataclasses.asdict(self)


class SettingsError(ValueError):
    """A setting that cannot work; reported as one line at start-up."""


def normalize_database_url(url: str) -> str:
    """Accept the usual URL forms and pick the SQLAlchemy driver ourselves.

    ``postgres://`` and ``postgresql://`` use psycopg 3; ``sqlite:///path`` stays as is.
    """
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url[len("postgresql://") :]
    if url.startswith(("postgresql+psycopg://", "sqlite://", "sqlite+pysqlite://")):
        return url
    scheme = url.split("://", 1)[0] if "://" in url else url
    raise SettingsError(
        f"LORASTACK_DATABASE_URL: unsupported scheme {scheme!r} "
        "(use postgresql://user@host/db or sqlite:///path/to/file.db)"
    )


class Settings(BaseSettings):
    """Process-wide configuration. Build it once with :func:`get_settings`."""

    model_config = SettingsConfigDict(env_prefix="LORASTACK_", extra="ignore")

    env: str = Field(default="development", description="development | production")
    data_dir: Path = Field(default=Path(".lorastack"))
    database_url: str | None = None
    redis_url: str | None = Field(
        default=None, description="redis://host:port/db; unset = embedded Redis in the data dir"
    )
    redis_key_prefix: str = Field(
        default="",
        description="prefix for every broker key, to share one Redis between deployments",
    )
    base_models: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="JSON object name -> hub id or local folder; the first one is the default",
    )
    artifact_dir: Path | None = None
    auth_cache_ttl_s: float = Field(
        default=10.0,
        ge=0,
        description="seconds an API process trusts a verified key before looking it up again "
        "(a revoked key stops working within this time); 0 looks it up on every request",
    )

    # Celery and workers.
    worker_heartbeat_s: float = 5.0
    worker_stale_s: float = 30.0
    visibility_timeout_s: int = 6 * 3600 + 600
    # A stale job is reaped within job_lease_s + one heartbeat (25 + 5 = 30 s by default).
    job_lease_s: float = Field(default=25.0, gt=0)
    job_max_attempts: int = 3

    # Durable dispatch: a worker's heartbeat compares queued jobs with queued messages every
    # dispatch_check_s and re-sends jobs queued for longer than dispatch_resend_after_s that
    # have no message (Redis restarted empty, a publish failed).
    dispatch_check_s: float = Field(default=5.0, gt=0)
    dispatch_resend_after_s: float = Field(default=10.0, ge=0)
    # Seconds a publish to Redis may take (retries included) before the API gives up on it
    # and leaves the job, already committed, to the re-send.
    dispatch_publish_timeout_s: float = Field(default=1.0, gt=0)

    # Per-tenant quotas, per job kind: more queued jobs answer 429; a tenant at its running
    # cap is skipped by the fair lease until one of its jobs ends.
    tenant_max_queued_train: int = Field(default=100, ge=1)
    tenant_max_queued_generate: int = Field(default=1000, ge=1)
    tenant_max_running_train: int = Field(default=16, ge=1)
    tenant_max_running_generate: int = Field(default=16, ge=1)
    quota_retry_after_s: int = Field(default=5, ge=1)
    # Request rate per API key (token bucket in Redis); 0 turns it off.
    rate_limit_per_s: float = Field(default=50.0, ge=0)
    rate_limit_burst: int = Field(default=200, ge=1)

    # Generation limits (out of range answers 422 naming the limit).
    generate_max_steps: int = 150
    generate_max_pixels: int = 1024 * 1024
    generate_max_side: int = 2048
    # Relative to the base model's native size, too: cost grows with pixels (and worse where
    # attention runs at full resolution), so a model is not asked far beyond what it serves.
    generate_max_side_factor: float = Field(default=2.0, gt=0)
    generate_max_pixels_factor: float = Field(default=4.0, gt=0)
    generate_max_images: int = 8
    generate_max_prompt_chars: int = 2000
    generate_max_adapters: int = 4
    generate_default_wait_s: float = 60.0
    generate_max_wait_s: float = 600.0
    # A waiting request is woken by a Redis notification; it re-reads SQL at least this often.
    generate_poll_s: float = Field(default=1.0, gt=0)
    # Batching (docs/inference.md): queued generation jobs of one shape share a pipeline call
    # whatever their adapters, up to generate_batch_max images and inference_slots distinct
    # adapter files; a worker waits up to generate_batch_wait_s after the oldest job was queued
    # for more jobs when the batch is not full (0: take what is queued now).
    generate_batch_max: int = Field(default=8, ge=1)
    generate_batch_wait_s: float = Field(default=0.0, ge=0, le=10)
    # POST /grids: cells (rows x columns) of one grid; a grid job counts as generation work
    # for the tenant quotas.
    grid_max_cells: int = Field(default=64, ge=1)
    # The OpenAI route answers within this (well under the SDK's 600 s timeout); an SDK retry
    # of the same request within openai_retry_window_s attaches to the first request's job.
    openai_wait_s: float = Field(default=120.0, gt=0)
    openai_retry_window_s: float = Field(default=900.0, gt=0)

    # Training admission by the dry-run plan, run for every POST /jobs by a resident planner:
    # a run whose plan needs more memory than the largest live training worker reports (or
    # train_max_memory_bytes, when set) or longer than train_max_duration_s is refused.
    train_admission: bool = True
    train_max_memory_bytes: int | None = Field(default=None, gt=0)
    train_max_duration_s: float | None = Field(default=72 * 3600.0, gt=0)
    train_planner_timeout_s: float = Field(default=120.0, gt=0)

    # Inference engine in each worker (adapter slots and cache tiers).
    inference_max_rank: int = 64
    # LoRA slots in each worker's engine: the most distinct adapters one pipeline call can mix
    # (at least generate_max_adapters are always there; see inference_slot_count).
    inference_slots: int = Field(default=8, ge=1)
    inference_device_cache_count: int = 64
    inference_cpu_cache_bytes: int = 2 * 1024**3
    inference_disk_cache_bytes: int = 20 * 1024**3
    inference_dtype: str = Field(default="auto", description="auto | fp32 | fp16 | bf16")

    # Evaluation of training runs (docs/evaluation.md): evaluator models by name (clip, dino)
    # -> hub id or local folder; unset = tiny random ones built in the data dir.
    evaluator_models: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description='JSON object {"clip": ..., "dino": ...}: hub ids or local folders',
    )
    experiment_max_runs: int = Field(
        default=16, ge=1, description="training runs one experiment may queue"
    )
    eval_batch_size: int = Field(default=8, ge=1, description="images per evaluation call")
    eval_cmmd_min_images: int = Field(
        default=4, ge=2, description="training images needed before CMMD is reported"
    )
    eval_max_reference_images: int = Field(
        default=64, ge=1, description="training images embedded for fidelity and CMMD"
    )

    # Limits.
    max_upload_bytes: int = Field(
        default=512 * 1024 * 1024, gt=0, description="cap on multipart/form-data uploads"
    )
    max_json_bytes: int = Field(
        default=1024 * 1024,
        gt=0,
        description="cap on every other request body (JSON), refused while it streams in",
    )
    dataset_limits: Annotated[dict[str, int | float], NoDecode] = Field(
        default_factory=dict,
        description='JSON object overriding dataset caps, e.g. {"max_entries": 1000}',
    )
    page_limit_max: int = 200

    @field_validator("base_models", "evaluator_models", mode="before")
    @classmethod
    def _parse_base_models(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as exc:
                raise ValueError(f"must be a JSON object name -> hub id or folder ({exc})") from exc
        return value

    @field_validator("dataset_limits", mode="before")
    @classmethod
    def _parse_dataset_limits(cls, value: Any) -> Any:

        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as exc:
                raise ValueError(f"must be a JSON object ({exc})") from exc
        known = set(DatasetLimits.__dataclass_fields__)
        unknown = sorted(set(value) - known) if isinstance(value, dict) else []
        if unknown:
            raise ValueError(f"unknown dataset limit(s) {unknown}; known: {sorted(known)}")
        return value

    def dataset_caps(self) -> DatasetLimits:
        """The dataset caps in force (max_upload_bytes comes from its own setting)."""

        caps: dict[str, Any] = {**self.dataset_limits, "max_upload_bytes": self.max_upload_bytes}
        return DatasetLimits(**caps)

    @field_validator("env")
    @classmethod
    def _check_env(cls, value: str) -> str:
        if value not in ("development", "production", "test"):
            raise ValueError("must be development, production or test")
        return value

    @property
    def inference_slot_count(self) -> int:
        """The engine's slot pool size: enough for any one request's adapters."""
        return max(self.inference_slots, self.generate_max_adapters)

    @staticmethod
    def quota_kind(kind: str) -> str:
        """The job kind whose quota settings a kind counts against (a grid is generation)."""
        return "generate" if kind == "grid" else kind

    def tenant_max_queued(self, kind: str) -> int | None:
        return {
            "train": self.tenant_max_queued_train,
            "generate": self.tenant_max_queued_generate,
            "grid": self.tenant_max_queued_generate,
        }.get(kind)

    def tenant_max_running(self, kind: str) -> int | None:
        return {
            "train": self.tenant_max_running_train,
            "generate": self.tenant_max_running_generate,
            "grid": self.tenant_max_running_generate,
        }.get(kind)

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return normalize_database_url(self.database_url)
        return f"sqlite:///{(self.data_dir / 'lorastack.db').resolve()}"

    @property
    def embedded_redis(self) -> bool:
        return not self.redis_url

    @property
    def embedded_redis_socket(self) -> Path:
        return (self.data_dir / "redis.sock").resolve()

    @property
    def broker_url(self) -> str:
        """The Redis URL in the form Celery (kombu) takes."""
        if self.redis_url:
            return self.redis_url
        return f"redis+socket://{self.embedded_redis_socket}"

    @property
    def redis_client_url(self) -> str:
        """The Redis URL in the form redis-py takes."""
        if self.redis_url:
            return self.redis_url.replace("redis+socket://", "unix://", 1)
        return f"unix://{self.embedded_redis_socket}"

    @property
    def resolved_artifact_dir(self) -> Path:
        return (self.artifact_dir or self.data_dir / "artifacts").resolve()

    @property
    def tiny_model_dir(self) -> Path:
        return (self.data_dir / "models" / TINY_MODEL_NAME).resolve()

    @property
    def model_sources(self) -> dict[str, str]:
        """Configured base models; with none configured, the embedded tiny model."""
        if self.base_models:
            return dict(self.base_models)
        return {TINY_MODEL_NAME: str(self.tiny_model_dir)}

    @property
    def tiny_evaluators_dir(self) -> Path:
        return (self.data_dir / "models" / "evaluators").resolve()

    @property
    def evaluator_sources(self) -> dict[str, str]:
        """Configured evaluator models; with none configured, the tiny ones in the data dir."""
        if self.evaluator_models:
            return dict(self.evaluator_models)
        return {name: str(self.tiny_evaluators_dir / name) for name in ("clip", "dino")}

    @property
    def default_base_model(self) -> str:
        return next(iter(self.model_sources))

    def check(self) -> None:
        """Refuse unsafe or contradictory settings (raises SettingsError)."""
        normalize_database_url(self.resolved_database_url)
        if self.env == "production" and not self.database_url:
            raise SettingsError("LORASTACK_DATABASE_URL must be set in production (no SQLite)")
        if self.env == "production" and not self.redis_url:
            raise SettingsError("LORASTACK_REDIS_URL must be set in production (no embedded Redis)")
        if self.redis_url and not self.redis_url.startswith(
            ("redis://", "rediss://", "redis+socket://", "unix://")
        ):
            raise SettingsError(f"LORASTACK_REDIS_URL: unsupported URL {self.redis_url!r}")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once."""
    return Settings()
