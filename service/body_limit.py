"""A pure ASGI middleware that refuses request bodies over a byte cap, before reading them.

A declared ``Content-Length`` over the cap is refused before the app runs; a chunked body is
counted as it arrives and refused the moment it passes the cap, so nothing past the cap is
read and the app never sees a complete oversized body.

Starlette's own ``RequestBodyLimitMiddleware`` answers text/plain; this one answers
problem+json like every other error of the API.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.problems import problem_response

BODY_TOO_LARGE_CODE = "upload_too_large"


class _BodyTooLarge(Exception):
    """Raised into the app from ``receive`` once the body has passed the cap."""


class BodyLimitMiddleware:
    """Answer 413 problem+json (code ``upload_too_large``) for bodies over ``max_bytes``."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send)
            return

        received = 0
        tripped = False
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received, tripped
            if tripped:
                raise _BodyTooLarge
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    tripped = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if tripped and not response_started:
                # The app's answer to the aborted read (FastAPI turns it into a 400) is
                # replaced by the 413 below.
                return
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not tripped or response_started:
                raise
        if tripped and not response_started:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem_response(
            status=413,
            code=BODY_TOO_LARGE_CODE,
            detail=f"the request body is larger than max_upload_bytes={self.max_bytes}",
            instance=scope.get("path"),
            extra={"max_upload_bytes": self.max_bytes},
            # The rest of the body is never read: the connection cannot be reused.
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)


def _declared_length(scope: Scope) -> int | None:
    value = Headers(scope=scope).get("content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None  # the server refuses a malformed length; counting still applies
