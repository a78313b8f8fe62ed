"""Durable dispatch, fairness, cancel and SDK retries with real worker processes.

The Redis outage test runs its own redis-server on a free port (killed and restarted empty),
so the suite's shared Redis is never touched.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.app import create_app
from service.models import Job, JobEvent
from tests.conftest import Stack, new_tenant_headers, upload_dataset, wait_for
from tests.workers.test_training_jobs import FAST, wait_status

FINAL = {"succeeded", "failed", "cancelled"}
# Settings shortened for the tests: a queued job with no message is re-sent within ~1.5 s.
DISPATCH_ENV = {"LORASTACK_DISPATCH_CHECK_S": "0.5", "LORASTACK_DISPATCH_RESEND_AFTER_S": "1"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """A redis-server of the test's own, without persistence: a restart comes back empty."""

    def __init__(self, data_dir: str) -> None:
        self.port = _free_port()
        self.data_dir = data_dir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        from service.embedded_redis import EmbeddedRedis

        exe = shutil.which("redis-server") or EmbeddedRedis.executable()
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.data_dir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        wait_for(lambda: _answers(client), timeout=10, what="redis-server to answer")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture
def private_redis(stack: Stack) -> Iterator[PrivateRedis]:
    server = PrivateRedis(str(stack.settings.data_dir))
    server.start()
    try:
        yield server
    finally:
        server.kill()


def _jobs(stack: Stack, ids: list[str]) -> list[Job]:
    with stack.session_factory() as session:
        return list(session.scalars(select(Job).where(Job.id.in_(ids))).all())


def _running_events(stack: Stack, job_id: str) -> int:
    with stack.session_factory() as session:
        events = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id)).all()
        return sum(1 for e in events if e.data.get("status") == "running")


def _stop_other_workers(stack: Stack) -> None:
    """The shared workers would lease these jobs too (same database): keep them out."""
    for proc in list(stack.workers):
        stack.stop_worker(proc)


def test_jobs_queued_before_redis_restarts_empty_all_run_exactly_once(
    stack: Stack, private_redis: PrivateRedis
) -> None:
    _stop_other_workers(stack)
    env = {
        "LORASTACK_REDIS_URL": private_redis.url,
        "LORASTACK_REDIS_KEY_PREFIX": "",
        **DISPATCH_ENV,
    }
    settings = stack.settings.model_copy(
        update={"redis_url": private_redis.url, "redis_key_prefix": "", "dispatch_check_s": 0.5}
    )
    proc = stack.start_worker(extra_env=env, log_name="worker-outage")
    try:
        with TestClient(create_app(settings)) as client:
            auth = new_tenant_headers(stack)
            dataset_id = upload_dataset(client, auth, count=2)
            for queue in ("train", "generate"):  # consuming both queues (warm-up done)
                pong = client.post(f"/ping?queue={queue}&wait=60", headers=auth).json()
                assert pong["status"] == "succeeded", pong
            os.killpg(proc.pid, signal.SIGSTOP)  # busy elsewhere: jobs wait in Redis
            train = {"dataset_id": dataset_id, "hyperparameters": {**FAST, "max_steps": 2}}
            gen = {"prompt": "a red square", "num_inference_steps": 2, "wait": 0}
            ids = [
                client.post("/jobs", headers=auth, json={**train, "adapter_name": "a"}).json()["id"]
            ]
            ids += [
                client.post("/generate", headers=auth, json={**gen, "seed": i}).json()["id"]
                for i in range(3)
            ]
            private_redis.kill()
            # Redis down: the API accepts (the row is committed), it never answers 500.
            started = time.monotonic()
            during = [
                client.post("/jobs", headers=auth, json={**train, "adapter_name": "b"}),
                client.post("/generate", headers=auth, json={**gen, "seed": 9}),
            ]
            assert [r.status_code for r in during] == [201, 202], [r.text for r in during]
            assert time.monotonic() - started < 10  # a failed publish gives up quickly
            ids += [r.json()["id"] for r in during]

            private_redis.start()  # empty: every message above is gone
            back = time.monotonic()
            os.killpg(proc.pid, signal.SIGCONT)
            broker = redis.Redis.from_url(private_redis.url)

            def delivered() -> bool:
                """Every job has a message in Redis again, or has started."""
                started = sum(1 for j in _jobs(stack, ids) if j.started_at is not None)
                return broker.llen("train") + broker.llen("generate") + started >= len(ids)

            wait_for(delivered, timeout=60, what="messages for every job", interval=0.05)
            recovery_s = time.monotonic() - back
            print(f"every queued job delivered {recovery_s:.2f} s after Redis returned")
            # Bound: a check interval (0.5 s) + the re-send grace (1 s) + scheduling slack.
            assert recovery_s < 6
            wait_for(
                lambda: all(j.status in FINAL for j in _jobs(stack, ids)),
                timeout=180,
                what="every job to finish after Redis came back",
                interval=0.25,
                proc=proc,
            )
            jobs = _jobs(stack, ids)
            assert {j.status for j in jobs} == {"succeeded"}, [
                (j.id, j.error_message) for j in jobs
            ]
            assert [j.attempts for j in jobs] == [1] * len(ids)
            assert [_running_events(stack, j.id) for j in jobs] == [1] * len(ids)
    finally:
        with _suppress_lookup():
            os.killpg(proc.pid, signal.SIGCONT)
        stack.stop_worker(proc)


