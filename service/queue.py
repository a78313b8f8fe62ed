"""Celery configuration shared by the API (which only sends) and the workers, and the one
way a job's task is sent: after the transaction that created (or requeued) the job commits.

Tasks are sent by name with ids only; neither the API nor the lifecycle imports worker code.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from kombu import Exchange, Queue
from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.models import JobKind

TRAIN_QUEUE = "train"
GENERATE_QUEUE = "generate"
QUEUES = (TRAIN_QUEUE, GENERATE_QUEUE)

TASK_PING = "lorastack.ping"
TASK_TRAIN = "lorastack.train"
TASK_GENERATE = "lorastack.generate"
TASK_GRID = "lorastack.grid"

# Which task runs a job of each kind: a new kind is a new entry here.
TASK_FOR_KIND: dict[str, str] = {
    JobKind.TRAIN.value: TASK_TRAIN,
    JobKind.GENERATE.value: TASK_GENERATE,
    JobKind.PING.value: TASK_PING,
    JobKind.GRID.value: TASK_GRID,
}

log = logging.getLogger("lorastack.queue")


def celery_config(settings: Settings) -> dict[str, Any]:
    return {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            # Longer than the longest task; lost workers are recovered sooner by the SQL reaper.
            "visibility_timeout": settings.visibility_timeout_s,
            **(
                {"global_keyprefix": settings.redis_key_prefix} if settings.redis_key_prefix else {}
            ),
        },
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_queues": [
            Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES
        ],
        "task_default_queue": GENERATE_QUEUE,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "enable_utc": True,
    }


def make_celery(settings: Settings) -> Celery:
    app = Celery("lorastack")
    app.conf.update(celery_config(settings))
    return app


class TaskSender:
    """Sends tasks by name; the API's only contact with Celery.

    A send happens after the job's row is committed, so it must not fail the request: when
    Redis is down the job stays queued in SQL and a worker's re-send delivers it once Redis is
    back (service/jobs/dispatch.py). A publish gives up after about ``publish_timeout_s``.
    """

    def __init__(self, celery: Celery, *, publish_timeout_s: float = 1.0) -> None:
        self.celery = celery
        step = max(publish_timeout_s / 4, 0.05)
        self._retry_policy = {
            "max_retries": 3,
            "interval_start": 0,
            "interval_step": step,
            "interval_max": step,
        }

    def send(self, task: str, *, job_id: str, queue: str) -> bool:
        """Publish the job's message; False (logged) when Redis could not take it."""
        try:
            self.celery.send_task(
                task, args=[job_id], queue=queue, retry=True, retry_policy=self._retry_policy
            )
        except Exception as exc:  # kombu/redis raise several types; none may fail the request
            log.warning("could not send %s for %s (%s); it will be re-sent", task, job_id, exc)
            return False
        return True

    def send_job(self, *, job_id: str, kind: str, queue: str) -> bool:
        return self.send(TASK_FOR_KIND[kind], job_id=job_id, queue=queue)

    def queued_messages(self, queue: str) -> int:
        """Messages waiting in ``queue`` (0 when the queue doesn't exist, e.g. Redis restarted
        empty and no worker has declared it again yet)."""
        from kombu.exceptions import ChannelError

        with self.celery.connection_for_read() as conn:
            try:
                _, count, _ = conn.default_channel.queue_declare(queue=queue, passive=True)
            except ChannelError:
                return 0
            return int(count)


_PENDING_SENDS = "lorastack.pending_sends"


def enqueue_after_commit(session: Session, *, job_id: str, kind: str, queue: str) -> None:
    """Send the job's task once ``session`` commits; nothing is sent if it rolls back.

    Sending after the commit means a worker never receives an id whose row it cannot see.
    """
    session.info.setdefault(_PENDING_SENDS, []).append((TASK_FOR_KIND[kind], job_id, queue))


def send_after_commit(factory: sessionmaker[Session], sender: TaskSender) -> None:
    """Make every session of ``factory`` send the tasks enqueued in it when it commits."""

    @event.listens_for(factory, "after_commit")
    def _send(session: Session) -> None:
        for task, job_id, queue in session.info.pop(_PENDING_SENDS, ()):
            sender.send(task, job_id=job_id, queue=queue)

    @event.listens_for(factory, "after_rollback")
    def _drop(session: Session) -> None:
        session.info.pop(_PENDING_SENDS, None)
