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
def _start_heartbeat(**_: Any) -> None:
    from workers.engine.device import detect_device
    from workers.runtime import get_runtime

    runtime = get_runtime()
    device = detect_device()
    runtime.info.update(
        {
            "device": device.device,
            "device_name": device.name,
            "mixed_precision": list(device.mixed_precision),
        }
    )
    runtime.start_heartbeat()


@worker_shutdown.connect
def _stop_heartbeat(**_: Any) -> None:
    from workers.runtime import get_runtime

    get_runtime().stop()
