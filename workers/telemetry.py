"""Worker-side Prometheus metrics: micro-batch sizes, seconds per stage, images produced, memory.

Recorded in the process that runs the micro-batch (the Celery pool child) and served from it on
`STEP1X_WORKER_METRICS_PORT` + the GPU index, so every worker on every host is a scrape target of its
own; nothing is aggregated through a shared directory or the database. The one thing written to the
database is a sample of memory and images at most once a minute, for the dashboard's workers page.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from celery.signals import worker_process_init
from prometheus_client import Counter, Gauge, Histogram, start_http_server
from sqlalchemy import delete

from core.db import session_scope
from core.settings import get_settings
from core.tables import WorkerSample, utcnow
from workers.registry import Presence, current, rss_bytes

log = logging.getLogger(__name__)

BATCH_SIZE = Histogram("step1x_microbatch_size", "Jobs claimed per micro-batch", ["model"],
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
STAGE_SECONDS = Histogram("step1x_stage_seconds",
                          "Seconds per job in each stage (queued, claim, load, run, encode, upload)",
                          ["stage", "model"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800))
IMAGES = Counter("step1x_images_produced", "Output images stored", ["model"])
JOBS = Counter("step1x_worker_jobs", "Jobs this worker finished, by outcome", ["status", "model"])


def worker_memory(presence: Presence | None) -> tuple[float, float]:
    """(resident, GPU) bytes of this worker: as its last heartbeat found them, which with an engine
    process (STEP1X_ENGINE_PROCESS) are both processes' RSS and that process's GPU memory; this
    process's own before the first beat."""
    rss, gpu = presence.memory if presence is not None else (None, None)
    if rss is None:
        resident = rss_bytes()
        # Not Linux: the peak is the best the standard library offers.
        rss = resident if resident is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if gpu is None:
        torch = sys.modules.get("torch")  # only once the models imported it; never imported from here
        gpu = torch.cuda.memory_allocated() if torch is not None and torch.cuda.is_available() else 0
    return float(rss), float(gpu)


Gauge("step1x_worker_process_rss_bytes", "Resident memory of this worker (with an engine process, of both)"
      ).set_function(lambda: worker_memory(current())[0])
Gauge("step1x_worker_process_gpu_memory_bytes", "GPU memory torch holds in this worker (in its engine process)"
      ).set_function(lambda: worker_memory(current())[1])


SAMPLE_EVERY = 60.0
KEEP_SAMPLES = timedelta(hours=2)
_last_sample = [0.0]
_images = [0]


def record(outcomes: Sequence[Any], worker: str) -> None:
    """One micro-batch's outcomes (`workers.batch.Outcome`), run by `worker` (its Celery name)."""
    by_model: dict[str, int] = {}
    for outcome in outcomes:
        model = outcome.job.model
        by_model[model] = by_model.get(model, 0) + 1
        JOBS.labels(str(outcome.status), model).inc()
        IMAGES.labels(model).inc(len(outcome.output_keys))
        _images[0] += len(outcome.output_keys)
        for stage, seconds in outcome.timings.items():
            STAGE_SECONDS.labels(stage, model).observe(seconds)
    for model, size in by_model.items():
        BATCH_SIZE.labels(model).observe(size)
    if time.monotonic() - _last_sample[0] >= SAMPLE_EVERY:
        _last_sample[0] = time.monotonic()
        try:
            sample(worker)
        except Exception as exc:  # history is a nicety: never fail a finished micro-batch for it
            log.warning("worker sample not recorded: %s", exc)


def sample(worker: str) -> None:
    now = utcnow()
    with session_scope(get_settings().database_url) as session:
        rss, gpu = worker_memory(current())
        session.add(WorkerSample(worker=worker, at=now, rss_bytes=int(rss), gpu_memory_bytes=int(gpu),
                                 images=_images[0]))
        session.execute(delete(WorkerSample).where(WorkerSample.worker == worker,
                                                   WorkerSample.at < now - KEEP_SAMPLES))


def metrics_port(base: int, visible_devices: str | None) -> int:
    """One port per worker on a host: the base plus the index of the one GPU it is pinned to."""
    devices = (visible_devices or "").split(",")
    return base + int(devices[0]) if len(devices) == 1 and devices[0].isdigit() else base


@worker_process_init.connect
def _serve(**_: Any) -> None:
    base = get_settings().worker_metrics_port
    if base:
        port = metrics_port(base, os.environ.get("CUDA_VISIBLE_DEVICES"))
        try:
            start_http_server(port)
        except OSError as exc:  # a metrics port in use must not stop the worker from working
            log.warning("worker metrics not served on port %d: %s", port, exc)
