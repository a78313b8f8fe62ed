"""What the remote commands print: tables, records, transfer bars and the live job view.

Results go to stdout; bars, questions and errors go to stderr, so ``--json`` output and pipes
stay clean. Bars are drawn only on a terminal.
"""

from __future__ import annotations

import contextlib
import getpass
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from lorastack.client import models
from lorastack.client.follow import Progress as JobProgress
from lorastack.client.transfer import TransferCallback

out = Console(highlight=False, soft_wrap=True)
errc = Console(stderr=True, highlight=False, soft_wrap=True)


def err(message: str) -> None:
    errc.print(message, markup=False)


def ask_secret(prompt: str) -> str:
    return getpass.getpass(prompt)


def confirm(question: str) -> bool:
    """Ask yes/no on the terminal; False (no) when stdin is not one."""
    if not sys.stdin.isatty():
        return False
    errc.print(question, end="", markup=False)  # stderr: stdout may be --json output
    try:
        return sys.stdin.readline().strip().lower() in {"y", "yes"}
    except KeyboardInterrupt:
        return False


@contextlib.contextmanager
def transfer(label: str, *, quiet: bool) -> Iterator[TransferCallback | None]:
    """A byte-count bar for an upload or download (on a terminal, without --json)."""
    if quiet or not errc.is_terminal:
        yield None
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=errc,
        transient=True,
    )
    task = bar.add_task(label, total=None)

    def on_progress(done: int, total: int | None) -> None:
        bar.update(task, completed=done, total=total)

    with bar:
        yield on_progress


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-:--"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def event_line(event: models.JobEvent) -> str:
    data = event.data
    if event.type == "metrics":
        body = (
            f"step {data.get('step')}/{data.get('total_steps')} loss {data.get('loss')} "
            f"eta {_duration(data.get('eta_s'))}"
        )
    elif event.type == "state":
        body = f"status {data.get('status')}"
    elif event.type == "message":
        body = str(data.get("message", data))
    else:
        body = " ".join(f"{k}={v}" for k, v in data.items())
    return f"{event.created_at:%H:%M:%S} {event.level:<7} {event.type:<10} {body}"


class JobView:
    """The live view of a followed job: a progress bar (step/total, loss, it/s, ETA) with the
    latest events below it. Off a terminal it prints the events as lines instead."""

    def __init__(self, job_id: str, *, quiet: bool, keep_events: int = 8) -> None:
        self.job_id = job_id
        self.quiet = quiet
        self.live_mode = not quiet and errc.is_terminal
        self.events: deque[str] = deque(maxlen=keep_events)
        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed:.0f}/{task.fields[total_text]}"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]} it/s"),
            TextColumn("ETA {task.fields[eta]}"),
        )
        self._task = self._bar.add_task(
            job_id, total=None, loss="-", rate="-", eta="-:--", total_text="?"
        )
        self._live: Live | None = None
        self._last: tuple[float, int] | None = None

    def __enter__(self) -> JobView:
        if self.live_mode:
            self._live = Live(self._render(), console=errc, refresh_per_second=4)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.__exit__(None, None, None)
            self._live = None

    def _render(self) -> Group:
        return Group(self._bar.get_renderable(), Text("\n".join(self.events), style="dim"))

    def progress(self, progress: JobProgress) -> None:
        rate = "-"
        now = time.monotonic()
        if progress.step is not None:
            if self._last is not None and progress.step > self._last[1] and now > self._last[0]:
                rate = f"{(progress.step - self._last[1]) / (now - self._last[0]):.2f}"
            self._last = (now, progress.step)
        fields: dict[str, Any] = {
            "description": f"{self.job_id} {progress.status}",
            "eta": _duration(progress.eta_s),
        }
        if progress.loss is not None:
            fields["loss"] = f"{progress.loss:.4f}"
        if rate != "-":
            fields["rate"] = rate
        if progress.total_steps:
            fields["total"] = progress.total_steps
            fields["total_text"] = str(progress.total_steps)
        if progress.step is not None:
            fields["completed"] = progress.step
        self._bar.update(self._task, **fields)
        if self._live is not None:
            self._live.update(self._render())

    def event(self, event: models.JobEvent) -> None:
        line = event_line(event)
        if self._live is not None:
            self.events.append(line)
            self._live.update(self._render())
        elif not self.quiet:
            print(line, flush=True)


# -- records and tables -----------------------------------------------------------------------


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    if not rows:
        out.print("(none)")
        return
    table = Table(*columns, box=None, pad_edge=False, header_style="bold")
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    out.print(table)


