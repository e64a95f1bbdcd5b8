"""The database rows. Every row carries its tenant; every query filters on it.

Times are naive UTC (SQLite has no time zones; PostgreSQL gets the same values) and go out on the
wire with a "Z".
"""

from __future__ import annotations

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
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from core.status import JobStatus


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[str]: JSON}


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
    # Listing pages newest first, for one tenant or (operators) for all.
    __table_args__ = (
        Index("ix_batches_tenant_created", "tenant_id", "created_at"),
        Index("ix_batches_created", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("bat"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    total: Mapped[int] = mapped_column(Integer)
    canceled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # Set once, by whoever sees the last job become terminal (a conditional UPDATE, so exactly once).
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("batch_id", "custom_id"),
        Index("ix_jobs_batch_status", "batch_id", "status"),
        Index("ix_jobs_status_lease", "status", "lease_until"),
        Index("ix_jobs_tenant_fingerprint", "tenant_id", "fingerprint"),
        # The dashboard's overview and metrics: queue depth and oldest queued job per lane and per
        # model read these indexes alone; throughput and failure rate range over finished_at.
        Index("ix_jobs_status_lane_created", "status", "lane", "created_at"),
        Index("ix_jobs_status_model_created", "status", "model", "created_at"),
        Index("ix_jobs_finished", "finished_at", "status"),
        Index("ix_jobs_batch_finished", "batch_id", "finished_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("job"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id"))
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
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED, index=True)
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
