"""Read-side queries shared by `GET /v1/batches` and the dashboard, scoped like every other query:
`tenant` is the caller's tenant, or None for an operator who sees them all.

Nothing here counts a whole table: listing reads a page of batches by index and counts only the
unfinished jobs of that page (index `ix_jobs_batch_status`); rates range over `finished_at`.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import String, and_, cast, func, or_, select
from sqlalchemy.orm import Session

from core.errors import InvalidInput
from core.status import JobStatus, batch_status
from core.tables import Batch, Job, utcnow

ListStatus = Literal["active", "finished", "canceled"]
RATE_WINDOW = timedelta(seconds=60)  # throughput is the jobs finished in the last minute


@dataclass
class BatchFilter:
    status: ListStatus | None = None  # active: not finished; finished; canceled
    tenant: str | None = None  # operators only: narrow to one tenant
    created_from: datetime | None = None
    created_to: datetime | None = None
    q: str | None = None  # text in a job's custom_id or in the batch metadata


@dataclass
class Progress:
    """A batch's position: counts, progress, throughput and ETA."""

    batch: Batch
    counts: dict[str, int]
    rate: float  # jobs finished per second over the last minute
    status: str = ""
    done: int = 0
    pending: int = 0
    eta_seconds: float | None = None

    def __post_init__(self) -> None:
        self.status = batch_status(self.counts, self.batch.canceled).value
        self.pending = self.counts.get(JobStatus.QUEUED, 0) + self.counts.get(JobStatus.RUNNING, 0)
        self.done = self.batch.total - self.pending
        if self.pending and self.rate > 0:
            self.eta_seconds = self.pending / self.rate

    @property
    def fraction(self) -> float:
        return self.done / self.batch.total if self.batch.total else 1.0


def encode_cursor(created_at: datetime, row_id: str) -> str:
    """A page boundary in a newest-first list (batches, webhook deliveries): the last row's time and id."""
    raw = f"{created_at.isoformat()}|{row_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, row_id = raw.split("|", 1)
        return datetime.fromisoformat(created), row_id
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput("not a cursor this API returned: pass next_cursor as it came", "cursor") from None


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def list_batches(session: Session, tenant: str | None, filters: BatchFilter, cursor: str | None,
                 limit: int) -> tuple[list[Progress], str | None]:
    """One page of batches, newest first, with their progress; and the cursor of the next page."""
    query = select(Batch)
    owner = tenant if tenant is not None else filters.tenant
    if owner is not None:
        query = query.where(Batch.tenant_id == owner)
    if tenant is not None and filters.tenant not in (None, tenant):
        return [], None  # a tenant asking for another tenant's batches gets none
    if filters.status == "active":
        query = query.where(Batch.finished_at.is_(None))
    elif filters.status == "finished":
        query = query.where(Batch.finished_at.is_not(None), Batch.canceled.is_(False))
    elif filters.status == "canceled":
        query = query.where(Batch.canceled.is_(True))
    if filters.created_from is not None:
        query = query.where(Batch.created_at >= filters.created_from)
    if filters.created_to is not None:
        query = query.where(Batch.created_at < filters.created_to)
    if filters.q:
        pattern = _like(filters.q)
        in_jobs = select(Job.id).where(Job.batch_id == Batch.id, Job.custom_id.ilike(pattern, escape="\\"))
        query = query.where(or_(cast(Batch.metadata_, String).ilike(pattern, escape="\\"), in_jobs.exists()))
    if cursor:
        created, batch_id = decode_cursor(cursor)
        query = query.where(or_(Batch.created_at < created, and_(Batch.created_at == created, Batch.id < batch_id)))
    batches = list(session.scalars(query.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit)))
    progress = progress_of(session, batches)
    return progress, encode_cursor(batches[-1].created_at, batches[-1].id) if len(batches) == limit else None


def progress_of(session: Session, batches: list[Batch]) -> list[Progress]:
    """Progress for a page of batches: a finished batch needs no count beyond its failures; an
    unfinished one counts its queued and running jobs (an index range, not the batch)."""
    ids = [b.id for b in batches]
    counted: dict[str, dict[str, int]] = {b.id: {} for b in batches}
    if ids:
        live = [JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.FAILED, JobStatus.CANCELED]
        rows = session.execute(select(Job.batch_id, Job.status, func.count())
                               .where(Job.batch_id.in_(ids), Job.status.in_(live))
                               .group_by(Job.batch_id, Job.status))
        for batch_id, status, n in rows:
            counted[str(batch_id)][status] = n
    rates = recent_rates(session, [b.id for b in batches if b.finished_at is None])
    out = []
    for batch in batches:
        counts = {s.value: counted[batch.id].get(s.value, 0) for s in JobStatus}
        counts[JobStatus.SUCCEEDED] = batch.total - sum(counts.values())
        out.append(Progress(batch, counts, rates.get(batch.id, 0.0)))
    return out


def recent_rates(session: Session, batch_ids: list[str]) -> dict[str, float]:
    if not batch_ids:
        return {}
    since = utcnow() - RATE_WINDOW
    rows = session.execute(select(Job.batch_id, func.count()).where(Job.batch_id.in_(batch_ids),
                                                                   Job.finished_at >= since)
                           .group_by(Job.batch_id))
    return {str(batch_id): n / RATE_WINDOW.total_seconds() for batch_id, n in rows}


def batch_progress(session: Session, batch: Batch) -> Progress:
    """Exact counts for one batch (index-only over its jobs) and its recent rate."""
    rows = session.execute(select(Job.status, func.count()).where(Job.batch_id == batch.id).group_by(Job.status))
    found = dict(rows.tuples().all())
    counts = {s.value: found.get(s.value, 0) for s in JobStatus}
    return Progress(batch, counts, recent_rates(session, [batch.id]).get(batch.id, 0.0))


def error_groups(session: Session, batch_id: str, limit: int = 20) -> list[tuple[str, int]]:
    """The batch's failures grouped by message, most frequent first."""
    count = func.count().label("n")
    rows = session.execute(select(Job.error, count).where(Job.batch_id == batch_id, Job.status == JobStatus.FAILED)
                           .group_by(Job.error).order_by(count.desc()).limit(limit))
    return [(error or "(no message)", n) for error, n in rows]


def job_page(session: Session, batch_id: str, status: str | None, error: str | None, q: str | None,
             after: str | None, limit: int) -> list[Job]:
    """Jobs of a batch (already checked to be the caller's) by id, filtered."""
    query = select(Job).where(Job.batch_id == batch_id)
    if status:
        query = query.where(Job.status == status)
    if error:
        query = query.where(Job.error == error)
    if q:
        query = query.where(Job.custom_id.ilike(_like(q), escape="\\"))
    if after:
        query = query.where(Job.id > after)
    return list(session.scalars(query.order_by(Job.id).limit(limit)))
