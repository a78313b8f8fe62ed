"""The error raised when an upload crosses one of its caps (``service.config.DatasetLimits``)."""

from __future__ import annotations

from typing import Any

from service.config import DatasetLimits


class DatasetRejected(Exception):
    """An upload that is refused; nothing was stored.

    ``status`` is the HTTP status (413, 415 or 422), ``code`` a short snake_case reason,
    ``detail`` a sentence naming the cap or problem, ``report`` the preflight report when one
    was built (e.g. a dataset with no usable image-caption pair).
    """

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        report: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.report = report

    def __repr__(self) -> str:
        return f"DatasetRejected(status={self.status}, code={self.code!r}, detail={self.detail!r})"


def check_upload_size(received_bytes: int, limits: DatasetLimits) -> None:
    """Raise 413 once a streamed upload has passed ``max_upload_bytes`` (for the route)."""
    if received_bytes > limits.max_upload_bytes:
        raise DatasetRejected(
            413,
            "upload_too_large",
            f"the upload is larger than max_upload_bytes={limits.max_upload_bytes}",
        )
