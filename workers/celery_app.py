"""The Celery application the workers run (``lorastack worker``)."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from service.config import get_settings
from service.queue import celery_config

app = Celery("lorastack", include=["workers.tasks"])
app.conf.update(celery_config(get_settings()))


@worker_ready.connect
def _start_heartbeat(sender: Any = None, **_: Any) -> None:
    from workers.engine.device import detect_device
    from workers.runtime import get_runtime

    runtime = get_runtime()
    device = detect_device()
    runtime.info.update(
        {
            "device": device.device,
            "device_name": device.name,
            "mixed_precision": list(device.mixed_precision),
            "memory_bytes": device.memory_bytes,
        }
    )
    if sender is not None:
        runtime.queues = tuple(sender.app.amqp.queues.consume_from)
    runtime.start_heartbeat()
    if "train" in runtime.queues:
        import workers.training  # noqa: F401  (diffusers, peft: imported now, not in a job)
    if "generate" in runtime.queues:
        from workers.generation import get_engine

        get_engine(runtime)  # load the base model now, not on the first request


@worker_shutdown.connect
def _stop_heartbeat(**_: Any) -> None:
    from workers.runtime import get_runtime

    get_runtime().stop()
