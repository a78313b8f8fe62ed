"""Which queued job runs next, how many a tenant may queue, and which jobs need a new message.

Fair lease. A Celery message names a job, but a worker treats it as a token: "one job of this
kind is waiting". On any message it leases the queued job chosen here, fairly across tenants,
which may be another job than the one named; the named job is picked up by a later message.
Every job still runs exactly once: the lease is the conditional UPDATE of ``lifecycle``, and
there is at least one message per queued job (one sent when it is created, one per requeue,
and the re-send below for any that went missing), so a message that finds its job taken
leases the next one or, with nothing queued, does nothing.

The next tenant is the one, among tenants with a queued job (of this kind and base model)
and below their running cap, with the fewest running jobs, then the one whose last job of
this kind started longest ago (never first), then the oldest queued job. So with one worker
a tenant that queued a thousand jobs delays another tenant's next job by at most the job
already running.

Batch mates. A generation worker that has leased a job also leases queued jobs of the same
shape (``job_params.batch_key``) to run in the same pipeline call, whatever their adapters:
``choose_batch_mates`` takes them round robin across tenants (each tenant's oldest first, the
tenants in the order of their oldest job, the leased job's tenant last), skipping a job that
would take the batch past its image limit or its union of adapter files past the worker's slots,
and a tenant at its running cap.
So one tenant's flood of compatible jobs shares a batch with the other tenants' jobs instead of
filling it.

Durable dispatch. A committed queued job must be delivered even if its message is lost:
Redis restarted empty, or a publish failed (the API accepts the job anyway: the row is the
record, the message only a wake-up). ``jobs_to_resend`` names the jobs to send again when a
queue holds fewer messages than there are jobs queued longer than a grace period.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import Table, func, select
from sqlalchemy.orm import Session

from service.config import Settings
from service.db import utcnow
from service.errors import TooManyRequests
from service.lifecycle import JOB_TABLE, RUNNING_STATES
from service.models import JobStatus, Tenant

_job = JOB_TABLE.c
TENANT_TABLE = cast(Table, Tenant.__table__)
_tenant = TENANT_TABLE.c
_QUEUED = JobStatus.QUEUED.value


def next_fair_job(
    session: Session, *, kind: str, base_model: str | None, max_running: int | None
) -> str | None:
    """The id of the queued job to lease next (module doc), or None when there is none."""
    scope = [_job.kind == kind]
    if base_model is not None:
        scope.append(_job.base_model == base_model)
    oldest: dict[str, datetime] = {
        tenant: queued_at
        for tenant, queued_at in session.execute(
            select(_job.tenant_id, func.min(_job.queued_at))
            .where(_job.status == _QUEUED, *scope)
            .group_by(_job.tenant_id)
        )
    }
    if not oldest:
        return None
    tenants = list(oldest)
    running = running_counts(session, kind=kind, tenants=tenants)
    if max_running is not None:
        tenants = [t for t in tenants if running.get(t, 0) < max_running]
        if not tenants:
            return None
    last_start: dict[str, datetime] = {}
    if len(tenants) > 1:
        # One index probe per tenant (ix_job_tenant_id_kind_started_at), not a scan of every
        # job the tenant ever ran: a correlated max() per candidate tenant row.
        last = (
            select(func.max(_job.started_at))
            .where(_job.tenant_id == _tenant.id, _job.kind == kind)
            .correlate(TENANT_TABLE)
            .scalar_subquery()
        )
        last_start = {
            tenant: started
            for tenant, started in session.execute(
                select(_tenant.id, last).where(_tenant.id.in_(tenants))
            )
            if started is not None
        }
    never = datetime.min.replace(tzinfo=oldest[tenants[0]].tzinfo)
    tenant = min(
        tenants,
        key=lambda t: (running.get(t, 0), last_start.get(t, never), oldest[t]),
    )
    return session.scalar(
        select(_job.id)
        .where(_job.status == _QUEUED, _job.tenant_id == tenant, *scope)
        .order_by(_job.queued_at, _job.id)
        .limit(1)
    )


@dataclass(frozen=True)
class BatchCandidate:
    """What choosing batch mates needs of a queued job (candidates come oldest first)."""

    id: str
    tenant_id: str
    images: int
    adapter_files: frozenset[str]


def choose_batch_mates(
    batch: Sequence[BatchCandidate],
    candidates: Sequence[BatchCandidate],
    *,
    max_images: int,
    max_adapter_files: int,
    running: Mapping[str, int] | None = None,
    max_running: int | None = None,
) -> list[str]:
    """The ids of ``candidates`` to add to ``batch`` (module doc), in the order taken.

    ``running`` (jobs each tenant has running, the batch's included) and ``max_running``: a
    tenant stops getting jobs into the batch at its running cap, as the fair lease skips it.
    """
    running = dict(running or {})
    images = sum(job.images for job in batch)
    files = set().union(*(job.adapter_files for job in batch))
    queues: dict[str, list[BatchCandidate]] = {}
    for candidate in candidates:
        queues.setdefault(candidate.tenant_id, []).append(candidate)
    in_batch = {job.tenant_id for job in batch}
    # Tenants without a job in the batch first, each group in the order of its oldest job.
    tenants = sorted(queues, key=lambda t: t in in_batch)
    chosen: list[str] = []
    while tenants and images < max_images:
        for tenant in list(tenants):
            queue = queues[tenant]
            if max_running is not None and running.get(tenant, 0) >= max_running:
                queue.clear()
            # A job that does not fit now never will (the batch only grows): drop it.
            while queue:
                job = queue.pop(0)
                if images + job.images <= max_images and (
                    len(files | job.adapter_files) <= max_adapter_files
                ):
                    chosen.append(job.id)
                    running[tenant] = running.get(tenant, 0) + 1
                    images += job.images
                    files |= job.adapter_files
                    break
            if not queue:
                tenants.remove(tenant)
    return chosen


def running_counts(session: Session, *, kind: str, tenants: Sequence[str]) -> dict[str, int]:
    """How many jobs of ``kind`` each of ``tenants`` has running (absent: none)."""
    return {
        tenant: int(count)
        for tenant, count in session.execute(
            select(_job.tenant_id, func.count())
            .where(_job.status.in_(RUNNING_STATES), _job.kind == kind, _job.tenant_id.in_(tenants))
            .group_by(_job.tenant_id)
        )
    }


def check_queued_quota(session: Session, *, settings: Settings, tenant_id: str, kind: str) -> None:
    """Refuse (429 naming the limit) a job that would take the tenant past its queued cap.

    Two concurrent requests can both pass at the cap's edge: the cap is a guard against
    floods, not an exact count, and a lock per tenant on every job created would cost more.
    """
    limit = settings.tenant_max_queued(kind)
    if limit is None:
        return
    queued = session.scalar(
        select(func.count())
        .select_from(JOB_TABLE)
        .where(_job.tenant_id == tenant_id, _job.kind == kind, _job.status == _QUEUED)
    )
    if int(queued or 0) >= limit:
        setting = f"LORASTACK_TENANT_MAX_QUEUED_{settings.quota_kind(kind).upper()}"
        raise TooManyRequests(
            f"{queued} {kind} jobs are already queued for this tenant, the limit is {limit} "
            f"({setting}); retry when some have started",
            code="quota_exceeded",
            retry_after_s=settings.quota_retry_after_s,
            extra={"limit": {"name": setting, "value": limit, "current": int(queued or 0)}},
        )


def jobs_to_resend(
    session: Session,
    *,
    queue: str,
    messages: int,
    older_than_s: float,
    now: datetime | None = None,
) -> list[tuple[str, str]]:
    """(job id, kind) of the queued jobs to send again: as many as the queue lacks messages
    for the jobs queued longer than ``older_than_s`` (a younger job's message may still be on
    its way), oldest first. A surplus message is harmless: it leases a job or does nothing."""
    cutoff = (now or utcnow()) - timedelta(seconds=older_than_s)
    waiting = select(_job.id, _job.kind).where(
        _job.status == _QUEUED, _job.queue == queue, _job.queued_at < cutoff
    )
    count = int(session.scalar(select(func.count()).select_from(waiting.subquery())) or 0)
    missing = count - messages
    if missing <= 0:
        return []
    rows = session.execute(waiting.order_by(_job.queued_at).limit(missing)).all()
    return [(job_id, kind) for job_id, kind in rows]
