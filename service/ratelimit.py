"""Request rate per API key: a token bucket in Redis, and the RateLimit headers that say so.

The bucket holds ``burst`` tokens and refills at ``rate`` per second; a request takes one, and
a request that finds none answers 429 with ``Retry-After``. The bucket is one small Lua script
(atomic, one round trip, Redis' own clock), so every API process shares it. Responses carry
the IETF ``RateLimit-Policy`` / ``RateLimit`` headers (draft-ietf-httpapi-ratelimit-headers):
the quota ``q`` over the window ``w`` it takes to refill from empty, what remains ``r`` and
the seconds ``t`` until the bucket is full again (until a token is back, when refused).

Redis being down must not stop the API (the job rows are its record, not Redis): the limiter
then lets requests through, and logs it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import redis
import redis.asyncio as aioredis
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import TooManyRequests

log = logging.getLogger("lorastack.ratelimit")

# KEYS[1] the bucket; ARGV rate/s, burst. Returns {allowed 0|1, tokens left as a string}.
_TOKEN_BUCKET = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(now - at, 0) * rate)
local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, tostring(tokens)}
"""

STATE_KEY = "ratelimit_headers"  # in the request state (scope["state"])


@dataclass(frozen=True)
class RateLimiter:
    client: aioredis.Redis
    rate: float
    burst: int
    key_prefix: str = ""

    @property
    def window_s(self) -> int:
        return max(math.ceil(self.burst / self.rate), 1)

    def policy(self) -> str:
        return f'"per-key";q={self.burst};w={self.window_s}'

    async def take(self, key_id: str) -> list[tuple[str, str]]:
        """Take a token for ``key_id``; the headers to answer with. Raises 429 when empty."""
        try:
            allowed, left = await self.client.eval(
                _TOKEN_BUCKET,
                1,
                f"{self.key_prefix}lorastack:ratelimit:{key_id}",
                repr(self.rate),
                str(self.burst),
            )
        except (redis.RedisError, OSError) as exc:
            log.warning("rate limit not checked, Redis unavailable: %s", exc)
            return []
        tokens = float(left)
        if int(allowed):
            reset = math.ceil((self.burst - tokens) / self.rate)
        else:
            reset = max(math.ceil((1 - tokens) / self.rate), 1)
        headers = [
            ("RateLimit-Policy", self.policy()),
            ("RateLimit", f'"per-key";r={int(tokens)};t={reset}'),
        ]
        if not int(allowed):
            raise TooManyRequests(
                f"over the request rate of this API key: {self.rate:g}/s with bursts of "
                f"{self.burst} (LORASTACK_RATE_LIMIT_PER_S, LORASTACK_RATE_LIMIT_BURST)",
                code="rate_limited",
                retry_after_s=reset,
                extra={
                    "limit": {
                        "name": "LORASTACK_RATE_LIMIT_PER_S",
                        "value": self.rate,
                        "burst": self.burst,
                    }
                },
                headers=dict(headers),
            )
        return headers


class RateLimitHeadersMiddleware:
    """Adds the headers the rate limiter left in the request's state to its response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra: list[tuple[str, str]] = scope.get("state", {}).get(STATE_KEY) or []
                if extra:
                    present = {k.lower() for k, _ in message.get("headers", [])}
                    message["headers"] = [
                        *message.get("headers", []),
                        *(
                            (k.lower().encode(), v.encode())
                            for k, v in extra
                            if k.lower().encode() not in present
                        ),
                    ]
            await send(message)

        await self.app(scope, receive, send_with_headers)
