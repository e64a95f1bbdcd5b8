"""The database rows. Every row carries its tenant; every query filters on it.

Times are naive UTC (SQLite has no time zones; PostgreSQL gets the same values) and go out on the
wire with a "Z".
"""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from core.status import JobStatus


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def new_ids(prefix: str, count: int) -> list[str]:
    """`count` ids like new_id's (128 random bits each) from one read of the OS's randomness: a
    catalog's 100,000 ids would otherwise cost 100,000 system calls."""
    digits = os.urandom(16 * count).hex()
    return [f"{prefix}_{digits[i:i + 32]}" for i in range(0, 32 * count, 32)]


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[str]: JSON, list[dict[str, Any]]: JSON}


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    # sha256 of the key: a leaked database does not leak working keys.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # shown in listings so a key can be recognised
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime)
    # An operator key sees every tenant on the dashboard and may pause queues and drain workers.
    operator: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class File(Base):
    """An uploaded input image or mask, content-addressed: the id is the sha256 of its bytes."""

    __tablename__ = "files"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    content_type: Mapped[str] = mapped_column(String(32))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(Integer)
    storage_key: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # Fraction of pixels a mask made of this file redraws (core.masks); null for rows from before it.
    mask_coverage: Mapped[float | None] = mapped_column(Float)


class Batch(Base):
    __tablename__ = "batches"
    # Listing pages newest first, for one tenant or (operators) for all; sweeps by deadline and age.
    __table_args__ = (
        Index("ix_batches_tenant_created", "tenant_id", "created_at"),
        Index("ix_batches_created", "created_at"),
        Index("ix_batches_expires_at", "expires_at"),
        Index("ix_batches_finished_at", "finished_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("bat"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    total: Mapped[int] = mapped_column(Integer)
    canceled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # Set once, by whoever sees the last job become terminal (a conditional UPDATE, so exactly once).
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    # Jobs per status, moved by database triggers on jobs in the transaction of every status change
    # (migration 0008, see core.progress), so reading a batch is one row and finishing a micro-batch
    # never counts the whole batch.
    queued_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    running_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    succeeded_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    failed_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    canceled_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    expired_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # When every micro-batch message of the catalog was sent: one row stamped instead of every job
    # (the reconciler reads a job as sent if it or its batch carries a stamp).
    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime)
    # When a worker first claimed one of its jobs, and when the user canceled it.
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    canceled_at: Mapped[datetime | None] = mapped_column(DateTime)
    # Seconds after creation its unfinished jobs end `expired` (expires_at = created_at + window).
    completion_window: Mapped[int] = mapped_column(Integer, default=24 * 3600)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    # Seconds after finishing its outputs are deleted; the sweep records when it did.
    output_ttl: Mapped[int] = mapped_column(Integer, default=7 * 24 * 3600)
    outputs_deleted_at: Mapped[datetime | None] = mapped_column(DateTime)


class BatchUsage(Base):
    """What a batch's jobs cost so far, per device kind, moved by a trigger on jobs whenever a job's
    usage is recorded (core.progress): a batch's totals are read without summing 100,000 jobs."""

    __tablename__ = "batch_usage"

    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id"), primary_key=True)
    device: Mapped[str] = mapped_column(String(16), primary_key=True)  # "" where none was recorded
    megapixels: Mapped[float] = mapped_column(Float, default=0.0)
    steps: Mapped[int] = mapped_column(BigInteger, default=0)
    compute_seconds: Mapped[float] = mapped_column(Float, default=0.0)


FINISHED = text("finished_at IS NOT NULL")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("batch_id", "custom_id"),
        Index("ix_jobs_batch_status", "batch_id", "status"),
        Index("ix_jobs_status_lease", "status", "lease_until"),
        Index("ix_jobs_tenant_fingerprint", "tenant_id", "fingerprint"),
        # A tenant's queued single jobs (batch_id NULL) for the backpressure cap, without a scan;
        # it leads with tenant_id, so it also serves every tenant-scoped lookup.
        Index("ix_jobs_tenant_batch_status", "tenant_id", "batch_id", "status"),
        # The dashboard's overview and metrics: queue depth and oldest queued job per lane and per
        # model read these indexes alone; throughput and failure rate range over finished_at.
        Index("ix_jobs_status_lane_created", "status", "lane", "created_at"),
        Index("ix_jobs_status_model_created", "status", "model", "created_at"),
        # Only finished jobs are in these two: every query over them bounds finished_at, and a
        # catalog's insert then writes no entry to them (migration 0010).
        Index("ix_jobs_finished", "finished_at", "status", postgresql_where=FINISHED, sqlite_where=FINISHED),
        Index("ix_jobs_batch_finished", "batch_id", "finished_at", postgresql_where=FINISHED,
              sqlite_where=FINISHED),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("job"))
    # No foreign keys on the two owners: PostgreSQL checks one per row, and on a catalog's COPY those
    # checks were 40% of storing it (migration 0010). Jobs are written only by core.intake, in the
    # transaction that creates their batch under an authenticated tenant, and deleted before their batch.
    tenant_id: Mapped[str] = mapped_column(String(64))
    batch_id: Mapped[str | None] = mapped_column(String(40))
    custom_id: Mapped[str | None] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))
    model: Mapped[str] = mapped_column(String(100))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    seed: Mapped[int] = mapped_column(BigInteger)  # seeds go up to 2**32 - 1
    # interactive (single jobs) or bulk (batches): separate queues so a catalog never starves a user.
    lane: Mapped[str] = mapped_column(String(16), default="bulk")
    # Jobs with the same group key can share one forward pass (see core.dispatch).
    group_key: Mapped[str] = mapped_column(String(200))
    cost: Mapped[int] = mapped_column(Integer)  # pixels it adds to a forward pass
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED)
    # Runs charged to the item: a claim charges one, a hand-back for infrastructure trouble refunds
    # it, so only the item's own failures and lost workers count toward STEP1X_MAX_ATTEMPTS.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Every claim, charged or not: the fence that tells one run from the next (never decreases).
    claims: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # When infrastructure trouble (S3, database, broker) first handed this job back; cleared when it
    # runs through. Past STEP1X_OUTAGE_BUDGET of it the job fails with error_code "outage".
    outage_since: Mapped[datetime | None] = mapped_column(DateTime)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime)
    worker: Mapped[str | None] = mapped_column(String(200))
    error: Mapped[str | None] = mapped_column(Text)
    # Machine-readable cause of a failure or cancel (core.status.ErrorCode) and whether trying the
    # same job again could succeed.
    error_code: Mapped[str | None] = mapped_column(String(32))
    retryable: Mapped[bool | None] = mapped_column(Boolean)
    # 0..1 while it runs (diffusion steps, upscale tiles), written at most about once a second.
    progress: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    output_keys: Mapped[list[str] | None] = mapped_column(JSON)
    # seed(s), model hash, library versions, whether the output came from the identical-job cache
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    fingerprint: Mapped[str | None] = mapped_column(String(64))
    timings: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # What the job cost: megapixels of output drawn, denoising steps run, seconds of compute and
    # the device kind ("cpu", "cuda") that spent them. Summed per batch.
    usage_megapixels: Mapped[float | None] = mapped_column(Float)
    usage_steps: Mapped[int | None] = mapped_column(Integer)
    usage_compute_seconds: Mapped[float | None] = mapped_column(Float)
    usage_device: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)


