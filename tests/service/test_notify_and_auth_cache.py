"""The per-process job-done subscription (and the outcome it carries) and the verified-key
cache, against real Redis and SQL."""

from __future__ import annotations

import asyncio
import secrets
import time

import redis
import redis.asyncio as aioredis
from fastapi.testclient import TestClient
from sqlalchemy import update

from service.app import create_app
from service.auth import hash_key
from service.db import transaction, utcnow
from service.lifecycle import JobOutcome
from service.models import ApiKey
from service.notify import DoneListener, channel, publish_done, wait_for
from tests.conftest import Stack, new_tenant_headers


def test_listener_wakes_only_the_named_waiter_and_survives_a_lost_connection(
    stack: Stack,
) -> None:
    settings = stack.settings
    sync = redis.Redis.from_url(settings.redis_client_url)

    async def scenario() -> None:
        name = f"listener-{secrets.token_hex(4)}"
        client = aioredis.Redis.from_url(settings.redis_client_url, client_name=name)
        listener = DoneListener(client, settings, retry_s=0.1)
        await listener.start()
        try:
            assert listener.subscribed.is_set()
            with listener.waiting("job_a") as a, listener.waiting("job_b") as b:
                publish_done(sync, settings, "job_a")
                assert await wait_for(a, 5.0)
                assert not await wait_for(b, 0.2)

            # Redis drops the subscriber's connection: the listener subscribes again.
            ours = [c["id"] for c in sync.client_list(_type="pubsub") if c["name"] == name]
            assert ours
            for client_id in ours:
                sync.client_kill_filter(_id=client_id)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with listener.waiting("job_c") as c:
                    publish_done(sync, settings, "job_c")
                    if await wait_for(c, 0.3):
                        break
            else:
                raise AssertionError("no notification after the connection was killed")
        finally:
            await listener.stop()
            await client.aclose()

    asyncio.run(scenario())


def test_a_revoked_key_stops_working_within_the_cache_ttl(stack: Stack) -> None:
    for ttl, still_ok_right_after in ((0.0, False), (1.0, True)):
        settings = stack.settings.model_copy(update={"auth_cache_ttl_s": ttl})
        headers = new_tenant_headers(stack)
        with TestClient(create_app(settings)) as client:
            assert client.get("/jobs", headers=headers).status_code == 200
            with transaction(stack.session_factory) as session:
                session.execute(
                    update(ApiKey)
                    .where(ApiKey.key_hash == hash_key(headers["Authorization"].split()[1]))
                    .values(revoked=True)
                )
            right_after = client.get("/jobs", headers=headers).status_code
            assert right_after == (200 if still_ok_right_after else 401)
            time.sleep(ttl + 0.1)
            assert client.get("/jobs", headers=headers).status_code == 401


def test_a_notification_carries_the_committed_outcome_or_says_only_look(stack: Stack) -> None:
    settings = stack.settings
    sync = redis.Redis.from_url(settings.redis_client_url)
    outcome = JobOutcome(
        status="succeeded", finished_at=utcnow(), result={"images": [{"id": "img_1"}]}
    )

    async def scenario() -> None:
        client = aioredis.Redis.from_url(settings.redis_client_url)
        listener = DoneListener(client, settings)
        await listener.start()
        try:
            with listener.waiting("job_o") as with_outcome, listener.waiting("job_b") as bare:
                publish_done(sync, settings, "job_o", outcome)
                publish_done(sync, settings, "job_b")
                assert await wait_for(with_outcome, 5.0) and await wait_for(bare, 5.0)
                assert with_outcome.outcome == outcome and bare.outcome is None
            # A message that isn't ours to read still wakes its waiter, which then reads SQL.
            for raw in ("job_x", "job_x ", "job_x {not json", 'job_x {"status": 1}'):
                with listener.waiting("job_x") as waiter:
                    sync.publish(channel(settings), raw)
                    assert await wait_for(waiter, 5.0) and waiter.outcome is None
        finally:
            await listener.stop()
            await client.aclose()

    asyncio.run(scenario())
