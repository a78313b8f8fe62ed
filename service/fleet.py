"""The worker fleet as SQL sees it: which workers heartbeat recently enough to count as live."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.config import Settings
from service.db import utcnow
from service.models import Worker


def live_workers(session: Session, settings: Settings) -> list[Worker]:
    """Workers whose last heartbeat is younger than ``worker_stale_s``, by id."""
    cutoff = utcnow() - timedelta(seconds=settings.worker_stale_s)
    return list(
        session.scalars(
            select(Worker).where(Worker.heartbeat_at >= cutoff).order_by(Worker.id)
        ).all()
    )
