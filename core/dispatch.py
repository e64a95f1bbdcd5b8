"""Plan jobs into micro-batches and send them through Redis to the Celery workers.

A micro-batch holds jobs that can share one forward pass (same group key: kind, mode, model,
resolution bucket, steps, guidance), whose summed cost fits the model's pixel budget and whose
number stays within its job cap. The
message carries job ids only; the database stays the source of truth, so a lost or duplicated
message costs nothing but a redispatch or a skipped claim.

The Celery app is configured here (not in `workers`) because the API sends tasks too and must
not import the worker package.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from celery import Celery

from core.settings import Settings
from core.specs import AnySpec, GenerateSpec, InpaintSpec, generation_bucket

RUN_BATCH = "step1x.run_batch"
RECONCILE = "step1x.reconcile"
OUTBOUND_DUE = "step1x.outbound_due"
LANES = ("interactive", "bulk")  # queue names; workers listen to interactive first
# Messages per Redis round trip when a catalog is sent.
PIPELINE = 500
# The light control process's queue (reconcile, webhook deliveries, URL fetches): never behind inference.
CONTROL = "control"


@dataclass(frozen=True)
class Planned:
    """What planning needs to know of a job."""

    id: str
    group_key: str
    cost: int  # pixels it adds to a forward pass
    lane: str


def plan(spec: AnySpec, settings: Settings, input_size: tuple[int, int] | None = None) -> tuple[str, int]:
    """The group key and pixel cost of one job. Jobs with equal keys can share one forward pass of
    the same loaded model; the key starts with the model's name, which owns the pixel budget."""
    assert spec.model is not None
    profile = settings.models[spec.model]
    if isinstance(spec, GenerateSpec):
        w, h = generation_bucket(spec.width, spec.height, profile.native_size)
        return f"{spec.model}|generate|{w}x{h}|{spec.steps}|{spec.guidance_scale:g}", w * h * spec.num_images
    if isinstance(spec, InpaintSpec):
        # Inpainting works on a crop resized to the native size: every input size shares one bucket.
        key = f"{spec.model}|inpaint.{spec.mode}|{spec.steps}|{spec.guidance_scale:g}|{spec.strength:g}"
        return key, profile.native_size**2
    if input_size is None:
        raise ValueError("planning an upscale needs the input image's size")
    # Upscalers count the pixels they produce: that is what fills memory in a forward pass.
    return f"{spec.model}|upscale|x{spec.scale}", input_size[0] * input_size[1] * spec.scale**2


class Cutter:
    """Cuts micro-batches as jobs arrive, so a catalog streamed in chunks never has to be held whole:
    a micro-batch is handed out as soon as it is full, the partial ones when the stream ends.
    Order within a group is kept, so a catalog comes out roughly in the order it went in."""

    def __init__(self, settings: Settings, budgets: Mapping[str, int] | None = None) -> None:
        self.settings = settings
        self.budgets = budgets or {}
        self._open: dict[tuple[str, str], tuple[list[Planned], int]] = {}
        self._limits: dict[str, tuple[int, int]] = {}  # group key: (pixel budget, most jobs)

    def add(self, job: Planned) -> list[Planned] | None:
        """Adds a job; returns the micro-batch it closed, if it closed one."""
        group = (job.lane, job.group_key)
        current, used = self._open.get(group, ([], 0))
        full = None
        limits = self._limits.get(job.group_key)
        if limits is None:
            limits = self._limits[job.group_key] = (budget_for(job.group_key, self.settings, self.budgets),
                                                    self.settings.models[model_of(job.group_key)].max_jobs)
        budget, most = limits
        if current and (used + job.cost > budget or len(current) >= most):
            full, current, used = current, [], 0
        current.append(job)
        self._open[group] = (current, used + job.cost)
        return full

    def flush(self) -> list[list[Planned]]:
        batches = [current for current, _ in self._open.values()]
        self._open.clear()
        return batches


def cut(jobs: Iterable[Planned], settings: Settings, budgets: Mapping[str, int] | None = None
        ) -> list[list[Planned]]:
    """Group compatible jobs and cut each group into micro-batches that fit their model's pixel
    budget and job cap (`max_jobs`). A job larger than the budget runs alone."""
    cutter = Cutter(settings, budgets)
    batches = [full for job in jobs if (full := cutter.add(job)) is not None]
    return batches + cutter.flush()


