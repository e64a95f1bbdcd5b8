"""`GET /v1/batches` (the caller's batches, filtered, cursor-paged) and `POST /v1/batches/{id}/retry`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from api.deps import SettingsDep, TenantDep
from api.schemas import BatchOut
from core import jobs, listing
from core.db import session_scope
from core.errors import InvalidInput
from core.operate import retry_failed
from core.usage import batch_usage

router = APIRouter(prefix="/v1/batches", tags=["batches"])


class BatchListItem(BatchOut):
    throughput: float = Field(description="jobs finished per second over the last minute")
    eta_seconds: float | None = Field(description="at the current throughput; null when idle or finished")

    @classmethod
    def from_progress(cls, p: listing.Progress) -> BatchListItem:
        base = BatchOut.of(p.batch, p.status, p.counts)
        return cls(**base.model_dump(), throughput=round(p.rate, 3),
                   eta_seconds=round(p.eta_seconds, 1) if p.eta_seconds is not None else None)


class BatchList(BaseModel):
    data: list[BatchListItem]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last")


class RetryOut(BaseModel):
    retried: int = Field(description="failed jobs queued again (same ids and output keys)")
    batch: BatchOut


@router.get("", response_model=BatchList)
def list_batches(tenant: TenantDep, settings: SettingsDep,
                 status: Annotated[listing.ListStatus | None, Query(
                     description="active (not finished), finished, or canceled")] = None,
                 created_from: datetime | None = None, created_to: datetime | None = None,
                 q: Annotated[str | None, Query(max_length=200,
                                                description="text in a job's custom_id or in the metadata")] = None,
                 cursor: str | None = None,
                 limit: Annotated[int, Query(ge=1, le=200)] = 50) -> BatchList:
    """Your batches, newest first, with progress, throughput and ETA."""
    filters = listing.BatchFilter(status=status, created_from=_naive(created_from, "created_from"),
                                  created_to=_naive(created_to, "created_to"),
                                  q=q or None)
    with session_scope(settings.database_url) as session:
        page, next_cursor = listing.list_batches(session, tenant, filters, cursor, limit)
        return BatchList(data=[BatchListItem.from_progress(p) for p in page], next_cursor=next_cursor)


@router.post("/{batch_id}/retry", response_model=RetryOut)
def retry(batch_id: str, tenant: TenantDep, settings: SettingsDep) -> RetryOut:
    """Queue the batch's failed jobs again: new attempts, same job ids and output keys."""
    retried = retry_failed(settings, tenant, batch_id)
    with session_scope(settings.database_url) as session:
        batch = jobs.get_batch(session, tenant, batch_id)
        status, counts = jobs.summary(session, batch)
        return RetryOut(retried=retried, batch=BatchOut.of(batch, status, counts, batch_usage(session, batch.id)))


def _naive(value: datetime | None, field: str) -> datetime | None:
    """Stored times are naive UTC; an aware query value is converted to it."""
    if value is None or value.tzinfo is None:
        return value
    try:
        return value.astimezone(UTC).replace(tzinfo=None)
    except OverflowError:  # 0001-01-01T00:00+14:00 is before year 1 in UTC
        raise InvalidInput("is outside the years 1 to 9999 once converted to UTC", field) from None
