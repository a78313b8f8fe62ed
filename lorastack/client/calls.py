"""The requests the client sends, built once and shared by the sync and the async client.

Each API operation is a function returning a :class:`Call`: method, path, query, body, headers
and how to read the answer. A transport (``transport.py``) sends it, retrying when that is safe,
so the synchronous and asynchronous resources are one line each and cannot disagree.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from lorastack.client import models

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

# Methods whose repeat has the effect of one request (RFC 9110 9.2.2).
_IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})


@dataclass
class Call(Generic[T]):
    """One API request and the reader of its answer."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: Mapping[str, Any] | None = None
    json: Any = None
    data: Mapping[str, Any] | None = None
    # A fresh multipart `files` mapping for each attempt (a retry re-reads the file from 0).
    files: Callable[[], Mapping[str, Any]] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    # POSTs that carry an Idempotency-Key, or that are idempotent by nature, may be resent.
    idempotent_post: bool = False
    # Overrides the client's timeout (the event stream waits longer between lines).
    timeout: httpx.Timeout | None = None

    @property
    def retry_safe(self) -> bool:
        """Whether resending after a dropped connection cannot do the work twice."""
        return self.method in _IDEMPOTENT_METHODS or self.idempotent_post


def segment(value: str | int) -> str:
    """A path segment, percent-encoded (names may hold characters a URL reserves)."""
    return quote(str(value), safe="")


def model(cls: type[M]) -> Callable[[httpx.Response], M]:
    """Read a JSON answer as ``cls``."""
    return lambda response: cls.model_validate_json(response.content)


def nothing(response: httpx.Response) -> None:
    """For 204 answers."""
    return None


def creating(headers: dict[str, str] | None, key: str | None) -> dict[str, str]:
    """Headers for a POST that creates: an Idempotency-Key (given or new) so retries are safe."""
    return {**(headers or {}), "Idempotency-Key": key or str(uuid.uuid4())}


def paging(limit: int | None, after: str | None, **filters: Any) -> dict[str, Any]:
    params = {"limit": limit, "after": after, **filters}
    return {k: v for k, v in params.items() if v is not None}


# -- datasets ---------------------------------------------------------------------------------


def list_datasets(*, limit: int | None, after: str | None) -> Call[models.DatasetList]:
    return Call("GET", "/datasets", model(models.DatasetList), params=paging(limit, after))


def get_dataset(dataset_id: str) -> Call[models.Dataset]:
    return Call("GET", f"/datasets/{segment(dataset_id)}", model(models.Dataset))


def get_dataset_image(dataset_id: str, index: int, *, size: int | None) -> Call[bytes]:
    return Call(
        "GET",
        f"/datasets/{segment(dataset_id)}/images/{int(index)}",
        lambda response: response.content,
        params={"size": size} if size is not None else None,
    )


def delete_dataset(dataset_id: str) -> Call[None]:
    return Call("DELETE", f"/datasets/{segment(dataset_id)}", nothing)


def create_dataset(
    *,
    name: str,
    files: Callable[[], Mapping[str, Any]],
    caption: str | None,
    trigger_word: str | None,
    idempotency_key: str | None,
) -> Call[models.Dataset]:
    form = {"name": name, "caption": caption, "trigger_word": trigger_word}
    return Call(
        "POST",
        "/datasets",
        model(models.Dataset),
        data={k: v for k, v in form.items() if v is not None},
        files=files,
        headers=creating(None, idempotency_key),
        idempotent_post=True,
    )


# -- jobs -------------------------------------------------------------------------------------


def _job_or_plan(response: httpx.Response) -> models.Job | models.TrainingPlan:
    if response.json().get("dry_run"):
        return models.TrainingPlan.model_validate_json(response.content)
    return models.Job.model_validate_json(response.content)


def create_job(
    body: models.TrainJobCreate, *, idempotency_key: str | None
) -> Call[models.Job | models.TrainingPlan]:
    return Call(
        "POST",
        "/jobs",
        _job_or_plan,
        json=body.body(),
        headers=creating(None, idempotency_key),
        idempotent_post=True,
    )


def list_jobs(
    *, limit: int | None, after: str | None, kind: str | None, status: str | None
) -> Call[models.JobList]:
    return Call(
        "GET",
        "/jobs",
        model(models.JobList),
        params=paging(limit, after, kind=kind, status=status),
    )


