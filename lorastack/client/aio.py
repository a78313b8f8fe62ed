"""The asynchronous client: ``AsyncClient`` has the surface of ``Client``, awaited.

It sends the same :mod:`~lorastack.client.calls` through an ``httpx.AsyncClient``.
"""

from __future__ import annotations

import asyncio
import base64
import os
from typing import Any

import httpx

from lorastack.client import calls, models
from lorastack.client.config import resolve
from lorastack.client.errors import ConnectionFailed
from lorastack.client.follow import (
    STREAM_FAILURES_BEFORE_POLLING,
    STREAM_READ_TIMEOUT_S,
    EventCallback,
    JobWatch,
    ProgressCallback,
)
from lorastack.client.images import GenerationResult, Image
from lorastack.client.sse import EventStreamParser
from lorastack.client.transfer import (
    Downloaded,
    DownloadWriter,
    TransferCallback,
    open_upload,
    resume_offset,
    target_path,
)
from lorastack.client.transport import AsyncTransport, RetryPolicy


class AsyncDatasets:
    """``client.datasets``: upload a folder or zip, list, read, delete."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport

    async def upload(
        self,
        path: str | os.PathLike[str],
        *,
        name: str,
        caption: str | None = None,
        trigger_word: str | None = None,
        on_progress: TransferCallback | None = None,
        idempotency_key: str | None = None,
    ) -> models.Dataset:
        """Upload a dataset zip, or a folder (zipped on the fly); answers it with its report."""
        upload = await asyncio.to_thread(open_upload, path)
        try:
            reader = upload.reader(on_progress)
            call = calls.create_dataset(
                name=name,
                files=lambda: {"file": (upload.filename, reader.rewind(), "application/zip")},
                caption=caption,
                trigger_word=trigger_word,
                idempotency_key=idempotency_key,
            )
            return await self._t.send(call)
        finally:
            upload.close()

    async def list(
        self, *, limit: int | None = None, after: str | None = None
    ) -> models.DatasetList:
        return await self._t.send(calls.list_datasets(limit=limit, after=after))

    async def get(self, dataset_id: str) -> models.Dataset:
        return await self._t.send(calls.get_dataset(dataset_id))

    async def thumbnail(self, dataset_id: str, index: int, *, size: int | None = None) -> bytes:
        """A JPEG thumbnail of the dataset's image ``index`` (longest side ``size`` pixels)."""
        return await self._t.send(calls.get_dataset_image(dataset_id, index, size=size))

    async def delete(self, dataset_id: str) -> None:
        await self._t.send(calls.delete_dataset(dataset_id))


