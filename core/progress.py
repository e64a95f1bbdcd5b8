"""Batch progress counters: jobs per status, kept on the batch row.

Every job status change reports its transitions here, in the transaction that makes the change, so
the counters always equal the job rows: reading a batch is one row (no COUNT over 100,000 jobs) and
finishing a micro-batch costs one UPDATE per batch it touches, whatever the batch's size.

Callers pass only what they know they changed (the rows their fenced UPDATE matched); the arithmetic
lives here alone.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from sqlalchemy import update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import InstrumentedAttribute, Session

from core.status import JobStatus
from core.tables import Batch, utcnow

COUNTERS: Mapping[str, InstrumentedAttribute[int]] = {
    JobStatus.QUEUED: Batch.queued_count,
    JobStatus.RUNNING: Batch.running_count,
    JobStatus.SUCCEEDED: Batch.succeeded_count,
    JobStatus.FAILED: Batch.failed_count,
    JobStatus.CANCELED: Batch.canceled_count,
}

# (batch id, from status, to status)
Transition = tuple[str | None, str, str]


def move(session: Session, batch_id: str | None, source: str, target: str, n: int) -> None:
    """`n` jobs of `batch_id` went from `source` to `target`."""
    move_many(session, [(batch_id, source, target)] * n)


def move_many(session: Session, transitions: Iterable[Transition]) -> None:
    """Apply transitions, one UPDATE per batch. Jobs outside a batch (single jobs) count nowhere.
    Batches are updated in id order, so two transactions lock them in the same order."""
    deltas: dict[str, Counter[str]] = {}
    for batch_id, source, target in transitions:
        if batch_id is None or source == target:
            continue
        delta = deltas.setdefault(batch_id, Counter())
        delta[source] -= 1
        delta[target] += 1
    for batch_id in sorted(deltas):
        values = {COUNTERS[status].key: COUNTERS[status] + n for status, n in deltas[batch_id].items() if n}
        if values:
            session.execute(update(Batch).where(Batch.id == batch_id).values(**values),
                            execution_options={"synchronize_session": False})


def as_dict(batch: Batch) -> dict[str, int]:
    return {status.value: getattr(batch, COUNTERS[status].key) for status in JobStatus}


def stamp_finished(session: Session, batch_ids: Iterable[str]) -> list[str]:
    """Stamp `finished_at` on each batch with no queued or running job left; returns those stamped.
    The stamp is a conditional UPDATE on the counters: in PostgreSQL a concurrent transaction's
    counter change holds the batch row, and the WHERE is re-checked on the row it committed, so the
    stamp happens exactly once, by whoever moved the last job."""
    stamped = []
    for batch_id in sorted(batch_ids):
        result = session.execute(
            update(Batch).where(Batch.id == batch_id, Batch.finished_at.is_(None), Batch.queued_count == 0,
                                Batch.running_count == 0).values(finished_at=utcnow()),
            execution_options={"synchronize_session": False})
        assert isinstance(result, CursorResult)
        if result.rowcount:
            stamped.append(batch_id)
    return stamped
