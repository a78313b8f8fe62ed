"""Retries against a real HTTP server on a real socket: 429/503 with Retry-After are waited out,
problem+json becomes typed errors, creating POSTs keep one Idempotency-Key across attempts."""

from __future__ import annotations

import asyncio
import email.utils
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from lorastack import AsyncClient, Client, RateLimited, ServerError, ValidationFailed

JOB = {
    "id": "job_1",
    "kind": "train",
    "status": "queued",
    "queue": "train",
    "params": {},
    "progress": {},
    "attempts": 0,
    "max_attempts": 3,
    "created_at": "2026-01-01T00:00:00Z",
    "queued_at": "2026-01-01T00:00:00Z",
}


@dataclass
class Script:
    """What the server answers, in order: (status, headers, body); the last one repeats."""

    answers: list[tuple[int, dict[str, str], Any]] = field(default_factory=list)
    seen: list[tuple[str, str, dict[str, str], float]] = field(default_factory=list)


@pytest.fixture
def server() -> Iterator[tuple[str, Script]]:
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            if length:
                self.rfile.read(length)
            script.seen.append(
                (
                    self.command,
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    time.monotonic(),
                )
            )
            index = min(len(script.seen) - 1, len(script.answers) - 1)
            status, headers, body = script.answers[index]
            payload = json.dumps(body).encode()
            self.send_response(status)
            content_type = "application/problem+json" if status >= 400 else "application/json"
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = _answer

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", script
    finally:
        httpd.shutdown()
        httpd.server_close()


def _problem(status: int, code: str) -> dict[str, Any]:
    return {"type": "about:blank", "title": "x", "status": status, "code": code, "detail": code}


@pytest.mark.parametrize("status", [503, 429])
def test_retry_after_is_honoured_then_the_answer_returned(
    server: tuple[str, Script], status: int
) -> None:
    url, script = server
    script.answers = [
        (status, {"Retry-After": "1"}, _problem(status, "busy")),
        (200, {}, JOB),
    ]
    with Client(url, "key", backoff_s=0.01) as client:
        job = client.jobs.get("job_1")
    assert job.id == "job_1"
    assert len(script.seen) == 2
    assert script.seen[1][3] - script.seen[0][3] >= 0.95  # waited the server's second
    assert script.seen[0][2]["authorization"] == "Bearer key"


def test_retry_after_as_an_http_date(server: tuple[str, Script]) -> None:
    url, script = server
    when = email.utils.formatdate(time.time() + 2, usegmt=True)
    script.answers = [(503, {"Retry-After": when}, _problem(503, "busy")), (200, {}, JOB)]
    with Client(url, "key") as client:
        client.jobs.get("job_1")
    assert script.seen[1][3] - script.seen[0][3] >= 0.5


def test_creating_post_keeps_its_idempotency_key_across_retries(
    server: tuple[str, Script],
) -> None:
    url, script = server
    script.answers = [(503, {"Retry-After": "0"}, _problem(503, "busy"))] * 2 + [(201, {}, JOB)]
    with Client(url, "key") as client:
        client.jobs.create("ds_1", "squares", hyperparameters={"rank": 4})
    keys = {headers["idempotency-key"] for _, _, headers, _ in script.seen}
    assert len(script.seen) == 3 and len(keys) == 1 and keys != {""}


def test_gives_up_after_max_retries_with_the_problem(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [(429, {"Retry-After": "0"}, _problem(429, "quota_exceeded"))]
    with Client(url, "key", max_retries=2) as client, pytest.raises(RateLimited) as caught:
        client.datasets.list()
    assert len(script.seen) == 3
    assert caught.value.status == 429 and caught.value.code == "quota_exceeded"
    assert caught.value.retry_after == 0


def test_problem_json_becomes_a_typed_error_with_field_errors(
    server: tuple[str, Script],
) -> None:
    url, script = server
    problem = {
        **_problem(422, "validation_error"),
        "errors": [{"field": "hyperparameters.rank", "message": "must be > 0"}],
    }
    script.answers = [(422, {}, problem)]
    with Client(url, "key") as client, pytest.raises(ValidationFailed) as caught:
        client.jobs.create("ds_1", "squares")
    assert len(script.seen) == 1  # a 422 is not retried
    assert caught.value.errors[0].field == "hyperparameters.rank"
    assert caught.value.problem["code"] == "validation_error"


def test_async_client_retries_the_same_way(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [(503, {"Retry-After": "1"}, _problem(503, "busy")), (200, {}, JOB)]

    async def run() -> str:
        async with AsyncClient(url, "key") as client:
            return (await client.jobs.get("job_1")).id

    assert asyncio.run(run()) == "job_1"
    assert script.seen[1][3] - script.seen[0][3] >= 0.95


def test_async_client_raises_server_error_after_retries(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [(503, {"Retry-After": "0"}, _problem(503, "unavailable"))]

    async def run() -> None:
        async with AsyncClient(url, "key", max_retries=1) as client:
            await client.workers()

    with pytest.raises(ServerError):
        asyncio.run(run())
    assert len(script.seen) == 2
