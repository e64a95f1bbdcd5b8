"""Thin task shims: the work is in `workers.batch` and `workers.reconcile`, which know no Celery.

Retry is decided here, once: storage or database trouble releases the claimed jobs and retries the
message with backoff; an item's own failure is recorded on the job and is never retried.
"""

from __future__ import annotations

import logging
from functools import cache
from typing import Any

from celery import Task

from core.dispatch import RECONCILE, RUN_BATCH
from core.settings import get_settings
from core.storage import Storage
from models.profiles import Registry
from workers import telemetry
from workers.app import app
from workers.batch import MicroBatch
from workers.pause import hand_back_if_paused
from workers.reconcile import reconcile

log = logging.getLogger(__name__)


@cache
def _worker_state() -> tuple[Storage, Registry]:
    """Built on first use inside the worker process (after fork), then kept warm."""
    settings = get_settings()
    return Storage(settings), Registry(settings)


@app.task(name=RUN_BATCH, bind=True, max_retries=5)
def run_batch(self: Task, job_ids: list[str]) -> dict[str, Any]:
    if hand_back_if_paused(self, get_settings(), job_ids):
        return {"claimed": 0, "paused": True}
    storage, registry = _worker_state()
    batch = MicroBatch(get_settings(), storage, registry.get, worker=self.request.hostname or "worker")
    try:
        outcomes = batch.run(job_ids)
    except Exception as exc:
        countdown = min(300, 5 * 2**self.request.retries)
        log.warning("micro-batch of %d failed (%s); retrying in %ds", len(job_ids), exc, countdown)
        raise self.retry(exc=exc, countdown=countdown) from exc
    telemetry.record(outcomes, self.request.hostname or "worker")
    return {"claimed": len(outcomes), "succeeded": sum(o.status == "succeeded" for o in outcomes)}


@app.task(name=RECONCILE)
def reconcile_task() -> dict[str, int]:
    return reconcile(get_settings())
