"""Sending a :class:`~lorastack.client.calls.Call`: auth, timeouts, retries, problem+json errors.

Retries follow one policy for both transports:

- 429 and 503 answers are retried after the server's ``Retry-After`` (seconds or an HTTP date),
  or after an exponential backoff with jitter when it sends none;
- a connection that fails or drops is retried only when resending is safe: GET/PUT/DELETE, and
  POSTs that carry an ``Idempotency-Key`` (every POST that creates does), so a retry answers the
  first request's resource instead of creating a second one.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import random
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx

from lorastack.client import errors
from lorastack.client.calls import Call

T = TypeVar("T")

RETRY_STATUSES = frozenset({429, 503})
USER_AGENT = "lorastack-python"


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to wait before resending a request."""

    max_retries: int = 4
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (the server's word wins)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_backoff_s)
        base = min(self.backoff_s * 2**attempt, self.max_backoff_s)
        return base * (0.5 + random.random() / 2)


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)


def problem_of(response: httpx.Response) -> dict[str, Any]:
    """The answer's problem+json, or a problem made from whatever body it has."""
    try:
        body = json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        text = response.content.decode("utf-8", "replace").strip()
        return {"detail": text[:500] or response.reason_phrase}
    if isinstance(body, dict):
        if isinstance(body.get("detail"), list):  # a bare FastAPI validation body
            body = {**body, "detail": "; ".join(str(d.get("msg")) for d in body["detail"])}
        return body
    return {"detail": str(body)}


def raise_for_problem(response: httpx.Response) -> None:
    """Raise the matching :class:`~lorastack.client.errors.APIError` for a 4xx/5xx answer
    (the body must have been read)."""
    if response.status_code < 400:
        return
    raise errors.error_for(
        response.status_code,
        problem_of(response),
        retry_after=retry_after_seconds(response.headers.get("retry-after")),
    )


class _Base:
    def __init__(self, *, policy: RetryPolicy) -> None:
        self.policy = policy

    def _request(self, http: httpx.Client | httpx.AsyncClient, call: Call[Any]) -> httpx.Request:
        return http.build_request(
            call.method,
            call.path,
            params=call.params,
            json=call.json,
            data=call.data,
            files=call.files() if call.files else None,
            headers=call.headers,
            timeout=call.timeout if call.timeout is not None else httpx.USE_CLIENT_DEFAULT,
        )

    def _after_response(self, attempt: int, response: httpx.Response) -> float | None:
        """Seconds to wait before a retry, or None to keep this answer."""
        if response.status_code not in RETRY_STATUSES or attempt >= self.policy.max_retries:
            return None
        return self.policy.delay(attempt, retry_after_seconds(response.headers.get("retry-after")))

    def _after_failure(self, call: Call[Any], attempt: int, exc: httpx.TransportError) -> float:
        """Seconds to wait before resending after a transport error; raises when it may not."""
        if not call.retry_safe or attempt >= self.policy.max_retries:
            raise errors.ConnectionFailed(
                f"{call.method} {call.path}: {type(exc).__name__}: {exc}"
            ) from exc
        return self.policy.delay(attempt, None)


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": USER_AGENT}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


class SyncTransport(_Base):
    """Sends calls with an ``httpx.Client``."""

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None,
        timeout: httpx.Timeout,
        policy: RetryPolicy,
        http: httpx.Client | None = None,
    ) -> None:
        super().__init__(policy=policy)
        self.http = http or httpx.Client(
            base_url=base_url, headers=_headers(api_key), timeout=timeout
        )

    def send(self, call: Call[T]) -> T:
        with self.open(call) as response:
            response.read()
            return call.parse(response)

    @contextlib.contextmanager
    def open(self, call: Call[Any]) -> Iterator[httpx.Response]:
        """The answer as a stream (body not read yet), after retries; raises for 4xx/5xx."""
        attempt = 0
        while True:
            try:
                response = self.http.send(self._request(self.http, call), stream=True)
            except httpx.TransportError as exc:
                time.sleep(self._after_failure(call, attempt, exc))
                attempt += 1
                continue
            wait = self._after_response(attempt, response)
            if wait is None:
                break
            response.close()
            time.sleep(wait)
            attempt += 1
        try:
            if response.status_code >= 400:
                response.read()
                raise_for_problem(response)
            yield response
        finally:
            response.close()

    def close(self) -> None:
        self.http.close()


class AsyncTransport(_Base):
    """Sends calls with an ``httpx.AsyncClient``."""

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None,
        timeout: httpx.Timeout,
        policy: RetryPolicy,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(policy=policy)
        self.http = http or httpx.AsyncClient(
            base_url=base_url, headers=_headers(api_key), timeout=timeout
        )

    async def send(self, call: Call[T]) -> T:
        async with self.open(call) as response:
            await response.aread()
            return call.parse(response)

    @contextlib.asynccontextmanager
    async def open(self, call: Call[Any]) -> AsyncIterator[httpx.Response]:
        """The answer as a stream (body not read yet), after retries; raises for 4xx/5xx."""
        attempt = 0
        while True:
            try:
                response = await self.http.send(self._request(self.http, call), stream=True)
            except httpx.TransportError as exc:
                await asyncio.sleep(self._after_failure(call, attempt, exc))
                attempt += 1
                continue
            wait = self._after_response(attempt, response)
            if wait is None:
                break
            await response.aclose()
            await asyncio.sleep(wait)
            attempt += 1
        try:
            if response.status_code >= 400:
                await response.aread()
                raise_for_problem(response)
            yield response
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()