class IdempotencyKey(Base):
    """A POST's Idempotency-Key: the same key and body return the resource it created the first time."""

    __tablename__ = "idempotency_keys"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class ReconcilerRun(Base):
    """When the reconciler last ran through (one row per deployment): `/readyz` reports a stale one,
    so a deployment without its control process is visible."""

    __tablename__ = "reconciler_runs"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    ran_at: Mapped[datetime] = mapped_column(DateTime)
    report: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class WorkerRow(Base):
    """One worker process, as it last reported itself. Each worker refreshes its row every few
    seconds (`heartbeat_at`); a row whose heartbeat is old belongs to a dead worker, whose running
    jobs the reconciler recovers, and the dashboard reads the rest."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)  # Celery hostname, e.g. gpu0@host
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(200))  # "cpu", or the GPU's name
    device_memory_bytes: Mapped[int | None] = mapped_column(BigInteger)  # the GPU's total memory
    queues: Mapped[list[str]] = mapped_column(JSON, default=list)  # what it consumes
    profiles: Mapped[list[str]] = mapped_column(JSON, default=list)  # model profiles loaded (warm)
    # The micro-batch in hand: {"job_ids": [...], "model": ..., "since": ISO time}; null when idle.
    current: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    images_done: Mapped[int] = mapped_column(BigInteger, default=0)
    rss_bytes: Mapped[int | None] = mapped_column(BigInteger)
    gpu_memory_bytes: Mapped[int | None] = mapped_column(BigInteger)  # allocated by torch now
    # Set by an operator: finish the micro-batch in hand, then take nothing more.
    draining: Mapped[bool] = mapped_column(Boolean, default=False)
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime)  # a clean shutdown says so


class Calibration(Base):
    """The best micro-batch a device measured for a model profile (`step1x worker --calibrate`):
    the planner cuts micro-batches to `pixel_budget` instead of the profile's guess."""

    __tablename__ = "calibrations"

    profile: Mapped[str] = mapped_column(String(100), primary_key=True)
    device: Mapped[str] = mapped_column(String(200), primary_key=True)
    batch_size: Mapped[int] = mapped_column(Integer)
    pixel_budget: Mapped[int] = mapped_column(BigInteger)
    images_per_s: Mapped[float] = mapped_column(Float)
    # every size tried: [{"batch_size", "images_per_s", "peak_bytes"}]; oom marks the size that did not fit
    trials: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    worker: Mapped[str] = mapped_column(String(200))
    measured_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class QueuePause(Base):
    """A lane or a model queue an operator paused: submissions are still accepted, but workers hand
    its messages back instead of claiming the jobs."""

    __tablename__ = "queue_pauses"

    scope: Mapped[str] = mapped_column(String(16), primary_key=True)  # "lane" or "model"
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    paused_by: Mapped[str] = mapped_column(String(64))  # the operator's tenant name
    paused_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class WorkerSample(Base):
    """A worker process's memory and output count, recorded after a micro-batch at most once a minute:
    the workers page's last-hour history. Older samples are pruned as new ones come."""

    __tablename__ = "worker_samples"

    worker: Mapped[str] = mapped_column(String(200), primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime, primary_key=True, index=True)
    rss_bytes: Mapped[int | None] = mapped_column(BigInteger)
    gpu_memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    images: Mapped[int] = mapped_column(BigInteger, default=0)  # produced by this process so far


