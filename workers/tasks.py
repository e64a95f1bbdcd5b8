"""Thin task shims of the inference workers: the work is in `workers.batch`, which knows no Celery.

The task claims its micro-batch and hands its forward pass to the engine process
(`workers.engine_host`; with STEP1X_ENGINE_PROCESS=0 it runs it itself); storing the outputs runs
in the process's pipeline (`workers.pipeline`) while the next message's forward pass runs.

Retry is decided here, once. An item's own failure is recorded on the job and never retried.
Infrastructure trouble (storage, database, broker) hands the jobs back without charging them an
attempt and retries the message with backoff, doubling from STEP1X_OUTAGE_RETRY_BASE up to
STEP1X_OUTAGE_RETRY_MAX, for as long as the trouble lasts within STEP1X_OUTAGE_BUDGET. Past the
budget the jobs fail with error_code "outage" when they are handed back; if even the database is
gone by then, the message is dropped and the reconciler sends the jobs again once it is back.
Trouble while storing is handled the same way: the pipeline hands the jobs back and sends the
message again.
"""

from __future__ import annotations

import logging
import time
from functools import cache
from typing import Any

from celery import Task
from celery.signals import worker_init, worker_process_init, worker_process_shutdown

from core import heap
from core.dispatch import RUN_BATCH
from core.settings import Settings, get_settings
from core.storage import Storage
from models.profiles import Registry
from workers import pipeline, registry, telemetry
from workers.app import app
from workers.batch import Interrupted, MicroBatch
from workers.engine_host import HostedRegistry
from workers.lookahead import Lookahead, prefetching
from workers.pause import hand_back_if_paused

log = logging.getLogger(__name__)


@cache
def _worker_state() -> tuple[Storage, Registry | HostedRegistry, pipeline.Pipeline, Lookahead | None]:
    """Built as the pool process starts (after fork), then kept warm."""
    settings = get_settings()
    engines: Registry | HostedRegistry = HostedRegistry(settings) if settings.engine_process else Registry(settings)
    presence = registry.current()
    if presence is not None:
        presence.profiles = engines.loaded
    if isinstance(engines, HostedRegistry):
        engines.host()  # started now, so it is up (and the row knows its device) before the first message
        if presence is not None:
            presence.engine_status = engines.status
    storage = Storage(settings)
    # The queues this worker reads, in the order it reads them (its -Q list).
    queues = list(app.amqp.queues.consume_from or ())
    lookahead = Lookahead(settings, storage, queues) if prefetching(settings) and queues else None
    if lookahead is not None:
        log.info("reading inputs ahead: the next message of %s", ", ".join(queues))
    return storage, engines, pipeline.Pipeline(settings.pipeline_depth), lookahead


@worker_init.connect
def _freeze(**_: Any) -> None:
    """In the worker's main process, which delivers the messages, before it forks the pool process:
    what is imported is frozen there, and the pool process starts with it frozen too (no collection
    of the pool process writes to the pages it shares with its parent). Long collections are
    logged in both."""
    if get_settings().freeze_heap:
        heap.freeze()
    heap.report_pauses()  # after the freeze's own collection, which is the start's


@worker_process_init.connect
def _warm(**_: Any) -> None:
    """Build the worker's state as the pool process starts, not when the first message comes."""
    heap.hold_freed_memory()  # its forward passes (STEP1X_ENGINE_PROCESS=0), encodes and uploads
    if get_settings().freeze_heap:
        # What the fork brought is frozen; the state comes after, so what it replaces stays
        # collectable (a dead engine process's handle, caught up in its exception's traceback).
        heap.freeze()
    try:
        _worker_state()
    except Exception:  # not cached: the first task tries again and reports it
        log.exception("the worker's state could not be built at start")


@worker_process_shutdown.connect
def _shutdown(**_: Any) -> None:
    """A pool process leaving (warm shutdown, recycling): store what its pipeline holds, then record
    it stopped. In that order: a stopped worker's running jobs are recovered elsewhere, and these
    are still being stored."""
    pipeline.drain_all()
    registry.stop()


def _next_try(settings: Settings, exc: Exception, job_ids: list[str], interrupted: dict[str, int] | None,
              trouble_since: float | None, retries: int) -> tuple[dict[str, Any], float] | None:
    """The retry's kwargs and countdown after infrastructure trouble, or None past the budget."""
    held = {**(interrupted or {}), **exc.held} if isinstance(exc, Interrupted) else interrupted
    since = trouble_since or time.time()
    if time.time() - since > settings.outage_budget:
        log.error("micro-batch of %d: infrastructure down for over %gs (%s); leaving its jobs to the "
                  "reconciler", len(job_ids), settings.outage_budget, exc)
        return None
    countdown = min(settings.outage_retry_max, settings.outage_retry_base * 2**retries)
    log.warning("micro-batch of %d interrupted (%s); retrying in %.1fs", len(job_ids), exc, countdown)
    return {"interrupted": held, "trouble_since": since}, countdown


@app.task(name=RUN_BATCH, bind=True, max_retries=None)
def run_batch(self: Task, job_ids: list[str], interrupted: dict[str, int] | None = None,
              trouble_since: float | None = None) -> dict[str, Any]:
    """Claims the jobs and starts their forward pass, then hands the micro-batch to the pipeline and
    returns: the next message is claimed while this one runs and is stored."""
    settings = get_settings()
    if hand_back_if_paused(self, settings, job_ids):
        return {"claimed": 0, "paused": True}
    storage, engines, outputs, lookahead = _worker_state()
    if waiting := outputs.holding(job_ids):  # already run here and waiting to be stored
        job_ids = [job_id for job_id in job_ids if job_id not in waiting]
    worker = self.request.hostname or "worker"
    batch = MicroBatch(settings, storage, engines.get, worker=worker, presence=registry.current(), lookahead=lookahead)
    try:
        staged = batch.start(job_ids, interrupted)
    except Exception as exc:  # Interrupted, or the claim itself could not reach the database
        plan = _next_try(settings, exc, job_ids, interrupted, trouble_since, self.request.retries)
        if plan is None:
            return {"claimed": 0, "succeeded": 0}
        raise self.retry(exc=exc, countdown=plan[1], kwargs=plan[0]) from exc
    if staged is None:
        return {"claimed": 0}
    request = self.request

    def resend(exc: Interrupted) -> None:
        """The store was interrupted: send the message again, as `retry` would have."""
        plan = _next_try(settings, exc, job_ids, interrupted, trouble_since, request.retries)
        if plan is not None:
            self.signature_from_request(request, kwargs=plan[0], countdown=plan[1],
                                        retries=request.retries + 1).apply_async()

    report = {"claimed": len(staged.claimed), "images": staged.images}  # read before the pipeline stores it
    outputs.put(staged, lambda outcomes: telemetry.record(outcomes, worker), resend)
    return report
