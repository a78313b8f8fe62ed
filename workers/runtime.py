"""Per-process worker state: the SQL session factory, the artifact store, the heartbeat.

Built once per worker process, on first use (the solo pool runs every task in the process
that built it), never per task.
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import redis
from sqlalchemy import delete, update
from sqlalchemy.orm import Session, sessionmaker

from service import lifecycle
from service.config import Settings, get_settings
from service.db import make_engine, make_session_factory, process_id, transaction, utcnow
from service.lifecycle import LeasedJob
from service.models import Worker
from service.queue import QUEUES, TaskSender, send_after_commit
from service.storage import ArtifactStore

log = logging.getLogger("lorastack.worker")


@dataclass
class WorkerRuntime:
    settings: Settings
    session_factory: sessionmaker[Session]
    store: ArtifactStore
    worker_id: str = field(default_factory=process_id)
    queues: tuple[str, ...] = QUEUES
    current_job_id: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def register(self) -> None:
        import socket

        with transaction(self.session_factory) as session:
            session.merge(
                Worker(
                    id=self.worker_id,
                    hostname=socket.gethostname(),
                    queues=list(self.queues),
                    base_model=self.settings.default_base_model,
                    device=self.info.get("device"),
                    info=self.info,
                    started_at=utcnow(),
                    heartbeat_at=utcnow(),
                )
            )

    def beat(self) -> None:
        """One heartbeat: refresh our worker row, renew the current job's lease, reap the dead."""
        job_id = self.current_job_id
        with transaction(self.session_factory) as session:
            session.execute(
                update(Worker)
                .where(Worker.id == self.worker_id)
                .values(heartbeat_at=utcnow(), current_job_id=job_id, info=dict(self.info))
            )
            if job_id:
                lifecycle.renew_lease(
                    session,
                    job_id=job_id,
                    owner=self.worker_id,
                    lease_s=self.settings.job_lease_s,
                )
            requeued = lifecycle.reap_stale_jobs(session)
            cutoff = utcnow() - timedelta(seconds=self.settings.worker_stale_s * 10)
            session.execute(delete(Worker).where(Worker.heartbeat_at < cutoff))
        for job in requeued:  # sent again by the commit above
            log.warning("requeued job %s after its worker was lost", job.job_id)

    @functools.cached_property
    def redis(self) -> redis.Redis:
        """One Redis client (connection pool) per process, for job-done notifications."""
        return redis.Redis.from_url(self.settings.redis_client_url)

    def lease(self, job_id: str) -> LeasedJob | None:
        """Take the job's lease (returns the job as leased), or None when it is not queued any
        more: a duplicate delivery, a job batched into another, or a cancelled one."""
        with transaction(self.session_factory) as session:
            return lifecycle.take_lease(
                session, job_id=job_id, owner=self.worker_id, lease_s=self.settings.job_lease_s
            )

    def start_heartbeat(self) -> None:
        self.register()
        self._thread = threading.Thread(target=self._run, name="lorastack-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.worker_heartbeat_s):
            try:
                self.beat()
            except Exception:  # a database blip must not kill the heartbeat thread
                log.exception("heartbeat failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            with transaction(self.session_factory) as session:
                session.execute(delete(Worker).where(Worker.id == self.worker_id))
        except Exception:
            log.exception("could not deregister worker")


_runtime: WorkerRuntime | None = None


def get_runtime() -> WorkerRuntime:
    """The process's runtime, created on first use."""
    global _runtime
    if _runtime is None:
        from celery import current_app

        settings = get_settings()
        engine = make_engine(settings.resolved_database_url)
        session_factory = make_session_factory(engine)
        send_after_commit(session_factory, TaskSender(current_app))
        _runtime = WorkerRuntime(
            settings=settings,
            session_factory=session_factory,
            store=ArtifactStore(settings.resolved_artifact_dir),
        )
    return _runtime
