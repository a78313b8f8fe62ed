"""Per-process worker state: the SQL session factory, the artifact store, the heartbeat.

Built once per worker process, on first use (the solo pool runs every task in the process
that built it), never per task.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import redis
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from service import dispatch, lifecycle
from service.config import Settings, get_settings
from service.db import make_engine, make_session_factory, process_id, transaction, utcnow
from service.lifecycle import LeasedJob
from service.models import Job, Worker
from service.queue import QUEUES, TaskSender, send_after_commit
from service.storage import ArtifactStore

log = logging.getLogger("lorastack.worker")


class BackgroundSender(TaskSender):
    """Sends from the worker's dispatch thread: a commit in the heartbeat (the reaper's
    requeues) only hands the message over, so a slow or absent Redis never delays a lease
    renewal (a late one would reap our own job)."""

    def __init__(self, sender: TaskSender) -> None:
        self.sender = sender
        self.pending: queue.SimpleQueue[tuple[str, str, str]] = queue.SimpleQueue()

    def send(self, task: str, *, job_id: str, queue: str) -> bool:
        self.pending.put((task, job_id, queue))
        return True

    def flush(self) -> None:
        while True:
            try:
                task, job_id, queue_name = self.pending.get_nowait()
            except queue.Empty:
                return
            self.sender.send(task, job_id=job_id, queue=queue_name)


@dataclass
class WorkerRuntime:
    settings: Settings
    session_factory: sessionmaker[Session]
    store: ArtifactStore
    sender: TaskSender
    background: BackgroundSender
    worker_id: str = field(default_factory=process_id)
    queues: tuple[str, ...] = QUEUES
    current_job_id: str | None = None
    # Every job this process holds a lease on (a generation batch leases several).
    held_job_ids: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _next_dispatch_check: float = 0.0

    def hold(self, job_ids: list[str]) -> None:
        """Mark the jobs this process now runs (their leases are renewed by the heartbeat)."""
        self.held_job_ids = tuple(job_ids)
        self.current_job_id = job_ids[0] if job_ids else None

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
        """One heartbeat: refresh our worker row, renew our jobs' leases, reap the dead."""
        job_id, held = self.current_job_id, self.held_job_ids
        with transaction(self.session_factory) as session:
            session.execute(
                update(Worker)
                .where(Worker.id == self.worker_id)
                .values(heartbeat_at=utcnow(), current_job_id=job_id, info=dict(self.info))
            )
            for held_id in held:
                lifecycle.renew_lease(
                    session,
                    job_id=held_id,
                    owner=self.worker_id,
                    lease_s=self.settings.job_lease_s,
                )
            requeued = lifecycle.reap_stale_jobs(session)
            cutoff = utcnow() - timedelta(seconds=self.settings.worker_stale_s * 10)
            session.execute(delete(Worker).where(Worker.heartbeat_at < cutoff))
        for job in requeued:  # sent again by the commit above (from the dispatch thread)
            log.warning("requeued job %s after its worker was lost", job.job_id)

    def dispatch(self) -> None:
        """One round of the dispatch thread: send what commits handed over, and every
        dispatch_check_s re-send queued jobs whose message was lost."""
        self.background.flush()
        self.resend_lost_messages()

    def resend_lost_messages(self) -> int:
        """Re-send queued jobs whose message is gone (service/dispatch.py); returns how many
        were sent. One worker does it per check interval (a Redis lock), so a fleet of workers
        doesn't send a surplus each."""
        now = time.monotonic()
        if now < self._next_dispatch_check:
            return 0
        self._next_dispatch_check = now + self.settings.dispatch_check_s
        lock = f"{self.settings.redis_key_prefix}lorastack:dispatch-check"
        ttl_ms = max(int(self.settings.dispatch_check_s * 1000) - 50, 1)
        try:
            if not self.redis.set(lock, self.worker_id, nx=True, px=ttl_ms):
                return 0
            counts = {name: self.sender.queued_messages(name) for name in QUEUES}
        except Exception as exc:  # Redis down: nothing can be sent now; the next check retries
            log.warning("dispatch check skipped: %s", exc)
            return 0
        with transaction(self.session_factory) as session:
            lost = [
                (name, job_id, kind)
                for name, messages in counts.items()
                for job_id, kind in dispatch.jobs_to_resend(
                    session,
                    queue=name,
                    messages=messages,
                    older_than_s=self.settings.dispatch_resend_after_s,
                )
            ]
        sent = sum(
            self.sender.send_job(job_id=job_id, kind=kind, queue=name)
            for name, job_id, kind in lost
        )
        if sent:
            log.warning("re-sent %d queued job(s) that had no message", sent)
        return sent

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
        heartbeat_s = self.settings.worker_heartbeat_s
        for name, every, step in (
            ("lorastack-heartbeat", heartbeat_s, self.beat),
            ("lorastack-dispatch", min(heartbeat_s, self.settings.dispatch_check_s), self.dispatch),
        ):
            thread = threading.Thread(target=self._loop, args=(every, step), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _loop(self, every: float, step: Callable[[], None]) -> None:
        while not self._stop.wait(every):
            try:
                step()
            except Exception:  # a database or Redis blip must not kill the thread
                log.exception("%s failed", threading.current_thread().name)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
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
        sender = TaskSender(current_app, publish_timeout_s=settings.dispatch_publish_timeout_s)
        background = BackgroundSender(sender)
        send_after_commit(session_factory, background)
        _runtime = WorkerRuntime(
            settings=settings,
            session_factory=session_factory,
            store=ArtifactStore(settings.resolved_artifact_dir),
            sender=sender,
            background=background,
        )
    return _runtime
