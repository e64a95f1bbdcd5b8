"""Reading and canceling jobs and batches, always scoped to one tenant.

Another tenant's id gives NotFound, exactly like an id that does not exist: nothing leaks whether
it does.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from core import events, progress
from core.db import session_scope
from core.errors import NotFound
from core.status import BatchStatus, ErrorCode, JobStatus, batch_status, failure, sources_of
from core.tables import Batch, Job, ReconcilerRun, utcnow


def get_job(session: Session, tenant: str, job_id: str) -> Job:
    job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant))
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job


def get_batch(session: Session, tenant: str, batch_id: str) -> Batch:
    batch = session.scalar(select(Batch).where(Batch.id == batch_id, Batch.tenant_id == tenant))
    if batch is None:
        raise NotFound(f"batch {batch_id} not found")
    return batch


def counts(session: Session, batch_id: str) -> dict[str, int]:
    rows = session.execute(select(Job.status, func.count()).where(Job.batch_id == batch_id).group_by(Job.status))
    found = {status: n for status, n in rows}
    return {s.value: found.get(s.value, 0) for s in JobStatus}


def running_progress(session: Session, batch_id: str) -> float:
    """How far its running jobs are (the sum of their 0..1 progress), so a batch's progress moves
    within a job, not only when one ends. Reads only the few running rows (ix_jobs_batch_status)."""
    total = session.scalar(select(func.sum(Job.progress)).where(Job.batch_id == batch_id,
                                                                Job.status == JobStatus.RUNNING))
    return float(total or 0.0)


def summary(session: Session, batch: Batch) -> tuple[BatchStatus, dict[str, int]]:
    """Status and counts from the batch row's counters: O(1) whatever the batch's size."""
    per_status = progress.read(session, batch.id)
    return batch_status(per_status, batch.canceled), per_status


def _cancel(session: Session, *criteria: Any) -> int:
    now = utcnow()
    result = session.execute(
        update(Job).where(*criteria, Job.status.in_(sources_of(JobStatus.CANCELED)))
        .values(status=JobStatus.CANCELED, finished_at=now, lease_until=None, **failure(ErrorCode.CANCELED))
    )
    assert isinstance(result, CursorResult)
    events.jobs_ended(session, *criteria, Job.finished_at == now)
    return result.rowcount


def cancel_job(session: Session, tenant: str, job_id: str) -> Job:
    """Cancel a job that has not finished; a finished job is returned as it is. A running job's
    worker sees the cancel within about a second and stops at the next step or tile; nothing it
    made is kept."""
    job = get_job(session, tenant, job_id)
    _cancel(session, Job.id == job.id)
    if job.batch_id:
        complete_batches(session, [job.batch_id])
    session.refresh(job)
    return job


def cancel_batch(session: Session, tenant: str, batch_id: str) -> int:
    batch = get_batch(session, tenant, batch_id)
    canceled = _cancel(session, Job.batch_id == batch.id)
    if canceled:  # a batch that had already finished keeps its status
        batch.canceled, batch.canceled_at = True, utcnow()
    complete_batches(session, [batch.id])
    return canceled


def page(session: Session, tenant: str, batch_id: str, status: JobStatus | None, after: str | None,
         limit: int) -> list[Job]:
    """Jobs of a batch ordered by id, starting after the cursor `after` (the last id of the previous page)."""
    get_batch(session, tenant, batch_id)
    query = select(Job).where(Job.batch_id == batch_id, Job.tenant_id == tenant)
    if status is not None:
        query = query.where(Job.status == status)
    if after is not None:
        query = query.where(Job.id > after)
    return list(session.scalars(query.order_by(Job.id).limit(limit)))


def iterate(database_url: str, tenant: str, batch_id: str, chunk: int = 2000) -> Iterator[Job]:
    """Every job of a batch, a page per short transaction, so a 100,000-item batch streams in
    bounded memory without holding one transaction open for the whole download."""
    after = None
    while True:
        with session_scope(database_url) as session:
            jobs = page(session, tenant, batch_id, None, after, chunk)
        yield from jobs
        if len(jobs) < chunk:
            return
        after = jobs[-1].id


def unfinished_batches(session: Session) -> list[str]:
    """Batches with no queued or running job that were never stamped finished (a repair pass)."""
    return list(session.scalars(select(Batch.id).where(
        Batch.finished_at.is_(None), Batch.queued_count == 0, Batch.running_count == 0)))


def complete_batches(session: Session, batch_ids: Iterable[str]) -> list[str]:
    """Stamp `finished_at` on each batch whose last job just became terminal; returns those stamped."""
    stamped = progress.stamp_finished(session, batch_ids)
    events.batches_ended(session, stamped)
    return stamped


RECONCILER = "reconciler"  # the one row of reconciler_runs


def reconciler_ran_at(session: Session) -> datetime | None:
    """When the reconciler last ran through, if it ever did."""
    row = session.get(ReconcilerRun, RECONCILER)
    return row.ran_at if row else None