def get_job(job_id: str) -> Call[models.Job]:
    return Call("GET", f"/jobs/{segment(job_id)}", model(models.Job))


def cancel_job(job_id: str) -> Call[models.Job]:
    # Asking twice to cancel is asking once.
    return Call("POST", f"/jobs/{segment(job_id)}/cancel", model(models.Job), idempotent_post=True)


def list_events(job_id: str, *, after: int, limit: int | None) -> Call[models.JobEventList]:
    return Call(
        "GET",
        f"/jobs/{segment(job_id)}/events",
        model(models.JobEventList),
        params={"after": after, **({"limit": limit} if limit is not None else {})},
    )


def stream_events(job_id: str, *, after: int, read_timeout_s: float) -> Call[None]:
    """The SSE stream of a job's events after ``after`` (read by the caller, not parsed)."""
    return Call(
        "GET",
        f"/jobs/{segment(job_id)}/events",
        nothing,
        params={"after": after},
        headers={"Accept": "text/event-stream", "Last-Event-ID": str(after)},
        timeout=httpx.Timeout(10.0, read=read_timeout_s),
    )


def list_checkpoints(job_id: str) -> Call[models.CheckpointList]:
    return Call("GET", f"/jobs/{segment(job_id)}/checkpoints", model(models.CheckpointList))


def promote_checkpoint(job_id: str, step: int) -> Call[models.PromotedVersion]:
    # The server answers the first promotion's version to a repeat: safe to resend.
    return Call(
        "POST",
        f"/jobs/{segment(job_id)}/checkpoints/{int(step)}/promote",
        model(models.PromotedVersion),
        idempotent_post=True,
    )


# -- adapters ---------------------------------------------------------------------------------


def list_adapters(
    *, limit: int | None, after: str | None, base_model: str | None, prefix: str | None
) -> Call[models.AdapterList]:
    return Call(
        "GET",
        "/adapters",
        model(models.AdapterList),
        params=paging(limit, after, base_model=base_model, prefix=prefix),
    )


def get_adapter(name: str) -> Call[models.Adapter]:
    return Call("GET", f"/adapters/{segment(name)}", model(models.Adapter))


def delete_adapter(name: str) -> Call[None]:
    return Call("DELETE", f"/adapters/{segment(name)}", nothing)


def get_version(name: str, version: str | int) -> Call[models.AdapterVersion]:
    return Call(
        "GET",
        f"/adapters/{segment(name)}/versions/{segment(version)}",
        model(models.AdapterVersion),
    )


def delete_version(name: str, version: str | int, *, force: bool) -> Call[None]:
    return Call(
        "DELETE",
        f"/adapters/{segment(name)}/versions/{segment(version)}",
        nothing,
        params={"force": "true"} if force else None,
    )


def download_version(
    name: str, version: str | int, *, fmt: str, offset: int, etag: str | None = None
) -> Call[None]:
    """The file's bytes from ``offset`` on (a Range request when resuming)."""
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    if offset and etag:
        headers["If-Range"] = etag
    return Call(
        "GET",
        f"/adapters/{segment(name)}/versions/{segment(version)}/download",
        nothing,
        params={"format": fmt},
        headers=headers,
    )


def put_alias(name: str, alias: str, version: int) -> Call[models.Alias]:
    return Call(
        "PUT",
        f"/adapters/{segment(name)}/aliases/{segment(alias)}",
        model(models.Alias),
        json=models.AliasPut(version=version).body(),
    )


def delete_alias(name: str, alias: str) -> Call[None]:
    return Call("DELETE", f"/adapters/{segment(name)}/aliases/{segment(alias)}", nothing)


def import_adapter(
    *,
    name: str,
    base_model: str,
    files: Callable[[], Mapping[str, Any]],
    idempotency_key: str | None,
) -> Call[models.ImportedVersion]:
    return Call(
        "POST",
        "/adapters/import",
        model(models.ImportedVersion),
        data={"name": name, "base_model": base_model},
        files=files,
        headers=creating(None, idempotency_key),
        idempotent_post=True,
    )


# -- generation and workers -------------------------------------------------------------------


def _generation_or_job(response: httpx.Response) -> models.Generation | models.Job:
    if response.status_code == 202:
        return models.Job.model_validate_json(response.content)
    return models.Generation.model_validate_json(response.content)


