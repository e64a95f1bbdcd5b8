"""Thin task shims of the inference workers: the work is in `workers.batch`, which knows no Celery.

Retry is decided here, once. An item's own failure is recorded on the job and never retried.
Infrastructure trouble (storage, database, broker) hands the jobs back without charging them an
attempt and retries the message with backoff, doubling from STEP1X_OUTAGE_RETRY_BASE up to
STEP1X_OUTAGE_RETRY_MAX, for as long as the trouble lasts within STEP1X_OUTAGE_BUDGET. Past the
budget the jobs fail with error_code "outage" when they are handed back; if even the database is
gone by then, the message is dropped and the reconciler sends the jobs again once it is back.
"""

from __future__ import annotations

import logging
import time
from functools import cache
from typing import Any

from celery import Task

from core.dispatch import RUN_BATCH
from core.settings import get_settings
from core.storage import Storage
from models.profiles import Registry
from workers import registry, telemetry
from workers.app import app
from workers.batch import Interrupted, MicroBatch
from workers.pause import hand_back_if_paused

log = logging.getLogger(__name__)


@cache
def _worker_state() -> tuple[Storage, Registry]:
    """Built on first use inside the worker process (after fork), then kept warm."""
    settings = get_settings()
    engines = Registry(settings)
    presence = registry.current()
    if presence is not None:
        presence.profiles = engines.loaded
    return Storage(settings), engines


@app.task(name=RUN_BATCH, bind=True, max_retries=None)
def run_batch(self: Task, job_ids: list[str], interrupted: dict[str, int] | None = None,
              trouble_since: float | None = None) -> dict[str, Any]:
    settings = get_settings()
    if hand_back_if_paused(self, settings, job_ids):
        return {"claimed": 0, "paused": True}
    storage, engines = _worker_state()
    batch = MicroBatch(settings, storage, engines.get, worker=self.request.hostname or "worker",
                       presence=registry.current())
    try:
        outcomes = batch.run(job_ids, interrupted)
    except Exception as exc:  # Interrupted, or the claim itself could not reach the database
        held = {**(interrupted or {}), **exc.held} if isinstance(exc, Interrupted) else interrupted
        since = trouble_since or time.time()
        if time.time() - since > settings.outage_budget:
            log.error("micro-batch of %d: infrastructure down for over %gs (%s); leaving its jobs to the "
                      "reconciler", len(job_ids), settings.outage_budget, exc)
            return {"claimed": 0, "succeeded": 0}
        countdown = min(settings.outage_retry_max, settings.outage_retry_base * 2**self.request.retries)
        log.warning("micro-batch of %d interrupted (%s); retrying in %.1fs", len(job_ids), exc, countdown)
        raise self.retry(exc=exc, countdown=countdown,
                         kwargs={"interrupted": held, "trouble_since": since}) from exc
    telemetry.record(outcomes, self.request.hostname or "worker")
    return {"claimed": len(outcomes), "succeeded": sum(o.status == "succeeded" for o in outcomes)}