class AsyncJobs:
    """``client.jobs``: start training, read, list, cancel, follow, checkpoints."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport

    async def create(
        self,
        dataset_id: str,
        adapter_name: str,
        *,
        base_model: str | None = None,
        hyperparameters: models.Hyperparameters | dict[str, Any] | None = None,
        dry_run: bool = False,
        idempotency_key: str | None = None,
        evaluation: models.Evaluation | dict[str, Any] | None = None,
        publish: str | None = None,
    ) -> models.Job | models.TrainingPlan:
        """Queue a training run (or, with ``dry_run``, answer its plan without queuing);
        ``evaluation`` scores its checkpoints (docs/evaluation.md)."""
        body = calls.train_request(
            dataset_id,
            adapter_name,
            base_model=base_model,
            hyperparameters=hyperparameters,
            dry_run=dry_run,
            evaluation=evaluation,
            publish=publish,
        )
        return await self._t.send(calls.create_job(body, idempotency_key=idempotency_key))

    async def get(self, job_id: str) -> models.Job:
        return await self._t.send(calls.get_job(job_id))

    async def list(
        self,
        *,
        kind: str | None = None,
        status: str | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> models.JobList:
        return await self._t.send(
            calls.list_jobs(limit=limit, after=after, kind=kind, status=status)
        )

    async def cancel(self, job_id: str) -> models.Job:
        return await self._t.send(calls.cancel_job(job_id))

    async def events(
        self, job_id: str, *, after: int = 0, limit: int | None = None
    ) -> models.JobEventList:
        return await self._t.send(calls.list_events(job_id, after=after, limit=limit))

    async def checkpoints(self, job_id: str) -> models.CheckpointList:
        return await self._t.send(calls.list_checkpoints(job_id))

    async def promote_checkpoint(self, job_id: str, step: int) -> models.PromotedVersion:
        """Publish a checkpoint as the adapter's next version (a repeat answers the same one)."""
        return await self._t.send(calls.promote_checkpoint(job_id, step))

    async def wait(
        self,
        job_id: str,
        *,
        on_progress: ProgressCallback | None = None,
        on_event: EventCallback | None = None,
        timeout: float | None = None,
        poll_interval: float = 1.0,
        stream: bool = True,
        raise_on_failure: bool = True,
    ) -> models.Job:
        """Follow a job until it ends, as ``Client.jobs.wait`` does; answers the final job."""
        watch = JobWatch(job_id, on_progress=on_progress, on_event=on_event, timeout=timeout)
        watch.saw_job(await self.get(job_id))
        while watch.status not in models.FINAL_STATUSES:
            if stream and watch.stream_failures < STREAM_FAILURES_BEFORE_POLLING:
                if not await self._follow_stream(watch):
                    await asyncio.sleep(min(poll_interval, 1.0))
            else:
                page = await self.events(job_id, after=watch.last_seq, limit=500)
                for event in page.data:
                    watch.feed(event)
                watch.saw_job(await self.get(job_id))
                if watch.status not in models.FINAL_STATUSES:
                    watch.check_deadline()
                    await asyncio.sleep(poll_interval)
            watch.check_deadline()
        return watch.finish(await self.get(job_id), raise_on_failure=raise_on_failure)

    async def _follow_stream(self, watch: JobWatch) -> bool:
        """Read the event stream until it ends; False when it failed."""
        call = calls.stream_events(
            watch.job_id, after=watch.last_seq, read_timeout_s=STREAM_READ_TIMEOUT_S
        )
        parser = EventStreamParser()
        try:
            async with self._t.open(call) as response:
                if "text/event-stream" not in response.headers.get("content-type", ""):
                    watch.stream_failures = STREAM_FAILURES_BEFORE_POLLING  # no SSE here: poll
                    return False
                async for line in response.aiter_lines():
                    sse = parser.feed(line)
                    if sse is not None and sse.data:
                        watch.feed(models.JobEvent.model_validate_json(sse.data))
                    watch.check_deadline()
        except (httpx.TransportError, ConnectionFailed):
            watch.stream_failures += 1
            return False
        watch.stream_failures = 0
        if watch.status not in models.FINAL_STATUSES:
            watch.saw_job(await self.get(watch.job_id))
        return True


class AsyncAdapters:
    """``client.adapters``: list, read, download, aliases, import, delete."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport

    async def list(
        self,
        *,
        base_model: str | None = None,
        prefix: str | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> models.AdapterList:
        return await self._t.send(
            calls.list_adapters(limit=limit, after=after, base_model=base_model, prefix=prefix)
        )

    async def get(self, name: str) -> models.Adapter:
        return await self._t.send(calls.get_adapter(name))

    async def version(self, name: str, version: str | int = "latest") -> models.AdapterVersion:
        return await self._t.send(calls.get_version(name, version))

    async def delete(self, name: str) -> None:
        await self._t.send(calls.delete_adapter(name))

    async def delete_version(self, name: str, version: str | int, *, force: bool = False) -> None:
        await self._t.send(calls.delete_version(name, version, force=force))

    async def set_alias(self, name: str, alias: str, version: int) -> models.Alias:
        return await self._t.send(calls.put_alias(name, alias, version))

    async def delete_alias(self, name: str, alias: str) -> None:
        await self._t.send(calls.delete_alias(name, alias))

    async def import_file(
        self,
        path: str | os.PathLike[str],
        *,
        name: str,
        base_model: str,
        idempotency_key: str | None = None,
    ) -> models.ImportedVersion:
        """Import a LoRA safetensors file (diffusers, peft or kohya) as the next version."""
        upload = open_upload(path)
        try:
            reader = upload.reader(None)
            call = calls.import_adapter(
                name=name,
                base_model=base_model,
                files=lambda: {
                    "file": (upload.filename, reader.rewind(), "application/octet-stream")
                },
                idempotency_key=idempotency_key,
            )
            return await self._t.send(call)
        finally:
            upload.close()

    async def download(
        self,
        name: str,
        version: str | int = "latest",
        *,
        format: str = "diffusers",
        path: str | os.PathLike[str] | None = None,
        on_progress: TransferCallback | None = None,
    ) -> Downloaded:
        """Download a version's file, resuming ``<path>.part`` with a Range request."""
        target = target_path(path, name=name, version=version, fmt=format)
        for _ in range(2):
            offset = resume_offset(target)
            call = calls.download_version(name, version, fmt=format, offset=offset)
            async with self._t.open(call) as response:
                writer = DownloadWriter(
                    target,
                    status=response.status_code,
                    headers=response.headers,
                    offset=offset,
                    on_progress=on_progress,
                )
                try:
                    async for chunk in response.aiter_bytes():
                        writer.write(chunk)
                finally:
                    writer.close()
            done = writer.complete()
            if done is not None:
                return done
        raise ConnectionFailed(f"download of {name}@{version} did not match its ETag twice")


