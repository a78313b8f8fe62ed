"""`jobs.wait` against a real HTTP server on a real socket that plays a job's event stream:
a stream that drops is resumed after the last event seen; a server that does not stream is
polled; each event reaches `on_event` once, in order."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from lorastack import AsyncClient, Client, JobFailed, Progress
from lorastack.client import models


def _job(status: str, progress: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "id": "job_1",
        "kind": "train",
        "status": status,
        "queue": "train",
        "params": {},
        "progress": progress or {},
        "attempts": 1,
        "max_attempts": 3,
        "created_at": "2026-01-01T00:00:00Z",
        "queued_at": "2026-01-01T00:00:00Z",
        **({"error": {"code": "oom", "message": "out of memory"}} if status == "failed" else {}),
    }


def _event(seq: int, type_: str, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "seq": seq,
        "type": type_,
        "level": "info",
        "data": data,
        "created_at": "2026-01-01T00:00:00Z",
    }


EVENTS = [
    _event(1, "state", {"status": "running"}),
    _event(2, "metrics", {"step": 5, "total_steps": 10, "loss": 0.5, "eta_s": 3.0}),
    _event(3, "metrics", {"step": 10, "total_steps": 10, "loss": 0.25, "eta_s": 0.0}),
    _event(4, "state", {"status": "succeeded"}),
]


class JobServer:
    """Plays EVENTS. ``mode="drop"``: the first stream sends two events and then breaks off
    mid-body; the second sends the rest. ``mode="json"``: never streams (JSON pages only)."""

    def __init__(self, mode: str, *, final: str = "succeeded") -> None:
        self.mode = mode
        self.final = final
        self.streams: list[tuple[str, str | None]] = []  # (after, Last-Event-ID) per stream
        self.pages: list[str] = []
        self.delivered = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                after = parse_qs(url.query).get("after", ["0"])[0]
                if url.path == "/jobs/job_1":
                    done = server.delivered >= len(EVENTS)
                    status = server.final if done else "running"
                    return self._json(_job(status))
                wants_stream = "text/event-stream" in self.headers.get("accept", "")
                if wants_stream and server.mode == "drop":
                    return self._stream(int(after), self.headers.get("last-event-id"))
                server.pages.append(after)
                # JSON pages: one new event per poll, so polling takes several rounds.
                page = [e for e in EVENTS if e["seq"] > int(after)][:1]
                server.delivered = max(server.delivered, *(e["seq"] for e in page), 0)
                return self._json({"data": page, "has_more": False})

            def _json(self, body: Any) -> None:
                payload = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _stream(self, after: int, last_event_id: str | None) -> None:
                first = not server.streams
                server.streams.append((str(after), last_event_id))
                events = [e for e in EVENTS if e["seq"] > after]
                if first:
                    events = events[:2]
                body = b": keep-alive\n\n" + b"".join(
                    f"id: {e['seq']}\nevent: {e['type']}\ndata: {json.dumps(e)}\n\n".encode()
                    for e in events
                )
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                # The first stream promises more than it sends, then the connection breaks.
                self.send_header("Content-Length", str(len(body) + (1000 if first else 0)))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                server.delivered = max(server.delivered, *(e["seq"] for e in events))
                if first:
                    self.close_connection = True

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def dropping() -> Iterator[JobServer]:
    server = JobServer("drop")
    yield server
    server.close()


def test_a_dropped_stream_resumes_after_the_last_event(dropping: JobServer) -> None:
    events: list[models.JobEvent] = []
    progress: list[Progress] = []
    with Client(dropping.url, "key") as client:
        job = client.jobs.wait(
            "job_1", on_event=events.append, on_progress=progress.append, poll_interval=0.05
        )
    assert job.status == "succeeded"
    assert [e.seq for e in events] == [1, 2, 3, 4]
    assert dropping.streams == [("0", "0"), ("2", "2")]  # resumed after event 2
    assert [p.step for p in progress if p.step is not None][:2] == [5, 10]
    assert progress[-1].status == "succeeded" and progress[-1].loss == 0.25


def test_a_server_that_does_not_stream_is_polled() -> None:
    server = JobServer("json")
    try:
        events: list[models.JobEvent] = []
        with Client(server.url, "key") as client:
            job = client.jobs.wait("job_1", on_event=events.append, poll_interval=0.05)
    finally:
        server.close()
    assert job.status == "succeeded"
    assert [e.seq for e in events] == [1, 2, 3, 4]
    # The first answer is the stream request answered with JSON: from then on, pages.
    assert server.pages[:5] == ["0", "0", "1", "2", "3"]


def test_a_failed_job_raises_job_failed_with_its_error() -> None:
    server = JobServer("json", final="failed")
    try:
        with Client(server.url, "key") as client, pytest.raises(JobFailed) as caught:
            client.jobs.wait("job_1", poll_interval=0.05)
        with Client(server.url, "key") as client:
            job = client.jobs.wait("job_1", poll_interval=0.05, raise_on_failure=False)
    finally:
        server.close()
    assert caught.value.job.error.code == "oom" and "out of memory" in str(caught.value)
    assert job.status == "failed"


def test_async_wait_resumes_a_dropped_stream_too(dropping: JobServer) -> None:
    async def run() -> list[int]:
        seen: list[int] = []
        async with AsyncClient(dropping.url, "key") as client:
            await client.jobs.wait("job_1", on_event=lambda e: seen.append(e.seq))
        return seen

    assert asyncio.run(run()) == [1, 2, 3, 4]
    assert dropping.streams == [("0", "0"), ("2", "2")]