class _suppress_lookup:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is ProcessLookupError


def _warm(client: TestClient, auth: dict[str, str]) -> None:
    """Wait until the worker consumes (it loads its model first), so timings measure work."""
    wait_for(
        lambda: (
            client.post("/ping?queue=generate&wait=30", headers=auth).json()["status"]
            == "succeeded"
        ),
        timeout=240,
        what="the worker to answer a ping",
    )


def _generate(client: TestClient, auth: dict[str, str], **body: Any) -> tuple[str, str]:
    """(job id, status) of a /generate request (202 answers the job, 200 the images)."""
    answer = client.post(
        "/generate", headers=auth, json={"prompt": "a red square", "wait": 0, **body}
    )
    assert answer.status_code in (200, 202), answer.text
    data: dict[str, Any] = answer.json()
    return data.get("job_id") or data["id"], data["status"]


def test_a_flooding_tenant_delays_another_tenant_by_at_most_one_job(
    client: TestClient, stack: Stack, worker: subprocess.Popen[bytes]
) -> None:
    flood, other = new_tenant_headers(stack), new_tenant_headers(stack)
    _warm(client, flood)
    # Distinct guidance scales: no two jobs share a pipeline call (no batching).
    slow = {"num_inference_steps": 12, "width": 64, "height": 64}
    flooded = [_generate(client, flood, guidance_scale=1.0 + i / 10, **slow)[0] for i in range(10)]
    wait_for(
        lambda: client.get(f"/jobs/{flooded[0]}", headers=flood).json()["status"] != "queued",
        timeout=120,
        what="the flood to start",
    )
    theirs, _ = _generate(client, other, **slow)
    done = wait_status(client, other, theirs, FINAL, timeout=120)
    assert done["status"] == "succeeded"
    ran = _jobs(stack, flooded)
    their_start = _jobs(stack, [theirs])[0].started_at
    their_queued = _jobs(stack, [theirs])[0].queued_at
    assert their_start is not None
    ahead = [j for j in ran if j.started_at and their_queued < j.started_at < their_start]
    waited = (their_start - their_queued).total_seconds()
    print(f"other tenant waited {waited:.2f} s behind {len(ahead)} of the flood's jobs")
    # At most the job that was about to start when the request came in; FIFO would be ~9.
    assert len(ahead) <= 1, len(ahead)
    for job_id in flooded:
        client.post(f"/jobs/{job_id}/cancel", headers=flood)


def test_cancel_stops_a_running_generation_and_frees_the_worker(
    client: TestClient, auth: dict[str, str], worker: subprocess.Popen[bytes]
) -> None:
    _warm(client, auth)
    job_id, _ = _generate(client, auth, num_inference_steps=150, width=64, height=64, num_images=4)
    wait_for(
        lambda: client.get(f"/jobs/{job_id}", headers=auth).json()["progress"].get("step", 0) >= 1,
        timeout=120,
        what="generation to report progress",
    )
    progress = client.get(f"/jobs/{job_id}", headers=auth).json()["progress"]
    assert progress["total_steps"] >= 150 and progress["images_total"] == 4
    asked = time.monotonic()
    client.post(f"/jobs/{job_id}/cancel", headers=auth)
    final = wait_status(client, auth, job_id, FINAL, timeout=60)
    stopped_s = time.monotonic() - asked
    assert final["status"] == "cancelled" and not final.get("result")
    assert stopped_s < 5, stopped_s
    # The worker is free: the next request is answered.
    assert _generate(client, auth, num_inference_steps=2, wait=30)[1] == "succeeded"


def test_an_sdk_retry_waits_for_the_first_attempts_job(
    stack: Stack, worker: subprocess.Popen[bytes]
) -> None:
    import openai

    settings = stack.settings.model_copy(update={"openai_wait_s": 0.5})
    with TestClient(create_app(settings)) as client:
        auth = new_tenant_headers(stack)
        _warm(client, auth)
        sdk = openai.OpenAI(
            api_key=auth["Authorization"].split()[1],
            base_url="http://testserver/v1",
            http_client=client,
            max_retries=40,
        )
        # Longer than the route's wait: the first attempt answers 503, the SDK retries.
        result = sdk.with_options(timeout=60).images.generate(
            model="tiny",
            prompt="a red square",
            size="64x64",
            extra_body={"num_inference_steps": 20},
        )
        assert result.data and result.data[0].url
        jobs = client.get("/jobs?kind=generate", headers=auth).json()["data"]
        assert len(jobs) == 1 and jobs[0]["status"] == "succeeded"
        took = datetime.fromisoformat(jobs[0]["finished_at"]) - datetime.fromisoformat(
            jobs[0]["created_at"]
        )
        assert took.total_seconds() > 0.5  # so the answer came to a retry, not the first attempt
        # A deliberate repeat (a first attempt, not a retry) runs again.
        sdk.with_options(timeout=60).images.generate(
            model="tiny",
            prompt="a red square",
            size="64x64",
            extra_body={"num_inference_steps": 20},
        )
        assert len(client.get("/jobs?kind=generate", headers=auth).json()["data"]) == 2