class AsyncExperiments:
    """Grids of training runs and their comparison (docs/evaluation.md#experiments)."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport

    async def create(
        self,
        body: models.ExperimentCreate | dict[str, Any],
        *,
        idempotency_key: str | None = None,
    ) -> models.Experiment:
        request = (
            body if isinstance(body, models.ExperimentCreate) else models.ExperimentCreate(**body)
        )
        return await self._t.send(calls.create_experiment(request, idempotency_key=idempotency_key))

    async def list(
        self, *, limit: int | None = None, after: str | None = None
    ) -> models.ExperimentList:
        """The caller's experiments, newest first; ``after``: the last id of the page before."""
        return await self._t.send(calls.list_experiments(limit=limit, after=after))

    async def get(self, experiment_id: str) -> models.Experiment:
        return await self._t.send(calls.get_experiment(experiment_id))

    async def report(self, experiment_id: str, *, format: str = "md") -> str:
        return await self._t.send(calls.experiment_report(experiment_id, format=format))


class AsyncClient:
    """The asynchronous lorastack API client; see :class:`lorastack.Client`."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout = 60.0,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        credentials = resolve(url, api_key)
        self.url = credentials.url
        self._t = AsyncTransport(
            base_url=credentials.url,
            api_key=credentials.api_key,
            timeout=timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout),
            policy=RetryPolicy(max_retries=max_retries, backoff_s=backoff_s),
            http=http,
        )
        self.datasets = AsyncDatasets(self._t)
        self.jobs = AsyncJobs(self._t)
        self.adapters = AsyncAdapters(self._t)
        self.experiments = AsyncExperiments(self._t)

    async def grid(
        self, body: models.GridCreate | dict[str, Any], *, idempotency_key: str | None = None
    ) -> models.Grid | models.Job:
        """A labeled image grid: the grid when done within ``wait``, else its job."""
        request = body if isinstance(body, models.GridCreate) else models.GridCreate(**body)
        return await self._t.send(calls.create_grid(request, idempotency_key=idempotency_key))

    async def generate(
        self,
        prompt: str,
        *,
        adapters: list[calls.AdapterSpec] | None = None,
        negative_prompt: str | None = None,
        base_model: str | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        width: int | None = None,
        height: int | None = None,
        seed: int | None = None,
        num_images: int | None = None,
        scheduler: str | None = None,
        wait: float | None = None,
        idempotency_key: str | None = None,
    ) -> GenerationResult:
        """Generate images, as ``Client.generate`` does."""
        body = calls.generate_request(
            prompt,
            adapters=adapters,
            negative_prompt=negative_prompt,
            base_model=base_model,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            width=width,
            height=height,
            seed=seed,
            num_images=num_images,
            scheduler=scheduler,
            wait=wait,
        )
        call = calls.generate(body, idempotency_key=idempotency_key)
        answer = await self._t.send(call)
        if isinstance(answer, models.Job):
            await self.jobs.wait(answer.id)
            answer = await self._t.send(call)
        if isinstance(answer, models.Job):
            raise ConnectionFailed(f"generation job {answer.id} ended but answered no images")
        images = [await self._image(info) for info in answer.images]
        return GenerationResult(generation=answer, images=images)

    async def _image(self, info: models.ImageInfo) -> Image:
        if info.b64_json is not None:
            return Image(info=info, data=base64.b64decode(info.b64_json))
        return Image(info=info, data=await self.image(info.id))

    async def image(self, image_id: str) -> bytes:
        """A generated image's PNG bytes."""
        return await self._t.send(calls.get_image(image_id))

    async def workers(self) -> models.WorkerList:
        return await self._t.send(calls.list_workers())

    async def ping(self, *, queue: str = "generate", wait: float = 10) -> models.Job:
        """Send a trivial task through the queue to a worker and back; answers the ping job."""
        return await self._t.send(calls.ping(queue=queue, wait=wait))

    async def ready(self) -> dict[str, Any]:
        return await self._t.send(calls.readiness())

    async def aclose(self) -> None:
        await self._t.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
