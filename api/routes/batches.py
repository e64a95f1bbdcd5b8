from __future__ import annotations

import json
from collections.abc import Iterator
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.deps import IdempotencyKey, SettingsDep, StorageDep, TenantDep
from api.schemas import BatchIn, BatchOut, JobOut, JobPage
from core import jobs
from core.db import session_scope
from core.errors import InvalidInput
from core.manifest import ManifestReader
from core.settings import Settings
from core.status import JobStatus
from core.submit import CHUNK, Submission, submit

router = APIRouter(prefix="/v1/batches", tags=["batches"])


def _batch_out(settings: Settings, tenant: str, batch_id: str) -> BatchOut:
    with session_scope(settings.database_url) as session:
        batch = jobs.get_batch(session, tenant, batch_id)
        status, counts = jobs.summary(session, batch)
        return BatchOut.of(batch, status, counts)


@router.post("", status_code=202, response_model=BatchOut)
def create(body: BatchIn, tenant: TenantDep, settings: SettingsDep, response: Response,
           idempotency_key: IdempotencyKey = None) -> BatchOut:
    """Submit a catalog batch. Every item is validated first: one bad item rejects the whole request
    with 422 listing every bad item and field, and nothing is stored."""
    batch_id, created = submit(settings, tenant, body.items, as_batch=True, metadata=body.metadata,
                               idempotency_key=idempotency_key, body=body.model_dump())
    if not created:
        response.status_code = 200
    return _batch_out(settings, tenant, batch_id)


@router.post("/manifest", status_code=202, response_model=BatchOut,
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/x-ndjson": {"schema": {"type": "string", "description": "one job spec per line"}}}}})
async def create_from_manifest(request: Request, tenant: TenantDep, settings: SettingsDep, response: Response,
                               background: BackgroundTasks, idempotency_key: IdempotencyKey = None,
                               metadata: Annotated[str | None, Query(description="JSON object")] = None
                               ) -> BatchOut:
    """Submit a JSONL manifest as the raw request body (`curl --data-binary @catalog.jsonl`): one job
    spec per line; blank lines and lines starting with # are skipped. The manifest is validated and
    stored as it arrives, but committed only at its end: one bad line anywhere rejects it whole
    (422 naming every bad line or item), and nothing is stored."""
    try:
        meta = json.loads(metadata) if metadata else {}
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"not valid JSON: {exc.msg}", "metadata") from None
    if not isinstance(meta, dict):
        raise InvalidInput("must be a JSON object", "metadata")
    submission = await run_in_threadpool(partial(Submission, settings, tenant, as_batch=True, metadata=meta,
                                                 idempotency_key=idempotency_key))
    reader = ManifestReader()
    try:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_manifest_bytes:
                raise InvalidInput(f"the manifest is over the {settings.max_manifest_bytes}-byte limit: "
                                   "split the catalog into several batches", "body")
            reader.feed(chunk)
            if reader.pending >= CHUNK:
                await run_in_threadpool(submission.add, *reader.take())
        reader.end()
        await run_in_threadpool(submission.add, *reader.take())
        # The first micro-batch leaves before the answer; the rest right after it.
        batch_id, created = await run_in_threadpool(submission.finish, reader.digest(meta),
                                                    defer=background.add_task)
    except BaseException as exc:
        await run_in_threadpool(submission.abort, exc)
        raise
    if not created:
        response.status_code = 200
    return await run_in_threadpool(_batch_out, settings, tenant, batch_id)


@router.get("/{batch_id}", response_model=BatchOut)
def read(batch_id: str, tenant: TenantDep, settings: SettingsDep) -> BatchOut:
    return _batch_out(settings, tenant, batch_id)


@router.get("/{batch_id}/jobs", response_model=JobPage)
def list_jobs(batch_id: str, tenant: TenantDep, settings: SettingsDep, storage: StorageDep,
              status: JobStatus | None = None, cursor: str | None = None,
              limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> JobPage:
    with session_scope(settings.database_url) as session:
        page = jobs.page(session, tenant, batch_id, status, cursor, limit)
        data = [JobOut.of(job, storage) for job in page]
    return JobPage(data=data, next_cursor=page[-1].id if len(page) == limit else None)


@router.get("/{batch_id}/results", response_class=StreamingResponse,
            responses={200: {"content": {"application/x-ndjson": {}}}})
def results(batch_id: str, tenant: TenantDep, settings: SettingsDep, storage: StorageDep) -> StreamingResponse:
    """JSONL, one line per item: custom_id, status, output URL(s) or error."""
    with session_scope(settings.database_url) as session:
        jobs.get_batch(session, tenant, batch_id)  # 404 before streaming starts

    def lines() -> Iterator[bytes]:
        for job in jobs.iterate(settings.database_url, tenant, batch_id):
            out = JobOut.of(job, storage)
            line: dict[str, Any] = {"custom_id": job.custom_id, "job_id": job.id, "status": job.status}
            if out.outputs:
                line["url"] = out.outputs[0].url
                line["urls"] = [o.url for o in out.outputs]
            if job.error:
                line["error"] = job.error
            yield (json.dumps(line) + "\n").encode()

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.post("/{batch_id}/cancel", response_model=BatchOut)
def cancel(batch_id: str, tenant: TenantDep, settings: SettingsDep) -> BatchOut:
    """Cancel every job of the batch that has not finished; finished outputs stay available."""
    with session_scope(settings.database_url) as session:
        jobs.cancel_batch(session, tenant, batch_id)
    return _batch_out(settings, tenant, batch_id)
