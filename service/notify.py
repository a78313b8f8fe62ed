"""Job-finished notifications over Redis pub/sub, so a waiting request wakes at once.

SQL stays the source of truth. A worker publishes after its commit: the job id and the
outcome it committed (status, result or error), so the request waiting for that job answers
with what SQL now holds without reading the row back. A missed notification costs a poll of
SQL; a notification without an outcome (or one that can't be read) says only "look now".

Workers publish on one channel. Each API process holds a single subscription to it for its
whole life (:class:`DoneListener`) and wakes the request waiting for that id, so a request
costs no Redis round trip of its own: no connection, SUBSCRIBE or UNSUBSCRIBE. The id comes
first in each message, so a process decodes only the outcomes of jobs it waits for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterator

import redis
import redis.asyncio as aioredis

from service.config import Settings
from service.lifecycle import JobOutcome

log = logging.getLogger("lorastack.notify")


def channel(settings: Settings) -> str:
    return f"{settings.redis_key_prefix}lorastack:job-done"


def publish_done(
    client: redis.Redis, settings: Settings, job_id: str, outcome: JobOutcome | None = None
) -> None:
    """Tell any waiter that ``job_id`` reached a final state, committed as ``outcome``
    (best effort). The message is the job id, then a space and the outcome as JSON."""
    message = job_id
    if outcome is not None:
        message += " " + json.dumps(outcome.to_json(), separators=(",", ":"))
    with contextlib.suppress(redis.RedisError):
        client.publish(channel(settings), message)


def _outcome(payload: str) -> JobOutcome | None:
    """The outcome a message carries; None when it has none or it can't be read (the waiter
    then reads SQL)."""
    if not payload:
        return None
    try:
        return JobOutcome.from_json(json.loads(payload))
    except (ValueError, TypeError, KeyError):
        return None


class Waiter(asyncio.Event):
    """Set when its job is announced; ``outcome`` is what the worker committed, if it said."""

    outcome: JobOutcome | None = None


class DoneListener:
    """One long-lived subscription per API process, fanning notifications out to waiters.

    While the subscription is down (Redis restarting) waiters time out and re-read SQL, so a
    request is at worst one poll interval late, never wrong.
    """

    def __init__(self, client: aioredis.Redis, settings: Settings, *, retry_s: float = 0.5):
        self._client = client
        self._channel = channel(settings)
        self._retry_s = retry_s
        self._waiters: dict[str, list[Waiter]] = {}
        self._task: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()

    async def start(self, timeout: float = 1.0) -> None:
        """Subscribe in the background; wait a little for it, so the first request is woken."""
        self._task = asyncio.create_task(self._listen(), name="lorastack-done-listener")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.subscribed.wait(), timeout)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    @contextlib.contextmanager
    def waiting(self, job_id: str) -> Iterator[Waiter]:
        """A waiter set when ``job_id`` is announced; register it before the job is sent."""
        event = Waiter()
        self._waiters.setdefault(job_id, []).append(event)
        try:
            yield event
        finally:
            events = self._waiters.get(job_id, [])
            if event in events:
                events.remove(event)
            if not events:
                self._waiters.pop(job_id, None)

    async def _listen(self) -> None:
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                self.subscribed.set()
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    data = message["data"]
                    text = data.decode() if isinstance(data, bytes) else str(data)
                    job_id, _, payload = text.partition(" ")
                    waiters = self._waiters.get(job_id)
                    if not waiters:
                        continue  # another process's job: its outcome is not decoded here
                    outcome = _outcome(payload)
                    for waiter in waiters:
                        waiter.outcome = outcome
                        waiter.set()
            except (redis.RedisError, OSError) as exc:
                log.warning("job-done subscription lost (%s); retrying", exc)
            finally:
                self.subscribed.clear()
                with contextlib.suppress(redis.RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(self._retry_s)


async def wait_for(event: asyncio.Event, timeout: float) -> bool:
    """True when ``event`` was set within ``timeout`` seconds."""
    if event.is_set():
        return True
    try:
        await asyncio.wait_for(event.wait(), max(timeout, 0.0))
    except TimeoutError:
        return False
    return True
