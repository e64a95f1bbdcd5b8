"""Wire models: what the HTTP API returns. Requests are validated by `core.specs`, so batch items
and single jobs get the same messages naming the item and field."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from core.storage import Storage
from core.tables import Batch, File, Job


def _z(value: datetime | None) -> str | None:
    return value.isoformat(timespec="milliseconds") + "Z" if value else None


class FieldErrorOut(BaseModel):
    item: str | None = Field(description="custom_id of the bad item (or #index, or null for the request)")
    field: str
    message: str


class ErrorOut(BaseModel):
    detail: str
    errors: list[FieldErrorOut] = Field(default_factory=list)


class ReadyOut(BaseModel):
    status: str = Field(description="ok, or unavailable")
    checks: dict[str, str] = Field(description="database, redis, s3, reconciler: ok, or why not")


class FileOut(BaseModel):
    id: str = Field(description="sha256 of the bytes; pass it as image, mask or edges")
    content_type: str
    width: int
    height: int
    size_bytes: int
    mask_coverage: float | None = Field(
        description="share of the pixels a mask made of this file redraws (0: empty, 1: all)")

    @classmethod
    def of(cls, row: File) -> FileOut:
        return cls(id=row.id, content_type=row.content_type, width=row.width, height=row.height,
                   size_bytes=row.size_bytes, mask_coverage=row.mask_coverage)


class Output(BaseModel):
    url: str = Field(description="presigned GET URL, valid for STEP1X_PRESIGN_SECONDS")
    key: str


class JobOut(BaseModel):
    id: str
    batch_id: str | None
    custom_id: str | None
    kind: str
    model: str
    status: str
    seed: int
    attempts: int
    progress: float = Field(description="0..1 while it runs (diffusion steps, upscale tiles); 1 when it succeeded")
    error: str | None
    error_code: str | None = Field(
        description="why it failed or stopped: invalid_input, model_unavailable, engine_error, outage, "
                    "worker_lost or canceled")
    retryable: bool | None = Field(description="whether the same job sent again could succeed")
    outputs: list[Output]
    timings: dict[str, Any] = Field(description="queued/started/finished times and seconds per stage")
    result: dict[str, Any] | None = Field(description="seeds, model hash, whether the output was reused")
    spec: dict[str, Any]

    @classmethod
    def of(cls, job: Job, storage: Storage) -> JobOut:
        name = job.custom_id or job.id
        outputs = [Output(key=key, url=storage.presign_get(key, f"{name}-{i}.png" if i else f"{name}.png"))
                   for i, key in enumerate(job.output_keys or [])]
        timings = {"queued_at": _z(job.created_at), "started_at": _z(job.started_at),
                   "finished_at": _z(job.finished_at), **(job.timings or {})}
        return cls(id=job.id, batch_id=job.batch_id, custom_id=job.custom_id, kind=job.kind, model=job.model,
                   status=job.status, seed=job.seed, attempts=job.attempts, progress=job.progress, error=job.error,
                   error_code=job.error_code, retryable=job.retryable, outputs=outputs,
                   timings=timings, result=job.result, spec=job.spec)


class JobPage(BaseModel):
    data: list[JobOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last")


class BatchIn(BaseModel):
    items: list[dict[str, Any]] = Field(min_length=1, description="job specs, each with a custom_id unique in "
                                                                   "the batch")
    metadata: dict[str, Any] = Field(default_factory=dict, description="yours, returned as is: a JSON object "
                                                                       "(STEP1X_MAX_METADATA_BYTES)")
    webhook: str | None = Field(None, max_length=2000, description="callback URL, signed with the tenant's secret "
                                                                   "(GET /v1/webhooks/secret)")
    webhook_events: list[str] | None = Field(None, description="default: batch.completed, batch.canceled")


class BatchOut(BaseModel):
    id: str
    status: str
    total: int
    counts: dict[str, int]
    progress: float = Field(description="finished jobs / total, 0..1")
    metadata: dict[str, Any]
    created_at: str | None
    finished_at: str | None

    @classmethod
    def of(cls, batch: Batch, status: str, counts: dict[str, int]) -> BatchOut:
        done = counts.get("succeeded", 0) + counts.get("failed", 0) + counts.get("canceled", 0)
        return cls(id=batch.id, status=status, total=batch.total, counts=counts,
                   progress=round(done / batch.total, 4) if batch.total else 1.0, metadata=batch.metadata_,
                   created_at=_z(batch.created_at), finished_at=_z(batch.finished_at))
