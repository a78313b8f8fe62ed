"""Shared fixtures: a real database (PostgreSQL or SQLite), a real Redis, real worker processes.

With LORASTACK_TEST_DATABASE_URL / LORASTACK_TEST_REDIS_URL set (CI does), the suite runs on
those servers: a fresh database is created for the session and dropped after, and every broker
key gets a per-session prefix. Without them it uses SQLite and an embedded Redis, as
`lorastack serve` does by default.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported anywhere in the suite

from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from service.app import create_app
from service.auth import create_api_key
from service.config import Settings, normalize_database_url
from service.db import make_engine, make_session_factory, transaction
from service.embedded_redis import EmbeddedRedis
from service.models import Worker

REPO = Path(__file__).resolve().parents[1]
TEST_DB_URL = os.environ.get("LORASTACK_TEST_DATABASE_URL")
TEST_REDIS_URL = os.environ.get("LORASTACK_TEST_REDIS_URL")


def migrate_url(url: str) -> None:
    """alembic upgrade head, exactly as `lorastack migrate` does."""
    from alembic import command
    from alembic.config import Config

    config = Config(str(REPO / "alembic.ini"))
    config.attributes["database_url"] = url
    config.attributes["configure_logger"] = False
    command.upgrade(config, "head")


def create_postgres_database(server_url: str) -> str:
    """Create an empty database next to the one ``server_url`` names; returns its URL."""
    url = make_url(normalize_database_url(server_url))
    name = f"lorastack_t_{secrets.token_hex(4)}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return url.set(database=name).render_as_string(hide_password=False)


def drop_postgres_database(db_url: str) -> None:
    url = make_url(db_url)
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)'))
    admin.dispose()


@dataclass
class Stack:
    """Everything a test needs to reach the same servers the API and workers use."""

    settings: Settings
    env: dict[str, str]
    database_url: str
    session_factory: sessionmaker[Session]
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start_worker(
        self,
        *,
        queues: str = "train,generate",
        extra_env: dict[str, str] | None = None,
        log_name: str = "worker",
    ) -> subprocess.Popen[bytes]:
        """Start a real `lorastack worker` process and wait for its first heartbeat row."""
        log = open(self.settings.data_dir / f"{log_name}-{len(self.workers)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lorastack.cli",
                "worker",
                "--queues",
                queues,
                "--log-level",
                "warning",
            ],
            env={**self.env, **(extra_env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.workers.append(proc)
        wait_for(
            lambda: self.worker_row(proc.pid) is not None,
            timeout=60,
            what=f"worker {proc.pid} to register",
            proc=proc,
        )
        return proc

    def worker_row(self, pid: int) -> Worker | None:
        with self.session_factory() as session:
            return session.scalar(select(Worker).where(Worker.id.endswith(f":{pid}")))

    def stop_worker(self, proc: subprocess.Popen[bytes], *, sig: int = signal.SIGTERM) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc in self.workers:
            self.workers.remove(proc)


def wait_for(
    predicate,
    *,
    timeout: float,
    what: str,
    interval: float = 0.1,  # type: ignore[no-untyped-def]
    proc: subprocess.Popen[bytes] | None = None,
):
    """Poll until predicate() is truthy; fail with a clear message (never a bare hang)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} while waiting for {what}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workers.engine.model_builder import build_pipeline_folder

    return build_pipeline_folder("tiny", tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("stack")
    embedded: EmbeddedRedis | None = None
    if TEST_DB_URL:
        database_url = create_postgres_database(TEST_DB_URL)
    else:
        database_url = f"sqlite:///{data_dir / 'lorastack.db'}"
    env = {
        **os.environ,
        "LORASTACK_ENV": "test",
        "LORASTACK_DATA_DIR": str(data_dir),
        "LORASTACK_DATABASE_URL": database_url,
        "LORASTACK_BASE_MODELS": json.dumps({"tiny": str(tiny_model_dir)}),
        "LORASTACK_WORKER_HEARTBEAT_S": "0.5",
        "LORASTACK_WORKER_STALE_S": "5",
        "LORASTACK_JOB_LEASE_S": "4",
        "PYTHONUNBUFFERED": "1",
        # Tiny models on a shared 2-core machine: one thread per process is several times faster.
        "OMP_NUM_THREADS": "1",
    }
    if TEST_REDIS_URL:
        env["LORASTACK_REDIS_URL"] = TEST_REDIS_URL
        env["LORASTACK_REDIS_KEY_PREFIX"] = f"lorastack-test-{secrets.token_hex(4)}:"
    else:
        env.pop("LORASTACK_REDIS_URL", None)
        embedded = EmbeddedRedis(socket_path=data_dir / "redis.sock", data_dir=data_dir)
        embedded.start()
    settings = Settings(
        **{
            k[len("LORASTACK_") :].lower(): v
            for k, v in env.items()
            if k.startswith("LORASTACK_") and not k.startswith("LORASTACK_TEST_")
        }
    )
    migrate_url(settings.resolved_database_url)
    engine = make_engine(settings.resolved_database_url)
    st = Stack(
        settings=settings,
        env=env,
        database_url=database_url,
        session_factory=make_session_factory(engine),
    )
    try:
        yield st
    finally:
        for proc in list(st.workers):
            st.stop_worker(proc, sig=signal.SIGKILL)
        engine.dispose()
        if embedded is not None:
            embedded.stop()
        if TEST_DB_URL:
            drop_postgres_database(settings.resolved_database_url)


@pytest.fixture(scope="session")
def client(stack: Stack) -> Iterator[TestClient]:
    with TestClient(create_app(stack.settings)) as test_client:
        yield test_client


@pytest.fixture
def worker(stack: Stack) -> subprocess.Popen[bytes]:
    """A live real worker process (both queues), shared by tests while it stays alive."""
    for proc in stack.workers:
        if proc.poll() is None:
            return proc
    return stack.start_worker()


def new_tenant_headers(stack: Stack) -> dict[str, str]:
    with transaction(stack.session_factory) as session:
        secret = create_api_key(session, tenant_name=f"tenant-{secrets.token_hex(4)}")
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def auth(stack: Stack) -> dict[str, str]:
    """Headers for a fresh tenant: tests are isolated by tenancy, as users are."""
    return new_tenant_headers(stack)


@pytest.fixture
def other_auth(stack: Stack) -> dict[str, str]:
    return new_tenant_headers(stack)


def make_pairs_zip(count: int = 6, *, size: int = 64) -> bytes:
    """A small dataset zip in the pairs layout: distinct coloured shapes with captions."""
    import io
    import zipfile

    from PIL import Image, ImageDraw

    colours = ["red", "green", "blue", "yellow", "purple", "orange", "cyan", "white"]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(count):
            colour = colours[i % len(colours)]
            image = Image.new("RGB", (size, size), "black")
            draw = ImageDraw.Draw(image)
            inset = 8 + (i % 3) * 4
            draw.rectangle([inset, inset, size - inset, size - inset], fill=colour)
            png = io.BytesIO()
            image.save(png, format="PNG")
            archive.writestr(f"img_{i:02d}.png", png.getvalue())
            archive.writestr(f"img_{i:02d}.txt", f"a {colour} square")
    return buffer.getvalue()


def upload_dataset(client: TestClient, auth: dict[str, str], *, count: int = 6) -> str:
    response = client.post(
        "/datasets",
        headers=auth,
        data={"name": "squares"},
        files={"file": ("squares.zip", make_pairs_zip(count), "application/zip")},
    )
    assert response.status_code == 201, response.text
    dataset_id: str = response.json()["id"]
    return dataset_id