def generate(
    body: models.GenerateRequest, *, idempotency_key: str | None
) -> Call[models.Generation | models.Job]:
    return Call(
        "POST",
        "/generate",
        _generation_or_job,
        json=body.body(),
        headers=creating(None, idempotency_key),
        idempotent_post=True,
    )


def _grid_or_job(response: httpx.Response) -> models.Grid | models.Job:
    if response.status_code == 202:
        return models.Job.model_validate_json(response.content)
    return models.Grid.model_validate_json(response.content)


def create_grid(
    body: models.GridCreate, *, idempotency_key: str | None
) -> Call[models.Grid | models.Job]:
    return Call(
        "POST",
        "/grids",
        _grid_or_job,
        json=body.body(),
        headers=creating(None, idempotency_key),
        idempotent_post=True,
    )


# -- experiments ------------------------------------------------------------------------------


def create_experiment(
    body: models.ExperimentCreate, *, idempotency_key: str | None
) -> Call[models.Experiment]:
    return Call(
        "POST",
        "/experiments",
        model(models.Experiment),
        json=body.body(),
        headers=creating(None, idempotency_key),
        idempotent_post=True,
    )


def list_experiments(*, limit: int | None, after: str | None) -> Call[models.ExperimentList]:
    return Call("GET", "/experiments", model(models.ExperimentList), params=paging(limit, after))


def get_experiment(experiment_id: str) -> Call[models.Experiment]:
    return Call("GET", f"/experiments/{segment(experiment_id)}", model(models.Experiment))


def experiment_report(experiment_id: str, *, format: str) -> Call[str]:
    return Call(
        "GET",
        f"/experiments/{segment(experiment_id)}/report",
        lambda response: response.text,
        params={"format": format},
    )


def get_image(image_id: str) -> Call[bytes]:
    return Call("GET", f"/images/{segment(image_id)}", lambda response: response.content)


def list_workers() -> Call[models.WorkerList]:
    return Call("GET", "/workers", model(models.WorkerList))


def ping(*, queue: str, wait: float) -> Call[models.Job]:
    """A trivial job through the queue to a worker and back (a retry sends another: harmless)."""
    return Call("POST", "/ping", model(models.Job), params={"queue": queue, "wait": wait})


def readiness() -> Call[dict[str, Any]]:
    return Call("GET", "/readyz", lambda response: dict(response.json()))


AdapterSpec = str | tuple[str, float] | models.AdapterWeight
"""An adapter to generate with: ``"name"``, ``"name@3"``, ``("name@prod", 0.8)`` or a model."""


def adapter_weight(spec: AdapterSpec) -> models.AdapterWeight:
    if isinstance(spec, models.AdapterWeight):
        return spec
    if isinstance(spec, str):
        return models.AdapterWeight(ref=spec)
    ref, weight = spec
    return models.AdapterWeight(ref=ref, weight=weight)


def generate_request(
    prompt: str, *, adapters: list[AdapterSpec] | None, **options: Any
) -> models.GenerateRequest:
    """The /generate body, asking for the images inline (one round trip, no image URLs)."""
    fields = {k: v for k, v in options.items() if v is not None}
    if adapters:
        fields["adapters"] = [adapter_weight(a) for a in adapters]
    fields.setdefault("response_format", "b64_json")
    return models.GenerateRequest(prompt=prompt, **fields)


def train_request(
    dataset_id: str,
    adapter_name: str,
    *,
    base_model: str | None,
    hyperparameters: models.Hyperparameters | dict[str, Any] | None,
    dry_run: bool,
    evaluation: models.Evaluation | dict[str, Any] | None = None,
    publish: str | None = None,
) -> models.TrainJobCreate:
    hp = (
        hyperparameters
        if isinstance(hyperparameters, models.Hyperparameters)
        else models.Hyperparameters(**(hyperparameters or {}))
    )
    fields: dict[str, Any] = {"dataset_id": dataset_id, "adapter_name": adapter_name}
    if base_model is not None:
        fields["base_model"] = base_model
    if dry_run:
        fields["dry_run"] = True
    if evaluation is not None:
        fields["evaluation"] = (
            evaluation
            if isinstance(evaluation, models.Evaluation)
            else models.Evaluation(**evaluation)
        )
    if publish is not None:
        fields["publish"] = publish
    return models.TrainJobCreate(hyperparameters=hp, **fields)
