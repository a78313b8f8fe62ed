"""The body-size middleware, driven as plain ASGI and through the real app."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

from fastapi.testclient import TestClient
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import Message, Receive, Scope, Send

from service.app import create_app
from service.body_limit import BodyLimitMiddleware
from tests.conftest import Stack
from tests.service.test_app import assert_problem

MULTIPART = "multipart/form-data; boundary=xyz"


class EchoApp:
    """Reads the whole body and answers its length; records whether it ran."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        body = await Request(scope, receive).body()
        await JSONResponse({"received": len(body)})(scope, receive, send)


def _scope(headers: dict[str, str]) -> Scope:
    return {
        "type": "http",
        "method": "POST",
        "path": "/upload",
        "raw_path": b"/upload",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }


def _drive(
    app: BodyLimitMiddleware, *, headers: dict[str, str], chunks: list[bytes]
) -> tuple[list[Message], int]:
    """Run one request; returns the messages sent and how many body chunks were pulled."""
    sent: list[Message] = []
    pulled = 0

    async def receive() -> Message:
        nonlocal pulled
        if pulled == len(chunks):
            return {"type": "http.disconnect"}
        pulled += 1
        return {
            "type": "http.request",
            "body": chunks[pulled - 1],
            "more_body": pulled < len(chunks),
        }

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(app(_scope(headers), receive, send))
    return sent, pulled


def _status_and_body(sent: list[Message]) -> tuple[int, dict, dict[str, str]]:
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], json.loads(body), headers


def test_declared_length_over_the_cap_is_refused_before_the_app_runs() -> None:
    inner = EchoApp()
    sent, pulled = _drive(
        BodyLimitMiddleware(inner, max_upload_bytes=1000, max_json_bytes=10**9),
        headers={"content-length": "1001", "content-type": MULTIPART},
        chunks=[b"x" * 1001],
    )
    status, body, headers = _status_and_body(sent)
    assert (status, body["code"], body["status"]) == (413, "upload_too_large", 413)
    assert headers["content-type"].startswith("application/problem+json")
    assert body["max_upload_bytes"] == 1000 and "max_upload_bytes=1000" in body["detail"]
    assert body["instance"] == "/upload"
    assert inner.calls == 0 and pulled == 0


def test_chunked_body_is_refused_as_soon_as_it_passes_the_cap() -> None:
    inner = EchoApp()
    chunks = [b"x" * 1000 for _ in range(20)]
    sent, pulled = _drive(
        BodyLimitMiddleware(inner, max_upload_bytes=2500, max_json_bytes=10**9),
        headers={"transfer-encoding": "chunked", "content-type": MULTIPART},
        chunks=chunks,
    )
    status, body, _ = _status_and_body(sent)
    assert (status, body["code"]) == (413, "upload_too_large")
    # The third chunk passes 2,500 bytes: nothing after it is read.
    assert inner.calls == 1 and pulled == 3
    # Only our answer went out, once.
    assert [m["type"] for m in sent].count("http.response.start") == 1


def test_other_bodies_have_the_json_cap() -> None:
    inner = EchoApp()
    middleware = BodyLimitMiddleware(inner, max_upload_bytes=10**9, max_json_bytes=100)
    for headers in ({"content-type": "application/json"}, {"content-type": "text/plain"}, {}):
        sent, pulled = _drive(middleware, headers=headers, chunks=[b"j" * 60] * 5)
        status, body, _ = _status_and_body(sent)
        assert (status, body["code"], body["max_json_bytes"]) == (413, "body_too_large", 100)
        assert pulled == 2
    declared = {"content-type": "application/json", "content-length": "101"}
    sent, pulled = _drive(middleware, headers=declared, chunks=[b"j" * 101])
    assert _status_and_body(sent)[0] == 413 and pulled == 0
    sent, _ = _drive(middleware, headers={"content-type": MULTIPART}, chunks=[b"m" * 60] * 5)
    assert _status_and_body(sent)[:2] == (200, {"received": 300})


def test_bodies_at_the_cap_pass_through() -> None:
    inner = EchoApp()
    middleware = BodyLimitMiddleware(inner, max_upload_bytes=3000, max_json_bytes=3000)
    sent, _ = _drive(middleware, headers={"content-length": "3000"}, chunks=[b"y" * 3000])
    assert _status_and_body(sent)[:2] == (200, {"received": 3000})
    sent, pulled = _drive(middleware, headers={}, chunks=[b"y" * 1000] * 3)
    assert _status_and_body(sent)[:2] == (200, {"received": 3000})
    assert pulled == 3


def test_an_app_that_handles_the_aborted_read_is_still_answered_413() -> None:
    """FastAPI turns a failing body read into its own 400; the client must see the 413."""

    async def swallowing_app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await Request(scope, receive).body()
        except Exception:
            await JSONResponse({"detail": "bad body"}, status_code=400)(scope, receive, send)

    sent, pulled = _drive(
        BodyLimitMiddleware(swallowing_app, max_upload_bytes=10, max_json_bytes=10),
        headers={},
        chunks=[b"z" * 8] * 4,
    )
    assert _status_and_body(sent)[0] == 413
    assert pulled == 2
    assert [m["type"] for m in sent].count("http.response.start") == 1


def test_the_app_refuses_oversized_bodies_with_problem_json(stack: Stack) -> None:
    settings = stack.settings.model_copy(update={"max_upload_bytes": 2000})
    with TestClient(create_app(settings)) as small:
        multipart = {"content-type": "multipart/form-data; boundary=xyz"}
        declared = small.post("/datasets", content=b"a" * 2001, headers=multipart)
        body = assert_problem(declared, 413, "upload_too_large")
        assert declared.headers["connection"] == "close"
        assert body["max_upload_bytes"] == 2000

        def chunked() -> Iterator[bytes]:
            yield b"b" * 1500
            yield b"b" * 1500

        # A generator body is sent without Content-Length: the counting path answers, while
        # the form parser reads it (FastAPI's own 400 for the failed read is replaced).
        refused = small.post("/datasets", content=chunked(), headers=multipart)
        assert "content-length" not in refused.request.headers
        assert_problem(refused, 413, "upload_too_large")
        # Small bodies reach the routes (here: 401, no key).
        assert_problem(small.post("/datasets", content=b"a" * 100), 401, "unauthorized")
