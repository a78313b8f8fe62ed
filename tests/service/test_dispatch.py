"""Fair lease order, tenant quotas, lost-message re-sends and the request rate, on real SQL and
Redis (the API in-process; no worker needed)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from service import dispatch, lifecycle
from service.app import create_app
from service.auth import get_or_create_tenant
from service.db import transaction, utcnow
from service.models import Job
from tests.conftest import Stack, new_tenant_headers
from tests.service.test_app import assert_problem


def _tenant(stack: Stack) -> str:
    with transaction(stack.session_factory) as session:
        return get_or_create_tenant(session, f"fair-{secrets.token_hex(4)}").id


def _queue_jobs(stack: Stack, tenant_id: str, count: int, *, base_model: str) -> list[str]:
    with transaction(stack.session_factory) as session:
        return [
            lifecycle.create_job(
                session,
                tenant_id=tenant_id,
                kind="generate",
                queue="generate",
                base_model=base_model,
            ).id
            for _ in range(count)
        ]


def _lease_next(stack: Stack, base_model: str, max_running: int | None = None) -> str | None:
    """What a worker does on a message: pick fairly, lease, and finish the job at once."""
    with transaction(stack.session_factory) as session:
        job_id = dispatch.next_fair_job(
            session, kind="generate", base_model=base_model, max_running=max_running
        )
        if job_id is None:
            return None
        leased = lifecycle.take_lease(session, job_id=job_id, owner="w:1", lease_s=30)
        assert leased is not None
    return job_id


def _finish(stack: Stack, job_id: str) -> None:
    from service.models import JobStatus

    with transaction(stack.session_factory) as session:
        lifecycle.finish_job(session, job_id=job_id, owner="w:1", status=JobStatus.SUCCEEDED)


def test_a_flooding_tenant_delays_another_by_at_most_one_job(stack: Stack) -> None:
    model = f"bm-{secrets.token_hex(4)}"
    flood, other = _tenant(stack), _tenant(stack)
    flooded = _queue_jobs(stack, flood, 30, base_model=model)
    first = _lease_next(stack, model)
    assert first == flooded[0]  # oldest first while one tenant waits
    _finish(stack, first)
    second = _lease_next(stack, model)  # running while the other tenant's request comes in
    [theirs] = _queue_jobs(stack, other, 1, base_model=model)
    _finish(stack, second or "")
    # The flooder has started jobs, the other tenant none: its job is next, not 29th.
    assert _lease_next(stack, model) == theirs
    _finish(stack, theirs)
    # Round robin between tenants that both wait; within a tenant, oldest first.
    more = _queue_jobs(stack, other, 2, base_model=model)
    order = []
    for _ in range(4):
        job_id = _lease_next(stack, model)
        assert job_id is not None
        order.append(job_id)
        _finish(stack, job_id)
    assert order == [flooded[2], more[0], flooded[3], more[1]]


def test_fewest_running_first_and_the_running_cap(stack: Stack) -> None:
    model = f"bm-{secrets.token_hex(4)}"
    busy, idle = _tenant(stack), _tenant(stack)
    busy_jobs = _queue_jobs(stack, busy, 3, base_model=model)
    assert _lease_next(stack, model) == busy_jobs[0]  # running, not finished
    [idle_job] = _queue_jobs(stack, idle, 1, base_model=model)
    assert _lease_next(stack, model) == idle_job  # no running jobs beats an older job
    # With a running cap of 1, both tenants are at it: nothing is leased.
    assert _lease_next(stack, model, max_running=1) is None
    _finish(stack, idle_job)
    assert _lease_next(stack, model, max_running=1) is None  # busy still runs one, idle waits none
    assert _lease_next(stack, model, max_running=2) == busy_jobs[1]


def test_jobs_without_a_message_are_resent_oldest_first(stack: Stack) -> None:
    tenant_id = _tenant(stack)
    queue = f"q-{secrets.token_hex(4)}"
    with transaction(stack.session_factory) as session:
        ids = [
            lifecycle.create_job(session, tenant_id=tenant_id, kind="generate", queue=queue).id
            for _ in range(4)
        ]
        # Three queued a while ago, one just now (its message may still be on its way).
        for age, job_id in zip((30, 20, 10), ids, strict=False):
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(queued_at=utcnow() - timedelta(seconds=age))
            )
    with stack.session_factory() as session:

        def resend(messages: int) -> list[str]:
            found = dispatch.jobs_to_resend(session, queue=queue, messages=messages, older_than_s=5)
            return [job_id for job_id, _ in found]

        assert resend(0) == ids[:3]  # Redis restarted empty
        assert resend(1) == ids[:2]
        assert resend(3) == []  # as many messages as jobs: nothing lost
        assert resend(10) == []


def _client(stack: Stack, **settings: object) -> Iterator[TestClient]:
    with TestClient(create_app(stack.settings.model_copy(update=settings))) as client:
        yield client


@pytest.fixture
def quota_client(stack: Stack) -> Iterator[TestClient]:
    yield from _client(stack, tenant_max_queued_generate=2, quota_retry_after_s=7)


@pytest.fixture
def rate_client(stack: Stack) -> Iterator[TestClient]:
    yield from _client(stack, rate_limit_per_s=2.0, rate_limit_burst=4)


def test_queued_quota_answers_429_naming_the_limit(quota_client: TestClient, stack: Stack) -> None:
    strict_client = quota_client
    auth = new_tenant_headers(stack)
    body = {"prompt": "a red square", "num_inference_steps": 2, "wait": 0}
    # A live worker of another test may lease one of them meanwhile (it is no longer queued
    # then), so post until refused: the quota counts queued jobs only.
    answers = []
    for _ in range(6):
        answers.append(strict_client.post("/generate", headers=auth, json=body))
        if answers[-1].status_code != 202:
            break
    accepted, refused = answers[:-1], answers[-1]
    assert len(accepted) >= 2 and all(a.status_code == 202 for a in accepted)
    problem = assert_problem(refused, 429, "quota_exceeded")
    assert refused.headers["retry-after"] == "7"
    assert problem["limit"] == {
        "name": "LORASTACK_TENANT_MAX_QUEUED_GENERATE",
        "value": 2,
        "current": 2,
    }
    # Nothing was stored for the refused request; another tenant is not affected.
    jobs = strict_client.get("/jobs?kind=generate", headers=auth).json()["data"]
    assert len(jobs) == len(accepted)
    other = new_tenant_headers(stack)
    assert strict_client.post("/generate", headers=other, json=body).status_code == 202
    for job in jobs:
        strict_client.post(f"/jobs/{job['id']}/cancel", headers=auth)


def test_request_rate_per_key_answers_429_with_ratelimit_headers(
    rate_client: TestClient, stack: Stack
) -> None:
    strict_client = rate_client
    auth = new_tenant_headers(stack)
    answers = [strict_client.get("/jobs", headers=auth) for _ in range(4)]
    assert [a.status_code for a in answers] == [200] * 4
    assert answers[0].headers["ratelimit-policy"] == '"per-key";q=4;w=2'
    assert answers[0].headers["ratelimit"].startswith('"per-key";r=3;')
    refused = strict_client.get("/jobs", headers=auth)
    problem = assert_problem(refused, 429, "rate_limited")
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["ratelimit"].startswith('"per-key";r=0;')
    assert problem["limit"]["name"] == "LORASTACK_RATE_LIMIT_PER_S"
    # Another key has its own bucket; this one refills at the rate.
    assert strict_client.get("/jobs", headers=new_tenant_headers(stack)).status_code == 200
    time.sleep(0.6)
    assert strict_client.get("/jobs", headers=auth).status_code == 200


def test_generation_size_is_limited_relative_to_the_native_size(
    client: TestClient, auth: dict[str, str]
) -> None:
    # The tiny model's native side is 64 px: at most 2x the side and 4x the pixels.
    for size, setting in (
        ({"width": 256, "height": 256}, "GENERATE_MAX_SIDE_FACTOR"),
        ({"width": 2048, "height": 512}, "GENERATE_MAX_SIDE_FACTOR"),
        ({"width": 136, "height": 128}, "GENERATE_MAX_SIDE_FACTOR"),
    ):
        body = {"prompt": "x", "wait": 0, **size}
        problem = assert_problem(
            client.post("/generate", headers=auth, json=body), 422, "limit_exceeded"
        )
        assert setting in problem["detail"]
    refused = client.post(
        "/v1/images/generations", headers=auth, json={"prompt": "x", "size": "256x256"}
    )
    # The OpenAI route answers errors in OpenAI's shape.
    assert refused.status_code in (400, 422), refused.text
    assert "GENERATE_MAX_SIDE_FACTOR" in refused.text
    assert client.get("/jobs?kind=generate", headers=auth).json()["data"] == []


def test_a_training_run_over_the_workers_memory_answers_422_with_the_plan(stack: Stack) -> None:
    from tests.conftest import upload_dataset

    for client in _client(stack, train_max_memory_bytes=1024):
        auth = new_tenant_headers(stack)
        dataset_id = upload_dataset(client, auth, count=2)
        body = {
            "dataset_id": dataset_id,
            "adapter_name": "too-big",
            "hyperparameters": {"resolution": 64, "rank": 4, "max_steps": 2},
        }
        problem = assert_problem(
            client.post("/jobs", headers=auth, json=body), 422, "plan_over_memory"
        )
        assert problem["plan"]["peak_memory_bytes"] > 1024
        assert problem["limit"] == {"name": "LORASTACK_TRAIN_MAX_MEMORY_BYTES", "value": 1024}
        assert client.get("/jobs", headers=auth).json()["data"] == []


def _candidate(job_id: str, tenant: str, *files: str, images: int = 1) -> dispatch.BatchCandidate:
    return dispatch.BatchCandidate(
        id=job_id, tenant_id=tenant, images=images, adapter_files=frozenset(files)
    )


def test_batch_mates_round_robin_across_tenants_within_the_limits() -> None:
    first = _candidate("a1", "A", "x")
    candidates = [  # oldest first
        _candidate("a2", "A", "y"),
        _candidate("a3", "A"),
        _candidate("a4", "A", "x"),
        _candidate("b1", "B", "z"),  # a third file: over the slots once x and y are in
        _candidate("b2", "B", "x", images=2),
        _candidate("c1", "C", "y"),
    ]

    def choose(max_images: int, max_files: int) -> list[str]:
        return dispatch.choose_batch_mates(
            [first], candidates, max_images=max_images, max_adapter_files=max_files
        )

    # Other tenants before the leased job's own; each tenant's oldest that fits, in turn.
    assert choose(8, 3) == ["b1", "c1", "a2", "b2", "a3", "a4"]
    # The union of adapter files stays within the slots: once b1 brought z next to x, no job
    # with y fits (c1, a2 are skipped), jobs with x or none still do.
    assert choose(8, 2) == ["b1", "a3", "b2", "a4"]
    # The image limit counts num_images: b2 (2 images) does not fit the last free image.
    assert choose(4, 2) == ["b1", "a3", "a4"]
    assert choose(3, 1) == ["b2"]
    assert choose(1, 4) == []
    # The batch so far counts: its images and its files.
    mates = [first, _candidate("d1", "D", "y", images=3)]
    assert dispatch.choose_batch_mates(mates, candidates, max_images=4, max_adapter_files=8) == []
    assert dispatch.choose_batch_mates(mates, candidates, max_images=5, max_adapter_files=3) == [
        "b1"
    ]


def test_batch_mates_stop_at_a_tenants_running_cap() -> None:
    first = _candidate("a1", "A")
    candidates = [_candidate(f"b{i}", "B") for i in range(4)] + [_candidate("a2", "A")]

    chosen = dispatch.choose_batch_mates(
        [first],
        candidates,
        max_images=8,
        max_adapter_files=4,
        running={"A": 1, "B": 1},
        max_running=3,
    )

    # B had 1 running: 2 more; A had 1 (the leased job): 1 more.
    assert chosen == ["b0", "a2", "b1"]
