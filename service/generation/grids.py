"""POST /grids: one labeled PNG of cells over two axes (A1111's X/Y plot). The request is
resolved here into a grid job (``GridParams``: every cell's prompt, seed and adapter versions);
a generation worker renders the cells in batches and composes the image."""

from __future__ import annotations

import secrets
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy.orm import Session

from service import dispatch, lifecycle
from service.base_models import local_folder, native_size, resolve_base_model
from service.config import Settings
from service.errors import ServiceError, field_error
from service.generation.schemas import SchedulerName
from service.generation.service import resolve_adapter_use
from service.job_params import AdapterUse, GridCell, GridParams
from service.models import Job, JobKind
from service.queue import GENERATE_QUEUE
from service.storage import ArtifactStore

AxisName = Literal["prompt", "seed", "adapter", "weight"]
AxisValue = Annotated[str, Field(min_length=1, max_length=2000)] | int | float | None


class GridAxis(BaseModel):
    """The values one axis walks through: prompts, seeds, adapter refs (null = the base
    model) or adapter weights."""

    model_config = ConfigDict(extra="forbid")

    axis: AxisName
    values: list[AxisValue] = Field(min_length=1, max_length=16)

    @model_validator(mode="after")
    def _typed(self) -> GridAxis:
        for value in self.values:
            kind = {
                "prompt": isinstance(value, str),
                "seed": isinstance(value, int)
                and not isinstance(value, bool)
                and 0 <= value < 2**63,
                "adapter": value is None or isinstance(value, str),
                "weight": isinstance(value, int | float)
                and not isinstance(value, bool)
                and -4.0 <= float(value) <= 4.0,
            }[self.axis]
            if not kind:
                expected = {
                    "prompt": "non-empty strings",
                    "seed": "integers from 0 to 2**63 - 1",
                    "adapter": "adapter refs or null (the base model)",
                    "weight": "numbers from -4 to 4",
                }[self.axis]
                raise ValueError(f"{self.axis} values must be {expected}, not {value!r}")
        return self


class GridCreate(BaseModel):
    """What every cell shares, and the axes: ``x`` (columns) and optional ``y`` (rows)."""

    model_config = ConfigDict(extra="forbid")

    x: GridAxis
    y: GridAxis | None = None
    prompt: str | None = Field(None, min_length=1, description="unless an axis is prompt")
    negative_prompt: str | None = None
    adapter: str | None = Field(None, description="adapter ref of every cell, unless an axis is")
    weight: float = Field(1.0, ge=-4.0, le=4.0, description="its weight, unless an axis is")
    seed: int | None = Field(None, ge=0, lt=2**63, description="unless an axis is; random")
    base_model: str | None = None
    num_inference_steps: int = Field(20, ge=1)
    guidance_scale: float = Field(7.5, ge=0.0, le=50.0)
    width: int | None = Field(None, ge=8, multiple_of=8, description="default: model native")
    height: int | None = Field(None, ge=8, multiple_of=8, description="default: model native")
    scheduler: SchedulerName = "pndm"
    wait: float = Field(0.0, ge=0, le=600, description="seconds to wait for the grid")

    @model_validator(mode="after")
    def _axes(self) -> GridCreate:
        axes = [self.x.axis] + ([self.y.axis] if self.y else [])
        if len(set(axes)) != len(axes):
            raise ValueError("x and y must be different axes")
        if "prompt" not in axes and not self.prompt:
            raise ValueError("prompt is required unless an axis is prompt")
        if "weight" in axes and "adapter" not in axes and self.adapter is None:
            raise ValueError("a weight axis needs an adapter (or an adapter axis)")
        return self


class GridOut(BaseModel):
    """A grid job's answer (``status`` succeeded: the image, its cells and layout)."""

    job_id: str
    status: str
    image_id: str | None = None
    url: str | None = None
    rows: list[str]
    columns: list[str]
    cells: list[list[dict[str, Any]]] = Field(description="rows of cells: image_id, prompt, seed")
    layout: dict[str, int] | None = None


def _label(axis: str, value: Any) -> str:
    if axis == "prompt":
        return str(value)
    if axis == "seed":
        return f"seed {value}"
    if axis == "adapter":
        return "base" if value is None else str(value)
    return f"weight {float(value):g}"


