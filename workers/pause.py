"""Work a worker must not take is handed back to the broker unclaimed, so it spends no attempt and
waits its turn: a micro-batch of a paused lane or model, or any micro-batch reaching a draining worker
(draining also cancels its consumers through a Celery broadcast; this covers a broadcast it missed)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from celery import Task
from sqlalchemy import select

from core.db import session_scope
from core.dispatch import RUN_BATCH
from core.pauses import held
from core.settings import Settings
from core.tables import WorkerRow

# A worker whose queues hold only work it may not take re-reads them at this pace rather than spinning.
HOLD_SECONDS = 1.0


def hand_back_if_paused(task: Task, settings: Settings, job_ids: Sequence[str]) -> bool:
    """Re-publish the message to the queue it came from when it must wait; True if it did."""
    with session_scope(settings.database_url) as session:
        draining = session.scalar(select(WorkerRow.draining).where(WorkerRow.name == task.request.hostname))
        if not draining and not held(session, job_ids):
            return False
    time.sleep(HOLD_SECONDS)
    queue = (task.request.delivery_info or {}).get("routing_key") or "bulk"
    task.app.send_task(RUN_BATCH, args=[list(job_ids)], queue=queue)
    return True
