"""Typed service errors: what went wrong, the HTTP status a client should see, a short code.

Raised by the service layers and turned into problem+json in one place (``service.problems``).
This module imports no web framework, so processes without HTTP (workers) can use the layers
that raise these.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """A failure the client can act on. Subclasses fix the status and a default code."""

    status: int = 400
    code: str = "bad_request"

    def __init__(
        self,
        detail: str,
        *,
        code: str | None = None,
        status: int | None = None,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.extra = extra or {}
        self.headers = headers or {}


class NotFound(ServiceError):
    status = 404
    code = "not_found"


class Conflict(ServiceError):
    status = 409
    code = "conflict"


class Unprocessable(ServiceError):
    status = 422
    code = "validation_error"


def field_error(field: str, message: str, *, code: str = "validation_error") -> Unprocessable:
    """A 422 naming the offending field, shaped like request validation errors."""
    return Unprocessable(
        f"{field}: {message}", code=code, extra={"errors": [{"field": field, "message": message}]}
    )


class Unauthorized(ServiceError):
    status = 401
    code = "unauthorized"


class PayloadTooLarge(ServiceError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status = 415
    code = "unsupported_media_type"


class ServiceUnavailable(ServiceError):
    status = 503
    code = "unavailable"


class TooManyRequests(ServiceError):
    """429 with Retry-After: a quota or the request rate; ``extra`` names the limit."""

    status = 429
    code = "too_many_requests"

    def __init__(
        self,
        detail: str,
        *,
        retry_after_s: int,
        code: str | None = None,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(
            detail,
            code=code,
            extra=extra,
            headers={**(headers or {}), "Retry-After": str(max(int(retry_after_s), 1))},
        )
