"""Plan jobs into micro-batches and send them through Redis to the Celery workers.

A micro-batch holds jobs that can share one forward pass (same group key: kind, mode, model,
resolution bucket, steps, guidance) and whose summed cost fits the model's pixel budget. The
message carries job ids only; the database stays the source of truth, so a lost or duplicated
message costs nothing but a redispatch or a skipped claim.

The Celery app is configured here (not in `workers`) because the API sends tasks too and must
not import the worker package.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from celery import Celery

from core.settings import Settings
from core.specs import AnySpec, GenerateSpec, InpaintSpec, generation_bucket

RUN_BATCH = "step1x.run_batch"
RECONCILE = "step1x.reconcile"
OUTBOUND_DUE = "step1x.outbound_due"
LANES = ("interactive", "bulk")  # queue names; workers listen to interactive first
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


def cut(jobs: Iterable[Planned], settings: Settings) -> list[list[Planned]]:
    """Group compatible jobs and cut each group into micro-batches that fit their model's pixel
    budget. A job larger than the budget runs alone.
    Order within a group is kept, so a catalog comes out roughly in the order it went in.
    """
    groups: dict[tuple[str, str], list[Planned]] = defaultdict(list)
    for job in jobs:
        groups[(job.lane, job.group_key)].append(job)
    batches: list[list[Planned]] = []
    for (_, key), members in groups.items():
        budget = budget_for(key, settings)
        current: list[Planned] = []
        used = 0
        for job in members:
            if current and used + job.cost > budget:
                batches.append(current)
                current, used = [], 0
            current.append(job)
            used += job.cost
        if current:
            batches.append(current)
    return batches


def budget_for(group_key: str, settings: Settings) -> int:
    return settings.models[group_key.split("|", 1)[0]].pixel_budget


@lru_cache(maxsize=4)
def celery_app(broker_url: str, visibility_timeout: int, reconcile_interval: float,
               outbound_due_interval: float = 5.0) -> Celery:
    app = Celery("step1x", broker=broker_url, set_as_current=False)
    app.conf.update(
        # A message is acknowledged only after its micro-batch finished, and a worker that dies
        # mid-batch gives its message back; every step is idempotent, so running twice is safe.
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
    app = app_for(settings)
    with app.producer_or_acquire() as producer:
        for batch in batches:
            app.send_task(RUN_BATCH, args=[[job.id for job in batch]], queue=batch[0].lane, producer=producer)
    return len(batches)
