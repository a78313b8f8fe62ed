"""Fair lease cost against a tenant's job history, on PostgreSQL.

The fair lease picks a tenant by, among other things, when its last job of the kind started.
This measures ``next_fair_job`` (the statement every lease runs) with two tenants queued and
the first tenant's finished history grown from 0 to 100,000 jobs, and beside it the previous
form of that read (a GROUP BY over every job of the candidate tenants), in the same database.
Target: the lease at 100,000 finished jobs within 2x of the lease with none.

    python bench/bench_fair_lease.py [--database-url postgresql://...]

A scratch database is created next to the one named and dropped afterwards.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import create_engine, func, insert, select, text
from sqlalchemy.engine import make_url

from service.db import utcnow
from service.dispatch import next_fair_job
from service.lifecycle import JOB_TABLE
from service.models import Base, JobKind, JobStatus, Tenant

HISTORY = (0, 10_000, 100_000)
REPEATS = 50


def _old_last_start(session: Any, tenants: list[str]) -> Any:
    job = JOB_TABLE.c
    return session.execute(
        select(job.tenant_id, func.max(job.started_at))
        .where(job.kind == JobKind.GENERATE.value, job.tenant_id.in_(tenants))
        .group_by(job.tenant_id)
    ).all()


def _median_ms(call: Any) -> float:
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def _jobs(tenant: str, count: int, status: str, start: Any) -> list[dict[str, Any]]:
    return [
        {
            "id": f"job_{uuid.uuid4().hex[:20]}",
            "tenant_id": tenant,
            "kind": JobKind.GENERATE.value,
            "status": status,
            "queue": "generate",
            "base_model": "tiny",
            "params": {},
            "queued_at": start + timedelta(seconds=i),
            "started_at": start + timedelta(seconds=i) if status != "queued" else None,
        }
        for i in range(count)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "LORASTACK_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
        ),
    )
    url = make_url(parser.parse_args().database_url)
    scratch = f"bench_fair_lease_{uuid.uuid4().hex[:8]}"
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{scratch}"'))
    engine = create_engine(url.set(database=scratch))
    try:
        Base.metadata.create_all(engine)
        rows = _measure(engine)
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)'))
        admin.dispose()
    base = rows[0][1]
    print("| finished jobs of tenant A | lease ms | lease / lease@0 | old last-start read ms |")
    print("|---|---|---|---|")
    for history, lease_ms, old_ms in rows:
        print(f"| {history:,} | {lease_ms:.2f} | {lease_ms / base:.2f}x | {old_ms:.2f} |")


def _measure(engine: Any) -> list[tuple[int, float, float]]:
    from sqlalchemy.orm import Session

    start = utcnow() - timedelta(days=30)
    with Session(engine) as session:
        session.add_all([Tenant(id="tn_a", name="a"), Tenant(id="tn_b", name="b")])
        session.flush()
        session.execute(insert(JOB_TABLE), _jobs("tn_a", 3, JobStatus.QUEUED.value, utcnow()))
        session.execute(insert(JOB_TABLE), _jobs("tn_b", 3, JobStatus.QUEUED.value, utcnow()))
        session.commit()
        rows: list[tuple[int, float, float]] = []
        have = 0
        for history in HISTORY:
            finished = _jobs("tn_a", history - have, JobStatus.SUCCEEDED.value, start)
            for chunk in range(0, len(finished), 10_000):
                session.execute(insert(JOB_TABLE), finished[chunk : chunk + 10_000])
            session.commit()
            session.execute(text("ANALYZE job"))
            have = history

            def lease() -> None:
                next_fair_job(
                    session, kind=JobKind.GENERATE.value, base_model="tiny", max_running=None
                )

            lease_ms = _median_ms(lease)
            old_ms = _median_ms(lambda: _old_last_start(session, ["tn_a", "tn_b"]))
            rows.append((history, lease_ms, old_ms))
        return rows


if __name__ == "__main__":
    main()
