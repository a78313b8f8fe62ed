"""Celery configuration shared by the API (which only sends) and the workers, and the one
way a job's task is sent: after the transaction that created (or requeued) the job commits.

Tasks are sent by name with ids only; neither the API nor the lifecycle imports worker code.
"""

from __future__ import annotations

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

# Which task runs a job of each kind: a new kind is a new entry here.
TASK_FOR_KIND: dict[str, str] = {
    JobKind.TRAIN.value: TASK_TRAIN,
    JobKind.GENERATE.value: TASK_GENERATE,
    JobKind.PING.value: TASK_PING,
}


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
    """Sends tasks by name; the API's only contact with Celery."""

    def __init__(self, celery: Celery) -> None:
        self.celery = celery

    def send(self, task: str, *, job_id: str, queue: str) -> None:
        self.celery.send_task(task, args=[job_id], queue=queue)


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