def _record(pairs: Sequence[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in pairs)
    for key, value in pairs:
        out.print(f"{key:<{width}}  {'' if value is None else value}", markup=False)


def datasets(rows: Sequence[models.DatasetSummary]) -> None:
    _table(
        ["ID", "NAME", "STATUS", "IMAGES", "CAPTIONS", "CREATED"],
        [
            (
                d.id,
                d.name,
                d.status,
                d.image_count,
                d.caption_count,
                f"{d.created_at:%Y-%m-%d %H:%M}",
            )
            for d in rows
        ],
    )


def dataset(d: models.Dataset) -> None:
    _record(
        [
            ("id", d.id),
            ("name", d.name),
            ("status", d.status),
            ("layout", d.layout),
            ("images", d.image_count),
            ("captions", d.caption_count),
            ("pairs", d.pair_count),
            ("bytes", d.total_bytes),
            ("sha256", d.sha256),
            ("warnings", len(d.report.get("warnings", []) or [])),
        ]
    )


def created(value: models.Job | models.TrainingPlan) -> None:
    if isinstance(value, models.TrainingPlan):
        _record(
            [
                ("base model", value.base_model),
                ("total steps", value.total_steps),
                ("trainable params", value.trainable_params),
                ("adapter file bytes", value.adapter_file_bytes),
                ("peak memory bytes", value.peak_memory_bytes),
                ("estimated seconds", value.estimated_duration_s),
            ]
        )
    else:
        job(value)


def job(j: models.Job) -> None:
    p = j.progress
    pairs: list[tuple[str, Any]] = [
        ("id", j.id),
        ("kind", j.kind),
        ("status", j.status),
        ("adapter", j.adapter_name),
        ("dataset", j.dataset_id),
        ("base model", j.base_model),
    ]
    if j.queue_position is not None:
        pairs.append(("queue position", j.queue_position))
    if p:
        pairs.append(
            ("progress", f"step {p.get('step')}/{p.get('total_steps')} loss {p.get('loss')}")
        )
    if j.error is not None:
        pairs.append(("error", f"{j.error.code}: {j.error.message}"))
    if j.result:
        adapter = j.result.get("adapter") or j.result.get("adapter_name")
        version = j.result.get("version")
        pairs.append(("result", f"{adapter} version {version}" if version else j.result))
    _record(pairs)


def jobs(rows: Sequence[models.Job]) -> None:
    _table(
        ["ID", "KIND", "STATUS", "ADAPTER", "STEP", "CREATED"],
        [
            (
                j.id,
                j.kind,
                j.status,
                j.adapter_name,
                f"{j.progress.get('step')}/{j.progress.get('total_steps')}" if j.progress else "",
                f"{j.created_at:%Y-%m-%d %H:%M}",
            )
            for j in rows
        ],
    )


def adapters(rows: Sequence[models.AdapterSummary]) -> None:
    _table(
        ["NAME", "BASE MODEL", "VERSIONS", "LATEST", "ALIASES"],
        [
            (
                a.name,
                a.base_model,
                a.version_count,
                a.latest_version,
                " ".join(f"{k}={v}" for k, v in sorted(a.aliases.items())),
            )
            for a in rows
        ],
    )


def adapter(a: models.Adapter) -> None:
    _record(
        [
            ("name", a.name),
            ("base model", a.base_model),
            ("versions", a.version_count),
            ("aliases", " ".join(f"{k}={v}" for k, v in sorted(a.aliases.items()))),
        ]
    )
    out.print()
    _table(
        ["VERSION", "SOURCE", "RANK", "SIZE", "SHA256", "CREATED"],
        [
            (
                v.version,
                v.source,
                v.rank,
                v.size_bytes,
                v.sha256[:12],
                f"{v.created_at:%Y-%m-%d %H:%M}",
            )
            for v in a.versions
        ],
    )


def version(v: models.AdapterVersion) -> None:
    _record(
        [
            ("ref", v.ref),
            ("source", v.source),
            ("job", v.job_id),
            ("rank", v.rank),
            ("alpha", v.alpha),
            ("target modules", ", ".join(v.target_modules)),
            ("size", v.size_bytes),
            ("sha256", v.sha256),
            ("aliases", ", ".join(v.aliases)),
        ]
    )


def experiments(rows: Sequence[models.Experiment]) -> None:
    _table(
        ["ID", "PREFIX", "STATUS", "RUNS", "GRID", "BEST RUN", "CREATED"],
        [
            (
                e.id,
                e.adapter_name,
                e.status,
                len(e.runs),
                " ".join(f"{k}={','.join(map(str, v))}" for k, v in e.grid.items()),
                e.best_run,
                f"{e.created_at:%Y-%m-%d %H:%M}",
            )
            for e in rows
        ],
    )


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def experiment(e: models.Experiment) -> None:
    select = f"{e.select['metric']} ({e.select['mode']})" if e.select else None
    _record(
        [
            ("id", e.id),
            ("status", e.status),
            ("dataset", e.dataset_id),
            ("base model", e.base_model),
            ("adapters", f"{e.adapter_name}-<run>"),
            ("select", select),
            ("best run", e.best_run),
        ]
    )
    out.print()
    grid_names = list(e.grid)
    metric_names = sorted({name for run in e.runs for name in run.metrics})
    _table(
        [
            "RUN",
            "ADAPTER",
            *(name.upper() for name in grid_names),
            "STATUS",
            "LOSS",
            "BEST STEP",
            *(name.upper() for name in metric_names),
            "BEST",
        ],
        [
            (
                r.index,
                r.adapter_name,
                *(r.parameters.get(name) for name in grid_names),
                r.status,
                _number(r.final_loss),
                r.best_step,
                *(_number(r.metrics.get(name)) for name in metric_names),
                "*" if r.index == e.best_run else "",
            )
            for r in e.runs
        ],
    )


def workers(rows: Sequence[models.WorkerInfo]) -> None:
    _table(
        ["ID", "QUEUES", "BASE MODEL", "DEVICE", "CURRENT JOB", "HEARTBEAT"],
        [
            (
                w.id,
                ",".join(w.queues),
                w.base_model,
                w.device,
                w.current_job_id,
                f"{w.heartbeat_at:%H:%M:%S}",
            )
            for w in rows
        ],
    )
