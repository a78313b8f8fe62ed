"""SDK retries of an OpenAI images request attach to the job their first attempt created.

The OpenAI Python SDK retries a request that timed out, lost its connection or answered 408,
409, 429 or 5xx, with the same body and an ``x-stainless-retry-count`` header counting the
retries, but without an idempotency key. Every first attempt records its job under a
fingerprint of (tenant, request body) in Redis for ``window_s``; a retry (count > 0) with the
same fingerprint waits for that job instead of creating another. A first attempt always
creates, so a deliberate repeat of a request still runs again. Redis being down only loses
the de-duplication: the retry then runs as a new job.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import redis
import redis.asyncio as aioredis
from pydantic import BaseModel

log = logging.getLogger("lorastack.generation")


@dataclass(frozen=True)
class OpenAIRetries:
    client: aioredis.Redis
    key_prefix: str
    window_s: float

    def _key(self, tenant_id: str, payload: BaseModel) -> str:
        digest = hashlib.sha256(payload.model_dump_json().encode()).hexdigest()
        return f"{self.key_prefix}lorastack:openai-request:{tenant_id}:{digest}"

    async def find(self, *, tenant_id: str, payload: BaseModel) -> str | None:
        """The job a first attempt of this request created, if within the window."""
        try:
            found = await self.client.get(self._key(tenant_id, payload))
        except (redis.RedisError, OSError) as exc:
            log.warning("retry de-duplication unavailable: %s", exc)
            return None
        return found.decode() if isinstance(found, bytes) else found

    async def remember(self, *, tenant_id: str, payload: BaseModel, job_id: str) -> None:
        try:
            await self.client.set(
                self._key(tenant_id, payload), job_id, px=int(self.window_s * 1000)
            )
        except (redis.RedisError, OSError) as exc:
            log.warning("retry de-duplication unavailable: %s", exc)
