"""Celery configuration shared by the API (which only sends) and the workers.

The API sends tasks by name with ids only; it never imports the worker code.
"""

from __future__ import annotations

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
