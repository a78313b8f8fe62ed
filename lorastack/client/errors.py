"""Exceptions the client raises: one per kind of failure, each carrying what the server said."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class LorastackError(Exception):
    """Base of every error this client raises."""


class ConfigurationError(LorastackError):
    """No server URL or API key could be found (argument, environment or `lorastack login`)."""


class ConnectionFailed(LorastackError):
    """The server could not be reached, or the connection dropped, after every retry."""


@dataclass(frozen=True)
class FieldError:
    """One invalid field of a request, as the server named it (``hyperparameters.rank``)."""

    field: str
    message: str


class APIError(LorastackError):
    """The server answered an error: an RFC 9457 problem (status, code, detail, field errors)."""

    def __init__(self, status: int, problem: dict[str, Any], *, retry_after: float | None = None):
        self.status = status
        self.problem = problem
        self.code: str = str(problem.get("code") or "http_" + str(status))
        self.title: str = str(problem.get("title") or "")
        self.detail: str = str(problem.get("detail") or self.title or f"HTTP {status}")
        self.retry_after = retry_after
        self.errors: list[FieldError] = [
            FieldError(field=str(e.get("field", "")), message=str(e.get("message", "")))
            for e in problem.get("errors") or []
            if isinstance(e, dict)
        ]
        super().__init__(f"{status} {self.code}: {self.detail}")


class BadRequest(APIError):
    """400, 413, 415, 416: the request itself is wrong."""


class AuthenticationError(APIError):
    """401 or 403: missing, unknown or revoked API key."""


class NotFound(APIError):
    """404: no such resource for this API key's tenant."""


class Conflict(APIError):
    """409: the resource's state forbids it (a dataset in use, a finished job)."""


class ValidationFailed(APIError):
    """422: a field is invalid; ``errors`` names each one."""


class RateLimited(APIError):
    """429 after every retry: a quota is exhausted; ``retry_after`` says for how long."""


class ServerError(APIError):
    """5xx: the server failed or is unavailable (503 after every retry)."""


_BY_STATUS: dict[int, type[APIError]] = {
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFound,
    409: Conflict,
    422: ValidationFailed,
    429: RateLimited,
}


def error_for(status: int, problem: dict[str, Any], *, retry_after: float | None) -> APIError:
    """The exception class that fits an HTTP error status."""
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else BadRequest)
    return cls(status, problem, retry_after=retry_after)


class JobFailed(LorastackError):
    """``jobs.wait`` saw the job end failed or cancelled; ``job`` is its final state."""

    def __init__(self, job: Any) -> None:
        self.job = job
        error = getattr(job, "error", None)
        reason = f": {error.code}: {error.message}" if error is not None else ""
        super().__init__(f"job {job.id} {job.status}{reason}")
