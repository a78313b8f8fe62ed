"""Celery configuration shared by the API (which only sends) and the workers.

The API sends tasks by name with ids only; it never imports the worker code.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from service.config import Settings

TRAIN_QUEUE = "train"
GENERATE_QUEUE = "generate"
QUEUES = (TRAIN_QUEUE, GENERATE_QUEUE)

TASK_PING = "lorastack.ping"
TASK_TRAIN = "lorastack.train"
TASK_GENERATE = "lorastack.generate"
TASK_FOR_KIND = {"train": TASK_TRAIN, "generate": TASK_GENERATE, "ping": TASK_PING}

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
    back (service/jobs/dispatch.py). A publish gives up after ``publish_timeout_s``.
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
