"""Paused work is handed back to the broker unclaimed, so it spends no attempt and waits its turn."""

from __future__ import annotations

import time
from collections.abc import Sequence

from celery import Task

from core.db import session_scope
from core.dispatch import RUN_BATCH
from core.pauses import held
from core.settings import Settings

# A worker whose queues hold only paused work re-reads them at this pace rather than spinning.
HOLD_SECONDS = 1.0


def hand_back_if_paused(task: Task, settings: Settings, job_ids: Sequence[str]) -> bool:
    """Re-publish the message to the queue it came from when its lane or model is paused."""
    with session_scope(settings.database_url) as session:
        if not held(session, job_ids):
            return False
    time.sleep(HOLD_SECONDS)
    queue = (task.request.delivery_info or {}).get("routing_key") or "bulk"
    task.app.send_task(RUN_BATCH, args=[list(job_ids)], queue=queue)
    return True