def create_grid_job(
    session: Session,
    *,
    settings: Settings,
    store: ArtifactStore,
    tenant_id: str,
    body: GridCreate,
) -> Job:
    """Validate (limits, adapters, base model), resolve every cell and queue the grid job."""
    base_model, source = resolve_base_model(settings, body.base_model)
    folder = local_folder(source)
    side = (native_size(folder) if folder else None) or 512
    width, height = body.width or side, body.height or side
    y_values: list[Any] = body.y.values if body.y else [None]
    cells_count = len(body.x.values) * len(y_values)
    prompts = [body.prompt or "", body.negative_prompt or ""]
    for axis in (body.x, body.y):
        if axis is not None and axis.axis == "prompt":
            prompts += [str(v) for v in axis.values]
    max_side = int(side * settings.generate_max_side_factor)
    checks: list[tuple[str, int, int, str]] = [
        ("x", cells_count, settings.grid_max_cells, "grid_max_cells"),
        (
            "num_inference_steps",
            body.num_inference_steps,
            settings.generate_max_steps,
            "generate_max_steps",
        ),
        ("width", width, max_side, "generate_max_side_factor"),
        ("height", height, max_side, "generate_max_side_factor"),
        (
            "prompt",
            max(len(p) for p in prompts),
            settings.generate_max_prompt_chars,
            "generate_max_prompt_chars",
        ),
    ]
    for field, value, limit, setting in checks:
        if value > limit:
            raise field_error(
                field,
                f"{value} is over the limit {limit} (LORASTACK_{setting.upper()})",
                code="limit_exceeded",
            )
    seed = body.seed if body.seed is not None else secrets.randbelow(2**32)
    uses: dict[tuple[str, float], AdapterUse] = {}

    def adapters_of(ref: str | None, weight: float, field: str) -> list[AdapterUse]:
        if ref is None:
            return []
        if (ref, weight) not in uses:
            try:
                resolved = resolve_adapter_use(
                    session, store=store, tenant_id=tenant_id, ref=ref, weight=weight
                )
            except ServiceError as exc:
                raise field_error(field, exc.detail, code=exc.code) from None
            if resolved.base_model != base_model:
                raise field_error(
                    field,
                    f"{ref!r} belongs to base model {resolved.base_model!r}, not {base_model!r}",
                    code="base_model_mismatch",
                )
            uses[(ref, weight)] = resolved.adapter
        return [uses[(ref, weight)]]

    rows: list[list[GridCell]] = []
    for r, y_value in enumerate(y_values):
        row = []
        for c, x_value in enumerate(body.x.values):
            chosen: dict[str, Any] = {body.x.axis: x_value}
            where = {body.x.axis: f"x.values.{c}"}
            if body.y:
                chosen[body.y.axis] = y_value
                where[body.y.axis] = f"y.values.{r}"
            ref = chosen.get("adapter", body.adapter)
            weight = float(chosen["weight"]) if "weight" in chosen else body.weight
            row.append(
                GridCell(
                    prompt=str(chosen.get("prompt", body.prompt)),
                    seed=int(chosen.get("seed", seed)),
                    adapters=adapters_of(ref, weight, where.get("adapter", "adapter")),
                )
            )
        rows.append(row)
    params = GridParams(
        negative_prompt=body.negative_prompt,
        num_inference_steps=body.num_inference_steps,
        guidance_scale=body.guidance_scale,
        width=width,
        height=height,
        scheduler=body.scheduler,
        x_axis=body.x.axis,
        y_axis=body.y.axis if body.y else None,
        columns=[_label(body.x.axis, v) for v in body.x.values],
        rows=[_label(body.y.axis, v) for v in body.y.values] if body.y else [""],
        cells=rows,
    )
    dispatch.check_queued_quota(
        session, settings=settings, tenant_id=tenant_id, kind=JobKind.GRID.value
    )
    return lifecycle.create_job(
        session,
        tenant_id=tenant_id,
        kind=JobKind.GRID.value,
        queue=GENERATE_QUEUE,
        max_attempts=settings.job_max_attempts,
        base_model=base_model,
        params=params.to_json(),
    )


def grid_answer(job: Job, *, base_url: str) -> GridOut:
    params = GridParams.model_validate(job.params)
    result = job.result or {}
    image_id = result.get("image_id")
    return GridOut(
        job_id=job.id,
        status=job.status,
        image_id=image_id,
        url=f"{base_url}images/{image_id}" if image_id else None,
        rows=params.rows,
        columns=params.columns,
        cells=result.get("cells", []),
        layout=result.get("layout"),
    )
