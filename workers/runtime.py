"""Per-process worker state: the SQL session factory, the artifact store, the heartbeat.

Built once per worker process (Celery's worker_process_init / worker_init), never per task.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import redis
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings, get_settings
from service.db import make_engine, make_session_factory, process_id, unit_of_work, utcnow
from service.jobs import dispatch, lifecycle
from service.jobs.lifecycle import LeasedJob
from service.models import Job, Worker
from service.queue import QUEUES, TaskSender
from service.storage import ArtifactStore

log = logging.getLogger("lorastack.worker")


@dataclass
class WorkerRuntime:
    settings: Settings
    session_factory: sessionmaker[Session]
    store: ArtifactStore
    sender: TaskSender
    worker_id: str = field(default_factory=process_id)
    queues: tuple[str, ...] = QUEUES
    current_job_id: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _next_dispatch_check: float = 0.0

    def register(self) -> None:
        import socket

        with unit_of_work(self.session_factory) as session:
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
        with unit_of_work(self.session_factory) as session:
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
        for job in requeued:
            log.warning("requeued job %s after its worker was lost", job.job_id)
            self.sender.send_job(job_id=job.job_id, kind=job.kind, queue=job.queue)
        if time.monotonic() >= self._next_dispatch_check:
            self._next_dispatch_check = time.monotonic() + self.settings.dispatch_check_s
            self.resend_lost_messages()

    def resend_lost_messages(self) -> int:
        """Re-send queued jobs whose message is gone (service/jobs/dispatch.py); returns how
        many were sent. One worker does it per check interval (a Redis lock), so a fleet of
        workers doesn't send a surplus each."""
        lock = f"{self.settings.redis_key_prefix}lorastack:dispatch-check"
        ttl_ms = max(int(self.settings.dispatch_check_s * 1000) - 50, 1)
        try:
            if not self.redis.set(lock, self.worker_id, nx=True, px=ttl_ms):
                return 0
            counts = {queue: self.sender.queued_messages(queue) for queue in QUEUES}
        except Exception as exc:  # Redis down: nothing can be sent now; the next check retries
            log.warning("dispatch check skipped: %s", exc)
            return 0
        with unit_of_work(self.session_factory) as session:
            lost = [
                (queue, job_id, kind)
                for queue, messages in counts.items()
                for job_id, kind in dispatch.jobs_to_resend(
                    session,
                    queue=queue,
                    messages=messages,
                    older_than_s=self.settings.dispatch_resend_after_s,
                )
            ]
        for queue, job_id, kind in lost:
            self.sender.send_job(job_id=job_id, kind=kind, queue=queue)
        if lost:
            log.warning("re-sent %d queued job(s) that had no message", len(lost))
        return len(lost)

    @functools.cached_property
    def redis(self) -> redis.Redis:
        """One Redis client (connection pool) per process, for job-done notifications."""
        return redis.Redis.from_url(self.settings.redis_client_url)

    def lease_fair(
        self, session: Session, *, kind: str, base_model: str | None, hint_job_id: str
    ) -> LeasedJob | None:
        """On a message for ``hint_job_id``, lease the queued job of ``kind`` (and
        ``base_model``) that is fairest to run next, which may be another one; the message's
        own job only when no fair pick exists (e.g. it is for a base model this worker does
        not serve, so that it still gets its answer). None when nothing is queued."""
        for _ in range(5):  # another worker may lease our pick first: pick again
            job_id = dispatch.next_fair_job(
                session,
                kind=kind,
                base_model=base_model,
                max_running=self.settings.tenant_max_running(kind),
            )
            if job_id is None:
                break
            job = lifecycle.take_lease(
                session, job_id=job_id, owner=self.worker_id, lease_s=self.settings.job_lease_s
            )
            if job is not None:
                return job
        if base_model is None:
            return None
        # The message's job, if it is for a base model this worker doesn't serve (it is leased
        # to be failed with base_model_unavailable rather than wait for a worker that serves it).
        hint_model = session.scalar(select(Job.base_model).where(Job.id == hint_job_id))
        if hint_model is None or hint_model == base_model:
            return None
        return lifecycle.take_lease(
            session, job_id=hint_job_id, owner=self.worker_id, lease_s=self.settings.job_lease_s
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
            with unit_of_work(self.session_factory) as session:
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
        _runtime = WorkerRuntime(
            settings=settings,
            session_factory=make_session_factory(engine),
            store=ArtifactStore(settings.resolved_artifact_dir),
            sender=TaskSender(current_app),
        )
    return _runtime