def model_of(group_key: str) -> str:
    return group_key.split("|", 1)[0]


def budget_for(group_key: str, settings: Settings, budgets: Mapping[str, int] | None = None) -> int:
    """The pixel budget of a group's model: measured on the workers' device (`--calibrate`) when
    known, else the profile's setting."""
    model = model_of(group_key)
    return (budgets or {}).get(model) or settings.models[model].pixel_budget


def queue_for(lane: str, model: str) -> str:
    """Each model has its own queue within each lane, so a micro-batch goes only to a worker that
    serves (and keeps warm) its model."""
    return f"{lane}.{model}"


def worker_queues(models: Iterable[str]) -> list[str]:
    """What a worker serving `models` consumes, in the order it reads them: every interactive queue
    before any bulk one. The bare lane names stay last in their lane for messages sent before
    queues were split per model."""
    names = sorted(models)
    return [queue for lane in LANES for queue in (*(queue_for(lane, m) for m in names), lane)]


def lane_queues(lane: str, settings: Settings) -> list[str]:
    return [*(queue_for(lane, m) for m in sorted(settings.models)), lane]


@lru_cache(maxsize=4)
def celery_app(broker_url: str, visibility_timeout: int, reconcile_interval: float,
               outbound_due_interval: float = 5.0) -> Celery:
    app = Celery("step1x", broker=broker_url, set_as_current=False)
    app.conf.update(
        # A message is acknowledged once its forward pass is done (storing goes on in the worker's
        # pipeline, under leases), and a worker that dies mid-pass gives its message back; one that
        # dies while storing leaves its jobs to the reconciler. Every step is idempotent.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # One micro-batch at a time per worker: a GPU runs one forward pass at a time anyway, and the
        # claim relies on it (a worker seeing its own name on a running job knows that run died).
        worker_concurrency=1,
        # Redis re-delivers unacknowledged messages after this long, crash or not. "priority" reads
        # the queues in the order the worker lists them (interactive, bulk) instead of taking turns,
        # so a single job never waits behind a catalog.
        broker_transport_options={"visibility_timeout": visibility_timeout, "queue_order_strategy": "priority"},
        broker_connection_retry_on_startup=True,
        task_default_queue="bulk",
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        # The reconciler runs in the control process, never behind a micro-batch; a run nobody took
        # in time expires instead of piling up while that process is away.
        task_routes={RECONCILE: {"queue": CONTROL}},
        beat_schedule={
            "reconcile": {"task": RECONCILE, "schedule": reconcile_interval,
                          "options": {"queue": CONTROL, "expires": reconcile_interval}},
            # Webhook deliveries and URL fetches that are due (retries, lost messages).
            "outbound-due": {"task": OUTBOUND_DUE, "schedule": outbound_due_interval,
                             "options": {"queue": CONTROL, "expires": outbound_due_interval}},
        },
    )
    return app


def app_for(settings: Settings) -> Celery:
    return celery_app(settings.redis_url, settings.visibility_timeout, settings.reconcile_interval,
                      settings.outbound_due_interval)


def send(batches: Sequence[Sequence[Planned]], settings: Settings) -> int:
    """One message per micro-batch, over one broker connection. Returns the number of messages."""
    return send_ids(((queue_for(b[0].lane, model_of(b[0].group_key)), [job.id for job in b]) for b in batches),
                    settings)


def send_ids(messages: Iterable[tuple[str, list[str]]], settings: Settings) -> int:
    """Send (queue, job ids) messages over one broker connection; returns how many were sent.
    The first leaves at once; the rest go in Redis pipelines of PIPELINE messages (kombu's publish
    batch), one round trip each instead of one per message: a catalog is thousands of messages."""
    app = app_for(settings)
    sent = 0
    with app.producer_or_acquire() as producer:
        pending = iter(messages)
        for queue, ids in itertools.islice(pending, 1):
            _send(app, producer, queue, ids)
            sent += 1
        with producer.batch(max_size=PIPELINE):
            for queue, ids in pending:
                _send(app, producer, queue, ids)
                sent += 1
    return sent


def _send(app: Celery, producer: Any, queue: str, ids: list[str]) -> None:
    # A short argsrepr: Celery's safe repr of 16 ids costs more than the rest of the send.
    app.send_task(RUN_BATCH, args=[ids], queue=queue, producer=producer,
                  argsrepr=f"[{len(ids)} job ids]", kwargsrepr="{}")
