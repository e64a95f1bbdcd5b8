"""Work a worker must not take is handed back to the broker unclaimed, so it spends no attempt and
waits its turn: a micro-batch of a paused lane or model, or any micro-batch reaching a draining worker
(draining also cancels its consumers through a Celery broadcast; this covers a broadcast it missed).

A micro-batch's lane and model are in the name of the queue it came from (`bulk.tiny-sd`), so the
check needs no job row: each pool process reads the pauses and its own draining flag at most once
per CHECK_SECONDS, not once per micro-batch. A pause or a drain reaches the workers within that.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from celery import Task
from sqlalchemy import select

from core.db import session_scope
from core.dispatch import RUN_BATCH
from core.pauses import held
from core.settings import Settings
from core.tables import QueuePause, WorkerRow

# A worker whose queues hold only work it may not take re-reads them at this pace rather than spinning.
HOLD_SECONDS = 1.0
CHECK_SECONDS = 1.0


class _View:
    """This process's last look at the pauses and its own draining flag."""

    read_at = -math.inf
    paused: frozenset[tuple[str, str]] = frozenset()
    draining = False


def _view(settings: Settings, worker: str | None) -> type[_View]:
    now = time.monotonic()
    if now - _View.read_at >= CHECK_SECONDS:
        with session_scope(settings.database_url) as session:
            _View.draining = bool(session.scalar(select(WorkerRow.draining).where(WorkerRow.name == worker)))
            _View.paused = frozenset(session.execute(select(QueuePause.scope, QueuePause.name)).tuples())
        _View.read_at = now
    return _View


def _must_wait(settings: Settings, worker: str | None, queue: str, job_ids: Sequence[str]) -> bool:
    lane, _, model = queue.partition(".")
    if not model:  # a bare lane queue (messages from before per-model queues): ask the jobs
        with session_scope(settings.database_url) as session:
            draining = session.scalar(select(WorkerRow.draining).where(WorkerRow.name == worker))
            return bool(draining) or held(session, job_ids)
    view = _view(settings, worker)
    return view.draining or ("lane", lane) in view.paused or ("model", model) in view.paused


def hand_back_if_paused(task: Task, settings: Settings, job_ids: Sequence[str]) -> bool:
    """Re-publish the message to the queue it came from when it must wait; True if it did."""
    queue = (task.request.delivery_info or {}).get("routing_key") or "bulk"
    if not _must_wait(settings, task.request.hostname, queue, job_ids):
        return False
    time.sleep(HOLD_SECONDS)
    task.app.send_task(RUN_BATCH, args=[list(job_ids)], queue=queue)
    return True