class WebhookEndpoint(Base):
    """Where a tenant wants its events. `events` lists the types it takes ("*": every type, but a
    batch's per-item job events only when named)."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("whe"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    url: Mapped[str] = mapped_column(String(2000))
    events: Mapped[list[str]] = mapped_column(JSON)
    description: Mapped[str] = mapped_column(String(500), default="")
    secret: Mapped[str] = mapped_column(String(64))
    # After a rotation the old secret signs too, until this time, so receivers can switch over.
    previous_secret: Mapped[str | None] = mapped_column(String(64))
    previous_secret_until: Mapped[datetime | None] = mapped_column(DateTime)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    disabled_reason: Mapped[str | None] = mapped_column(Text)
    # First failure since the last success: an endpoint failing for days is disabled.
    failing_since: Mapped[datetime | None] = mapped_column(DateTime)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class WebhookSigningSecret(Base):
    """The tenant's own secret, which signs per-request callbacks (`webhook` on a job or batch)."""

    __tablename__ = "webhook_signing_secrets"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    secret: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class WebhookCallback(Base):
    """A per-request callback: the `webhook` URL given with a job or a batch."""

    __tablename__ = "webhook_callbacks"

    resource_id: Mapped[str] = mapped_column(String(40), primary_key=True)  # job or batch id
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    url: Mapped[str] = mapped_column(String(2000))
    events: Mapped[list[str]] = mapped_column(JSON)


class WebhookEvent(Base):
    """The outbox: written in the same transaction as the state change it reports."""

    __tablename__ = "webhook_events"
    __table_args__ = (Index("ix_webhook_events_resource", "resource_id", "type", "sequence"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("evt"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    type: Mapped[str] = mapped_column(String(40))
    resource_id: Mapped[str] = mapped_column(String(40))
    sequence: Mapped[int] = mapped_column(Integer)  # per resource, counting from 1
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class WebhookDelivery(Base):
    """One event for one destination. Its id is the `webhook-id` header, the same on every attempt."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_endpoint", "endpoint_id", "id"),
        Index("ix_webhook_deliveries_sending", "endpoint_id", "sending_until"),
        # The dashboard's deliveries page: an endpoint's log newest first, and its counts per status
        # and last success from the index alone.
        Index("ix_webhook_deliveries_endpoint_created", "endpoint_id", "created_at", "id"),
        Index("ix_webhook_deliveries_endpoint_status", "endpoint_id", "status", "finished_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("msg"))
    event_id: Mapped[str] = mapped_column(ForeignKey("webhook_events.id"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    endpoint_id: Mapped[str | None] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"))
    callback_url: Mapped[str | None] = mapped_column(String(2000))  # per-request callbacks have no endpoint
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | succeeded | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # since the last (re)delivery request
    # When the next attempt is due. Claiming a delivery moves it past the attempt's timeout (a lease):
    # whoever claims first sends it, and a crashed sender's delivery is due again when that passes.
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # Set while an attempt is on the wire: a destination gets only a few at once, so a slow receiver
    # holds a few of the control process's threads, never all of them.
    sending_until: Mapped[datetime | None] = mapped_column(DateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)


class WebhookAttempt(Base):
    """Every HTTP attempt of a delivery: when, the status code, latency, the start of the answer."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    status_code: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[int] = mapped_column(Integer)
    response: Mapped[str | None] = mapped_column(Text)  # first 1 kB of the body
    error: Mapped[str | None] = mapped_column(Text)


class InputFetch(Base):
    """A job input given as a URL, waiting to be downloaded before the job is dispatched."""

    __tablename__ = "input_fetches"
    __table_args__ = (Index("ix_input_fetches_due", "next_attempt_at"),)

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    field: Mapped[str] = mapped_column(String(16), primary_key=True)  # image, mask or edges
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    batch_id: Mapped[str | None] = mapped_column(String(40), index=True)
    url: Mapped[str] = mapped_column(String(2000))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)  # claimed like a delivery
    last_error: Mapped[str | None] = mapped_column(Text)
