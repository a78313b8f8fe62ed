"""A pure ASGI middleware that refuses request bodies over a byte cap, before reading them.

Uploads (``multipart/form-data``) have the upload cap; every other body (JSON, or anything a
route would try to parse as JSON) has the much smaller JSON cap, so a few large JSON bodies
cannot make the process buffer and parse hundreds of megabytes.

A declared ``Content-Length`` over the cap is refused before the app runs; a chunked body is
counted as it arrives and refused the moment it passes the cap, so nothing past the cap is
read and the app never sees a complete oversized body.

Starlette's own ``RequestBodyLimitMiddleware`` answers text/plain; this one answers
problem+json like every other error of the API.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.problems import error_response

BODY_TOO_LARGE_CODE = "upload_too_large"
JSON_TOO_LARGE_CODE = "body_too_large"


class _BodyTooLarge(Exception):
    """Raised into the app from ``receive`` once the body has passed the cap."""


class BodyLimitMiddleware:
    """Answer 413 problem+json for multipart bodies over ``max_upload_bytes`` (code
    ``upload_too_large``) and other bodies over ``max_json_bytes`` (code ``body_too_large``)."""

    def __init__(self, app: ASGIApp, *, max_upload_bytes: int, max_json_bytes: int) -> None:
        if max_upload_bytes <= 0 or max_json_bytes <= 0:
            raise ValueError("body caps must be positive")
        self.app = app
        self.max_upload_bytes = max_upload_bytes
        self.max_json_bytes = max_json_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        upload = headers.get("content-type", "").lower().startswith("multipart/form-data")
        max_bytes = self.max_upload_bytes if upload else self.max_json_bytes
        declared = _declared_length(headers)
        if declared is not None and declared > max_bytes:
            await self._refuse(scope, receive, send, upload=upload)
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
                if received > max_bytes:
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
            await self._refuse(scope, receive, send, upload=upload)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, *, upload: bool) -> None:
        setting, cap = (
            ("max_upload_bytes", self.max_upload_bytes)
            if upload
            else ("max_json_bytes", self.max_json_bytes)
        )
        kind = "upload" if upload else "request body (not multipart/form-data)"
        response = error_response(
            status=413,
            code=BODY_TOO_LARGE_CODE if upload else JSON_TOO_LARGE_CODE,
            detail=f"the {kind} is larger than {setting}={cap} bytes",
            instance=scope.get("path"),
            extra={setting: cap},
            # The rest of the body is never read: the connection cannot be reused.
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)


def _declared_length(headers: Headers) -> int | None:
    value = headers.get("content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None  # the server refuses a malformed length; counting still applies
