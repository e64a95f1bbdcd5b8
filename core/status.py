"""Job and batch statuses, and the one table of allowed job transitions.

Every status-changing UPDATE takes its WHERE clause from `sources_of`, so the database enforces the
table: a job is only moved from a status the table allows (plus the fences on attempt and lease
that `workers.batch` adds).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"  # stored and waiting for a worker (possibly again, after a lost worker)
    RUNNING = "running"  # claimed by a worker under a lease; the lease expiring means the worker died
    SUCCEEDED = "succeeded"  # outputs are in storage; terminal
    FAILED = "failed"  # the engine rejected or broke on it, or it ran out of attempts; terminal
    CANCELED = "canceled"  # the user asked to stop it before it finished; terminal
    EXPIRED = "expired"  # its batch's completion window closed before a worker took it; terminal


class BatchStatus(StrEnum):
    """Derived from a batch's job counts, never stored on its own."""

    QUEUED = "queued"  # nothing has started yet
    RUNNING = "running"  # some jobs are not terminal
    COMPLETED = "completed"  # every job is terminal and at least one succeeded (or none failed)
    FAILED = "failed"  # every job is terminal, at least one failed and none succeeded
    CANCELED = "canceled"  # every job is terminal and the batch was canceled
    EXPIRED = "expired"  # every job is terminal and some expired: the results are partial


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.EXPIRED})

_ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELED, JobStatus.FAILED, JobStatus.EXPIRED}),
    # back to QUEUED when a lease expires or a retryable error happened, while attempts remain
    JobStatus.RUNNING: frozenset(
        {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.QUEUED}
    ),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELED: frozenset(),
    JobStatus.EXPIRED: frozenset(),
}


def can_transition(current: JobStatus, new: JobStatus) -> bool:
    return new in _ALLOWED[current]


def sources_of(new: JobStatus) -> list[JobStatus]:
    """Statuses a job may move to `new` from: the WHERE clause of a conditional UPDATE."""
    return [s for s, targets in _ALLOWED.items() if new in targets]


def batch_status(counts: Mapping[str, int], canceled: bool = False) -> BatchStatus:
    total = sum(counts.values())
    pending = counts.get(JobStatus.QUEUED, 0) + counts.get(JobStatus.RUNNING, 0)
    if pending:
        untouched = counts.get(JobStatus.QUEUED, 0) == total
        return BatchStatus.QUEUED if untouched else BatchStatus.RUNNING
    if canceled:
        return BatchStatus.CANCELED
    if counts.get(JobStatus.EXPIRED, 0):
        return BatchStatus.EXPIRED
    if total and counts.get(JobStatus.SUCCEEDED, 0) == 0 and counts.get(JobStatus.FAILED, 0) > 0:
        return BatchStatus.FAILED
    return BatchStatus.COMPLETED
