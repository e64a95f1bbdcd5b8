"""What the overview page and /metrics read: queues, throughput, failures, workers.

Each query is served by an index (`ix_jobs_status_lane_created`, `ix_jobs_status_model_created`,
`ix_jobs_finished`): queue depth reads only the queued and running entries, the oldest queued job
is the first entry of its range, and rates range over the last hour of `(finished_at, status)`
without touching the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from core.status import JobStatus
from core.tables import Job, WorkerRow, WorkerSample, utcnow

PENDING = (JobStatus.QUEUED, JobStatus.RUNNING)


@dataclass
class Queue:
    """One lane or one model: jobs waiting and running, and how long the oldest has waited."""

    name: str
    queued: int = 0
    running: int = 0
    oldest_queued: datetime | None = None

    def oldest_age(self, now: datetime) -> float | None:
        return (now - self.oldest_queued).total_seconds() if self.oldest_queued else None


def queues(session: Session, by: str, tenant: str | None = None) -> list[Queue]:
    """Per lane (`by="lane"`) or per model (`by="model"`); one tenant's jobs, or all (None)."""
    column = Job.lane if by == "lane" else Job.model
    found: dict[str, Queue] = {}
    query = (select(column, Job.status, func.count(), func.min(Job.created_at))
             .where(Job.status.in_(PENDING)).group_by(column, Job.status))
    if tenant is not None:
        query = query.where(Job.tenant_id == tenant)
    rows = session.execute(query)
    for name, status, n, oldest in rows:
        queue = found.setdefault(name, Queue(name))
        if status == JobStatus.QUEUED:
            queue.queued, queue.oldest_queued = n, oldest
        else:
            queue.running = n
    return [found[name] for name in sorted(found)]


def _minute(session: Session, column: ColumnElement[datetime] | object) -> ColumnElement[object]:
    # date_trunc is a fraction of to_char's cost on PostgreSQL; SQLite only has text.
    if session.get_bind().dialect.name == "postgresql":
        return func.date_trunc("minute", column)
    return func.strftime("%Y-%m-%dT%H:%M", column)


def _at(bucket: object) -> datetime:
    return bucket if isinstance(bucket, datetime) else datetime.fromisoformat(str(bucket))


@dataclass
class Minute:
    at: datetime
    succeeded: int = 0
    failed: int = 0


def per_minute(session: Session, minutes: int = 60, tenant: str | None = None) -> list[Minute]:
    """Jobs finished per minute over the last `minutes`, oldest first, empty minutes included."""
    now = utcnow().replace(second=0, microsecond=0)
    since = now - timedelta(minutes=minutes - 1)
    bucket = _minute(session, Job.finished_at)
    query = (select(bucket, Job.status, func.count())
             .where(Job.finished_at >= since, Job.status.in_([JobStatus.SUCCEEDED, JobStatus.FAILED]))
             .group_by(bucket, Job.status))
    if tenant is not None:
        query = query.where(Job.tenant_id == tenant)
    series = {since + timedelta(minutes=i): Minute(since + timedelta(minutes=i)) for i in range(minutes)}
    for at, status, n in session.execute(query):
        minute = series.get(_at(at))
        if minute is not None:
            setattr(minute, status, n)
    return list(series.values())


def per_worker_minute(session: Session, minutes: int = 60) -> dict[str, list[int]]:
    """Succeeded jobs per minute per worker over the last `minutes` (for the workers page)."""
    now = utcnow().replace(second=0, microsecond=0)
    since = now - timedelta(minutes=minutes - 1)
    bucket = _minute(session, Job.finished_at)
    out: dict[str, list[int]] = {}
    rows = session.execute(select(Job.worker, bucket, func.count())
                           .where(Job.finished_at >= since, Job.status == JobStatus.SUCCEEDED)
                           .group_by(Job.worker, bucket))
    for worker, at, n in rows:
        index = int((_at(at) - since).total_seconds() // 60)
        if worker and 0 <= index < minutes:
            out.setdefault(worker, [0] * minutes)[index] = n
    return out


def failure_rate(series: list[Minute]) -> float | None:
    """Failed / finished over the series; None when nothing finished."""
    failed = sum(m.failed for m in series)
    finished = failed + sum(m.succeeded for m in series)
    return failed / finished if finished else None


def workers(session: Session, since: timedelta = timedelta(hours=1)) -> list[WorkerRow]:
    """Workers alive or seen within `since`, most recent heartbeat first."""
    cutoff = utcnow() - since
    return list(session.scalars(select(WorkerRow).where(WorkerRow.heartbeat_at >= cutoff)
                                .order_by(WorkerRow.name)))


def memory_history(session: Session, minutes: int = 60) -> dict[str, list[int]]:
    """Each worker's sampled resident memory over the last `minutes`, oldest first."""
    since = utcnow() - timedelta(minutes=minutes)
    out: dict[str, list[int]] = {}
    rows = session.execute(select(WorkerSample.worker, WorkerSample.rss_bytes)
                           .where(WorkerSample.at >= since).order_by(WorkerSample.worker, WorkerSample.at))
    for worker, rss in rows:
        out.setdefault(worker, []).append(rss or 0)
    return out
