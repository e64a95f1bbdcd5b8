"""Deadlines and retention, swept periodically by the reconciler, and deleting a batch.

- A batch's jobs still queued when its completion window closes end `expired` (counted apart from
  failed); the batch then finishes with the results it has. A job already running finishes.
- A finished batch's outputs are deleted from storage `output_ttl` after it finished; the batch
  records `outputs_deleted_at` and its jobs lose their output keys. Single jobs follow the
  settings' default `output_ttl`.
- Deleting a batch removes its outputs, its jobs and the batch itself; a batch still running must be
  canceled first, so no worker writes an output for a row that no longer exists.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import Text, cast, delete, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from core.catalog import human
from core.db import session_scope
from core.errors import Conflict
from core.jobs import complete_batches, get_batch
from core.settings import Settings
from core.status import ErrorCode, JobStatus, failure, sources_of
from core.storage import Storage, output_prefix
from core.tables import Batch, BatchUsage, IdempotencyKey, Job, utcnow

log = logging.getLogger(__name__)


def expire_overdue(session: Session, now: datetime) -> int:
    """Queued jobs of batches past their deadline end expired; returns how many."""
    overdue = list(session.execute(select(Batch.id, Batch.completion_window).where(
        Batch.expires_at < now, Batch.finished_at.is_(None))))
    expired = 0
    for batch_id, window in overdue:
        result = session.execute(
            update(Job).where(Job.batch_id == batch_id, Job.status.in_(sources_of(JobStatus.EXPIRED)))
            .values(status=JobStatus.EXPIRED, finished_at=now, lease_until=None, **failure(ErrorCode.EXPIRED),
                    error=f"the batch's completion window ({human(window)}) closed before this job ran"))
        assert isinstance(result, CursorResult)
        expired += result.rowcount
    complete_batches(session, [batch_id for batch_id, _ in overdue])
    return expired


def delete_old_outputs(settings: Settings, storage: Storage, now: datetime, limit: int = 100) -> int:
    """Delete the outputs of batches (and single jobs) past their retention; returns how many
    batches and single jobs were cleared."""
    with session_scope(settings.database_url) as session:
        # The shortest allowed ttl bounds the candidates; each batch's own ttl decides.
        candidates = session.execute(
            select(Batch.id, Batch.tenant_id, Batch.finished_at, Batch.output_ttl)
            .where(Batch.outputs_deleted_at.is_(None), Batch.finished_at < now - timedelta(hours=1))
            .order_by(Batch.finished_at).limit(limit)).all()
        singles = session.execute(
            select(Job.id, Job.output_keys).where(
                # A job without outputs holds JSON null (SQLAlchemy's JSON stores None so), not SQL
                # NULL: without the second test every such job would be swept again, forever.
                Job.batch_id.is_(None), Job.output_keys.is_not(None), cast(Job.output_keys, Text) != "null",
                Job.finished_at < now - timedelta(seconds=settings.output_ttl)).limit(limit)).all()
    cleared = 0
    for batch_id, tenant, finished_at, ttl in candidates:
        if finished_at is None or finished_at + timedelta(seconds=ttl) > now:
            continue
        storage.delete_prefix(output_prefix(tenant, batch_id))  # objects first: a failure leaves rows to retry
        with session_scope(settings.database_url) as session:
            session.execute(update(Job).where(Job.batch_id == batch_id).values(output_keys=None))
            session.execute(update(Batch).where(Batch.id == batch_id).values(outputs_deleted_at=now))
        cleared += 1
    for job_id, keys in singles:
        for key in keys or []:
            storage.client.delete_object(Bucket=storage.bucket, Key=key)
        with session_scope(settings.database_url) as session:
            session.execute(update(Job).where(Job.id == job_id).values(output_keys=None))
        cleared += 1
    return cleared


def sweep(settings: Settings) -> dict[str, int]:
    """The periodic pass the reconciler runs: expire overdue jobs, then delete old outputs."""
    now = utcnow()
    with session_scope(settings.database_url) as session:
        expired = expire_overdue(session, now)
    outputs = delete_old_outputs(settings, Storage(settings), now)
    if expired or outputs:
        log.info("sweep: %d jobs expired, outputs of %d batches/jobs deleted", expired, outputs)
    return {"expired": expired, "outputs_deleted": outputs}


def delete_batch(settings: Settings, storage: Storage, tenant: str, batch_id: str) -> None:
    """Remove a finished batch: its outputs, its jobs, the Idempotency-Key that created it, itself."""
    with session_scope(settings.database_url) as session:
        batch = get_batch(session, tenant, batch_id)
        if batch.finished_at is None:
            raise Conflict(f"batch {batch_id} is still running: cancel it first "
                           f"(POST /v1/batches/{batch_id}/cancel), then delete it", "status")
    storage.delete_prefix(output_prefix(tenant, batch_id))
    with session_scope(settings.database_url) as session:
        session.execute(delete(Job).where(Job.batch_id == batch_id, Job.tenant_id == tenant))
        session.execute(delete(IdempotencyKey).where(IdempotencyKey.tenant_id == tenant,
                                                     IdempotencyKey.resource_id == batch_id))
        session.execute(delete(BatchUsage).where(BatchUsage.batch_id == batch_id))
        session.execute(delete(Batch).where(Batch.id == batch_id, Batch.tenant_id == tenant))
