"""The experiment request and its comparison table, as the API shows them."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.jobs.training_schemas import Evaluation, Hyperparameters
from service.registry import ADAPTER_NAME_PATTERN

GridValue = str | int | float | bool | list[str] | None


class ExperimentCreate(BaseModel):
    """A training job's fields plus ``grid``: one run per combination of the grid's values."""

    model_config = ConfigDict(extra="forbid")

    dataset_id: str = Field(max_length=40)
    adapter_name: str = Field(
        pattern=ADAPTER_NAME_PATTERN,
        max_length=90,
        description="prefix: run i trains the adapter '<adapter_name>-<i>'",
    )
    base_model: str | None = Field(None, description="a configured base model; default first")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    evaluation: Evaluation | None = Field(None, description="scores every run's checkpoints")
    publish: Literal["final", "best"] = "final"
    grid: dict[str, list[GridValue]] = Field(
        min_length=1,
        description='hyperparameter -> values, e.g. {"rank": [8, 32]}: one run per combination',
    )

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentCreate:
        unknown = sorted(set(self.grid) - set(Hyperparameters.model_fields))
        if unknown:
            raise ValueError(f"grid: unknown hyperparameters {unknown}")
        empty = sorted(name for name, values in self.grid.items() if not values)
        if empty:
            raise ValueError(f"grid: no values for {empty}")
        if self.publish == "best" and self.evaluation is None:
            raise ValueError("publish 'best' needs an evaluation to pick the best checkpoint")
        return self


class ExperimentRun(BaseModel):
    """One run: its parameters, its job's outcome, and the metrics of its best checkpoint."""

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
    metrics: dict[str, float] = Field(description="aggregates of the best checkpoint")


class ExperimentOut(BaseModel):
    id: str
    status: str = Field(description="queued | running | succeeded | failed | cancelled")
    dataset_id: str | None
    base_model: str
    adapter_name: str
    grid: dict[str, list[Any]]
    select: dict[str, str] | None
    runs: list[ExperimentRun]
    best_run: int | None = Field(None, description="index of the best run by select")
    created_at: datetime


class ExperimentList(BaseModel):
    data: list[ExperimentOut]
    has_more: bool
