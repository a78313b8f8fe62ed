"""Following a job: its events as they come and its progress (step, loss, speed, ETA).

The sync and async ``jobs.wait`` drive the same :class:`JobWatch`; they differ only in how they
read (SSE stream, or pages of events when the stream is unavailable).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lorastack.client.errors import JobFailed
from lorastack.client.models import FINAL_STATUSES, Job, JobEvent

# A stream that fails this many times in a row gives way to polling.
STREAM_FAILURES_BEFORE_POLLING = 3
# Long enough to outlast the server's 15 s keep-alive comments.
STREAM_READ_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Progress:
    """Where a training job is: what `on_progress` receives and the CLI's bar shows."""

    job_id: str
    status: str
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    samples_per_s: float | None = None
    eta_s: float | None = None

    @property
    def fraction(self) -> float | None:
        if self.step is None or not self.total_steps:
            return None
        return min(self.step / self.total_steps, 1.0)

    @classmethod
    def of(cls, job_id: str, status: str, data: dict[str, Any]) -> Progress:
        def number(key: str) -> float | None:
            value = data.get(key)
            return float(value) if isinstance(value, int | float) else None

        step, total = number("step"), number("total_steps")
        return cls(
            job_id=job_id,
            status=status,
            step=int(step) if step is not None else None,
            total_steps=int(total) if total is not None else None,
            loss=number("loss"),
            samples_per_s=number("samples_per_s"),
            eta_s=number("eta_s"),
        )


ProgressCallback = Callable[[Progress], None]
EventCallback = Callable[[JobEvent], None]


class WaitTimeout(TimeoutError):
    """``jobs.wait(timeout=...)`` ran out before the job ended."""


class JobWatch:
    """The state of one follow: last event seen, last status and progress, the callbacks."""

    def __init__(
        self,
        job_id: str,
        *,
        on_progress: ProgressCallback | None,
        on_event: EventCallback | None,
        timeout: float | None,
    ) -> None:
        self.job_id = job_id
        self.on_progress = on_progress
        self.on_event = on_event
        self.last_seq = 0
        self.status = "queued"
        self.stream_failures = 0
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self._last_progress: Progress | None = None

    def feed(self, event: JobEvent) -> bool:
        """Take one event (in seq order, each once); True when it says the job ended."""
        if event.seq <= self.last_seq:
            return False
        self.last_seq = event.seq
        if self.on_event is not None:
            self.on_event(event)
        if event.type == "state" and isinstance(event.data.get("status"), str):
            self.status = event.data["status"]
            self._report(self._last_progress_data())
        elif event.type == "metrics":
            self._report(event.data)
        return self.status in FINAL_STATUSES

    def saw_job(self, job: Job) -> None:
        self.status = job.status
        if job.progress:
            self._report(job.progress)

    def check_deadline(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise WaitTimeout(f"job {self.job_id} still {self.status} when the wait timed out")

    def finish(self, job: Job, *, raise_on_failure: bool) -> Job:
        """The final job; raises :class:`JobFailed` for failed/cancelled when asked to."""
        self.saw_job(job)
        if raise_on_failure and job.status != "succeeded":
            raise JobFailed(job)
        return job

    def _last_progress_data(self) -> dict[str, Any]:
        last = self._last_progress
        if last is None:
            return {}
        return {
            "step": last.step,
            "total_steps": last.total_steps,
            "loss": last.loss,
            "samples_per_s": last.samples_per_s,
            "eta_s": last.eta_s,
        }

    def _report(self, data: dict[str, Any]) -> None:
        progress = Progress.of(self.job_id, self.status, data)
        if progress == self._last_progress:
            return
        self._last_progress = progress
        if self.on_progress is not None:
            self.on_progress(progress)
