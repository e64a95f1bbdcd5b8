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


class Batch(Base):
    __tablename__ = "batches"
    __table_args__ = (
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
    # When a worker first claimed one of its jobs, and when the user canceled it.
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    canceled_at: Mapped[datetime | None] = mapped_column(DateTime)
    # Seconds after creation its unfinished jobs end `expired` (expires_at = created_at + window).
    completion_window: Mapped[int] = mapped_column(Integer, default=24 * 3600)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    # Seconds after finishing its outputs are deleted; the sweep records when it did.
    output_ttl: Mapped[int] = mapped_column(Integer, default=7 * 24 * 3600)
    outputs_deleted_at: Mapped[datetime | None] = mapped_column(DateTime)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("batch_id", "custom_id"),
        Index("ix_jobs_batch_status", "batch_id", "status"),
        Index("ix_jobs_status_lease", "status", "lease_until"),
        Index("ix_jobs_tenant_fingerprint", "tenant_id", "fingerprint"),
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
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime)
    worker: Mapped[str | None] = mapped_column(String(200))
    error: Mapped[str | None] = mapped_column(Text)
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
