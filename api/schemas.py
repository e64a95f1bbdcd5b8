"""Wire models: what the HTTP API returns. Requests are validated by `core.specs`, so batch items
and single jobs get the same messages naming the item and field."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field, SkipValidation

from core.catalog import human
from core.storage import Storage
from core.tables import Batch, File, Job
from core.usage import job_usage


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


class UsageOut(BaseModel):
    megapixels: float = Field(description="megapixels of output drawn")
    steps: int = Field(description="denoising steps run (0 for upscalers and the classical filler)")
    compute_seconds: float = Field(description="seconds of model compute")
    device: str | None = Field(None, description="cpu or cuda; null when the output came from the cache")


class BatchUsageOut(BaseModel):
    megapixels: float
    steps: int
    compute_seconds: float
    compute_seconds_by_device: dict[str, float] = Field(description='for example {"cuda": 812.4}')


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
        description="why it failed or stopped: invalid_input, input_fetch_failed, model_unavailable, "
                    "engine_error, outage, expired, worker_lost or canceled")
    retryable: bool | None = Field(description="whether the same job sent again could succeed")
    outputs: list[Output] = Field(description="empty until it succeeds, and again once its outputs were "
                                              "deleted (output_ttl)")
    created_at: str | None
    started_at: str | None = Field(description="when its latest attempt started")
    finished_at: str | None = Field(description="when it succeeded, failed, was canceled or expired")
    usage: UsageOut | None = Field(description="what it cost; null until it finishes")
    timings: dict[str, Any] = Field(description="queued/started/finished times and seconds per stage")
    result: dict[str, Any] | None = Field(description="seeds, model hash, whether the output was reused")
    spec: dict[str, Any]

    @classmethod
    def of(cls, job: Job, storage: Storage) -> JobOut:
        name = job.custom_id or job.id
        outputs = []
        for i, key in enumerate(job.output_keys or []):
            extension = key.rsplit(".", 1)[-1]
            filename = f"{name}-{i}.{extension}" if i else f"{name}.{extension}"
            outputs.append(Output(key=key, url=storage.presign_get(key, filename)))
        usage = job_usage(job)
        timings = {"queued_at": _z(job.created_at), "started_at": _z(job.started_at),
                   "finished_at": _z(job.finished_at), **(job.timings or {})}
        return cls(id=job.id, batch_id=job.batch_id, custom_id=job.custom_id, kind=job.kind, model=job.model,
                   status=job.status, seed=job.seed, attempts=job.attempts, progress=job.progress, error=job.error,
                   error_code=job.error_code, retryable=job.retryable, outputs=outputs,
                   created_at=_z(job.created_at), started_at=_z(job.started_at), finished_at=_z(job.finished_at),
                   usage=UsageOut(**usage) if usage else None, timings=timings, result=job.result, spec=job.spec)


class JobPage(BaseModel):
    data: list[JobOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last")


# Checked by core.catalog (messages naming the field), so a boolean is refused rather than read as 1.
Duration = SkipValidation[int | str | None]
DURATION_HELP = "seconds, or a number with a unit: s, m, h, d"


class BatchIn(BaseModel):
    model_config = {"json_schema_extra": {"examples": [{
        "items": [{"custom_id": "sku-001", "kind": "generate", "prompt": "a white sneaker", "seed": 7},
                  {"custom_id": "sku-002", "kind": "upscale", "image": "<file id>", "output_format": "jpeg",
                   "quality": 85}],
        "metadata": {"catalog": "spring"}, "completion_window": "24h", "output_ttl": "7d"}]}}

    items: list[dict[str, Any]] = Field(min_length=1, description="job specs, each with a custom_id unique in "
                                                                   "the batch")
    metadata: dict[str, Any] = Field(default_factory=dict, description="yours, returned as is: a JSON object "
                                                                       "(STEP1X_MAX_METADATA_BYTES)")
    webhook: str | None = Field(None, max_length=2000, description="callback URL, signed with the tenant's secret "
                                                                   "(GET /v1/webhooks/secret)")
    webhook_events: list[str] | None = Field(None, description="default: batch.completed, batch.canceled")
    completion_window: Duration = Field(
        None, examples=["24h"], description=f"jobs not finished this long after submission end `expired` "
                                            f"(1m to 30d; default STEP1X_COMPLETION_WINDOW, 24h); {DURATION_HELP}")
    output_ttl: Duration = Field(
        None, examples=["7d"], description=f"outputs are deleted this long after the batch finishes (1h to 30d; "
                                           f"default STEP1X_OUTPUT_TTL, 7d); {DURATION_HELP}")


class BatchOut(BaseModel):
    id: str
    status: str
    total: int
    counts: dict[str, int]
    progress: float = Field(description="(finished jobs + how far the running ones are) / total, 0..1")
    metadata: dict[str, Any]
    created_at: str | None
    started_at: str | None = Field(description="when a worker first took one of its jobs")
    finished_at: str | None = Field(description="when its last job ended (succeeded, failed, canceled, expired)")
    canceled_at: str | None
    expires_at: str | None = Field(description="created_at + completion_window: jobs still queued then expire")
    completion_window: str = Field(examples=["24h"])
    output_ttl: str = Field(examples=["7d"])
    outputs_deleted_at: str | None = Field(description="when its outputs were deleted (output_ttl or DELETE)")
    usage: BatchUsageOut | None = Field(description="totals over its finished jobs (null in listings, which "
                                                    "skip the sum: read the batch for it)")

    @classmethod
    def of(cls, batch: Batch, status: str, counts: dict[str, int], usage: dict[str, Any] | None = None,
           running: float = 0.0) -> BatchOut:
        """`running` is how far its running jobs are (jobs.running_progress); listings leave it 0."""
        done = sum(counts.get(s, 0) for s in ("succeeded", "failed", "canceled", "expired")) + running
        return cls(id=batch.id, status=status, total=batch.total, counts=counts,
                   progress=min(1.0, round(done / batch.total, 4)) if batch.total else 1.0, metadata=batch.metadata_,
                   created_at=_z(batch.created_at), started_at=_z(batch.started_at),
                   finished_at=_z(batch.finished_at), canceled_at=_z(batch.canceled_at),
                   expires_at=_z(batch.expires_at), completion_window=human(batch.completion_window),
                   output_ttl=human(batch.output_ttl), outputs_deleted_at=_z(batch.outputs_deleted_at),
                   usage=BatchUsageOut(**usage) if usage is not None else None)
