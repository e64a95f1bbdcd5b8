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


class ErrorCode(StrEnum):
    """Why a job failed or stopped, for machines; the job's `error` says it for people."""

    INVALID_INPUT = "invalid_input"  # the item cannot run as given: fix it
    MODEL_UNAVAILABLE = "model_unavailable"  # its model's weights are missing or the profile is wrong
    ENGINE_ERROR = "engine_error"  # the model broke on this item
    OUTAGE = "outage"  # S3, the database or the broker stayed down longer than STEP1X_OUTAGE_BUDGET
    WORKER_LOST = "worker_lost"  # every attempt's worker died under it
    CANCELED = "canceled"  # the user canceled it
    EXPIRED = "expired"  # its batch's completion_window closed before it ran
    INPUT_FETCH_FAILED = "input_fetch_failed"  # an input given by URL could not be downloaded: see the error


# Failures that the same job, sent again once the cause is gone, may survive.
RETRYABLE = frozenset({ErrorCode.MODEL_UNAVAILABLE, ErrorCode.OUTAGE, ErrorCode.WORKER_LOST,
                       ErrorCode.INPUT_FETCH_FAILED})


def failure(code: ErrorCode) -> dict[str, object]:
    """The columns recording a failure's code, for an UPDATE's values."""
    return {"error_code": code.value, "retryable": code in RETRYABLE}


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


# An operator's retry starts these over (queued, attempts from zero, same ids and output keys).
# No worker path takes it: the table above keeps them terminal for everything else.
OPERATOR_RETRYABLE = frozenset({JobStatus.FAILED})
