"""Operator actions beyond cancel: retry a batch's failed jobs, drain a worker.

Retry keeps each job's id and output key, so a retried job overwrites its own earlier (absent)
output and the batch's results keep their names; it starts the attempt count over, since the
earlier attempts ended in a failure someone has now dealt with.
"""

from __future__ import annotations

import logging

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core import dispatch, fetch
from core.db import session_scope
from core.errors import NotFound
from core.jobs import get_batch
from core.settings import Settings
from core.status import OPERATOR_RETRYABLE, JobStatus
from core.submit import send
from core.tables import Batch, Job, WorkerRow

log = logging.getLogger(__name__)


def retry_failed(settings: Settings, tenant: str, batch_id: str) -> int:
    """Queue the failed jobs of a batch again and dispatch them; returns how many."""
    with session_scope(settings.database_url) as session:
        batch = get_batch(session, tenant, batch_id)
        planned = [dispatch.Planned(*row) for row in session.execute(
            update(Job).where(Job.batch_id == batch.id, Job.status.in_(OPERATOR_RETRYABLE))
            .values(status=JobStatus.QUEUED, attempts=0, error=None, worker=None, lease_until=None,
                    started_at=None, finished_at=None, dispatched_at=None, output_keys=None, result=None,
                    error_code=None, retryable=None, progress=0.0, outage_since=None)
            .returning(Job.id, Job.group_key, Job.cost, Job.lane),
            execution_options={"synchronize_session": False})]
        count = len(planned)
        if planned:
            session.execute(update(Batch).where(Batch.id == batch.id).values(finished_at=None))
            planned = fetch.requeue(session, settings, planned)  # inputs by URL are fetched again first
    if planned:
        # Committed first, like a submission: a broker failure leaves them to the reconciler.
        try:
            with session_scope(settings.database_url) as session:
                send(session, settings, planned)
        except Exception as exc:
            log.warning("dispatch of %d retried jobs failed, the reconciler will send them: %s", len(planned), exc)
    return count


def drain_worker(session: Session, settings: Settings, name: str, drain: bool = True) -> WorkerRow:
    """Mark a worker draining and tell it (a Celery broadcast) to stop consuming its queues: it
    finishes the micro-batch in hand and takes nothing more. `drain=False` undoes it."""
    worker = session.scalar(select(WorkerRow).where(WorkerRow.name == name))
    if worker is None:
        raise NotFound(f"worker {name} not found")
    worker.draining = drain
    control = dispatch.app_for(settings).control
    for queue in worker.queues or list(dispatch.LANES):
        if drain:
            control.cancel_consumer(queue, destination=[name])
        else:
            control.add_consumer(queue, destination=[name])
    return worker
