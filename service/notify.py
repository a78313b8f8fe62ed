"""Job-finished notifications over Redis pub/sub, so a waiting request wakes at once.

SQL stays the source of truth: a notification only says "look now"; a missed one costs a poll.
"""

from __future__ import annotations

import asyncio
import contextlib

import redis
import redis.asyncio as aioredis

from service.config import Settings


def channel(settings: Settings, job_id: str) -> str:
    return f"{settings.redis_key_prefix}lorastack:job-done:{job_id}"


def publish_done(client: redis.Redis, settings: Settings, job_id: str) -> None:
    """Tell any waiter that ``job_id`` reached a final state (best effort)."""
    with contextlib.suppress(redis.RedisError):
        client.publish(channel(settings, job_id), "done")


class DoneWaiter:
    """Subscribe before the job is sent, then wait for its notification or a poll interval."""

    def __init__(self, client: aioredis.Redis, settings: Settings, job_id: str) -> None:
        self._pubsub = client.pubsub(ignore_subscribe_messages=True)
        self._channel = channel(settings, job_id)

    async def __aenter__(self) -> DoneWaiter:
        await self._pubsub.subscribe(self._channel)
        # Read the subscribe confirmation now, so the first wait() sees only real notifications.
        with contextlib.suppress(redis.RedisError, asyncio.TimeoutError):
            await self._pubsub.get_message(timeout=1.0)
        return self

    async def wait(self, timeout: float) -> bool:
        """True when a notification arrived within ``timeout`` seconds."""
        try:
            message = await self._pubsub.get_message(timeout=max(timeout, 0.0))
        except (TimeoutError, redis.RedisError):
            await asyncio.sleep(min(timeout, 0.5))
            return False
        return message is not None

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(redis.RedisError):
            await self._pubsub.unsubscribe(self._channel)
            await self._pubsub.aclose()
