from __future__ import annotations

import json
from collections.abc import Iterator
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.deps import CursorDep, IdempotencyKey, SettingsDep, StorageDep, TenantDep
from api.schemas import DURATION_HELP, BatchIn, BatchOut, JobOut, JobPage
from core import jobs, progress
from core.catalog import BatchTerms
from core.db import session_scope
from core.errors import InvalidInput
from core.limits import check_metadata, loads
from core.manifest import ManifestReader
from core.retention import delete_batch
from core.settings import Settings
from core.status import JobStatus, batch_status
from core.submit import CHUNK, Submission, submit
from core.usage import batch_usage, job_usage
from core.webhooks import Callback

router = APIRouter(prefix="/v1/batches", tags=["batches"])

MANIFEST_HELP = ("JSONL: one job spec (as in POST /v1/jobs, plus a custom_id unique in the batch) per line; blank "
                 "lines and lines starting with # are skipped. image, mask and edges are file ids from POST "
                 "/v1/files. Errors name an item by custom_id, else by its line.")


def _batch_out(settings: Settings, tenant: str, batch_id: str) -> BatchOut:
    with session_scope(settings.database_url) as session:
        batch = jobs.get_batch(session, tenant, batch_id)
        counts = progress.of(batch)  # just loaded: current, O(1) however large the batch
        running = jobs.running_progress(session, batch.id) if counts[JobStatus.RUNNING] else 0.0
        return BatchOut.of(batch, batch_status(counts, batch.canceled), counts, batch_usage(session, batch.id),
                           running)


REPLAY: dict[int | str, dict[str, Any]] = {
    200: {"model": BatchOut, "description": "a replay: this Idempotency-Key and body created the batch earlier"}}


@router.post("", status_code=202, response_model=BatchOut, responses=REPLAY)
def create(body: BatchIn, tenant: TenantDep, settings: SettingsDep, response: Response,
           idempotency_key: IdempotencyKey = None) -> BatchOut:
    """Submit a catalog batch. Every item is validated first: one bad item rejects the whole request
    with 422 listing every bad item and field, and nothing is stored."""
    metadata_errors = check_metadata(body.metadata, settings)
    if metadata_errors:
        raise InvalidInput(metadata_errors)
    terms = BatchTerms.parse(settings, body.completion_window, body.output_ttl)
    callback = Callback.parse(settings, body.webhook, body.webhook_events, batch=True)
    batch_id, created = submit(settings, tenant, body.items, as_batch=True, metadata=body.metadata, terms=terms,
                               idempotency_key=idempotency_key, body=body.model_dump(),
                               on_accept=callback.storer(tenant) if callback else None)
    if not created:
        response.status_code = 200
    return _batch_out(settings, tenant, batch_id)


@router.post("/manifest", status_code=202, response_model=BatchOut, responses=REPLAY,
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/x-ndjson": {"schema": {
                     "type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/JobSpec"},
                     "description": MANIFEST_HELP}}}}})
async def create_from_manifest(request: Request, tenant: TenantDep, settings: SettingsDep, response: Response,
                               background: BackgroundTasks, idempotency_key: IdempotencyKey = None,
                               metadata: Annotated[str | None, Query(description="JSON object")] = None,
                               webhook: Annotated[str | None, Query(description="callback URL")] = None,
                               webhook_events: Annotated[list[str] | None, Query()] = None,
                               completion_window: Annotated[str | None, Query(
                                   description=f"as in POST /v1/batches; {DURATION_HELP}", examples=["24h"])] = None,
                               output_ttl: Annotated[str | None, Query(
                                   description=f"as in POST /v1/batches; {DURATION_HELP}", examples=["7d"])] = None,
                               ) -> BatchOut:
    """Submit a JSONL manifest as the raw request body (`curl --data-binary @catalog.jsonl`), at most
    STEP1X_MAX_MANIFEST_BYTES (413 past it: split the catalog into several batches). The manifest is
    validated and stored as it arrives, but committed only at its end: one bad line anywhere rejects
    it whole (422 naming every bad line or item), and nothing is stored."""
    try:
        meta = loads(metadata, settings.max_json_depth) if metadata else {}
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"not valid JSON: {exc.msg}", "metadata") from None
    metadata_errors = check_metadata(meta, settings)
    if metadata_errors:
        raise InvalidInput(metadata_errors)
    terms = BatchTerms.parse(settings, completion_window, output_ttl)
    callback = Callback.parse(settings, webhook, webhook_events, batch=True)
    submission = await run_in_threadpool(partial(
        Submission, settings, tenant, as_batch=True, metadata=meta, idempotency_key=idempotency_key, terms=terms,
        on_accept=callback.storer(tenant) if callback else None))
    reader = ManifestReader(settings.max_json_depth)
    try:
        async for chunk in request.stream():  # bounded by api.guard
            reader.feed(chunk)
            if reader.pending >= CHUNK:
                await run_in_threadpool(submission.add, *reader.take())
        reader.end()
        await run_in_threadpool(submission.add, *reader.take())
        options = {"metadata": meta, "webhook": webhook, "webhook_events": webhook_events,
                   "completion_window": completion_window, "output_ttl": output_ttl}
        # The first micro-batch leaves before the answer; the rest right after it.
        batch_id, created = await run_in_threadpool(submission.finish, reader.digest(options),
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
              cursor: CursorDep, status: JobStatus | None = None,
              limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> JobPage:
    with session_scope(settings.database_url) as session:
        page = jobs.page(session, tenant, batch_id, status, cursor, limit)
        data = [JobOut.of(job, storage) for job in page]
    return JobPage(data=data, next_cursor=page[-1].id if len(page) == limit else None)


@router.get("/{batch_id}/results", response_class=StreamingResponse,
            responses={200: {"content": {"application/x-ndjson": {}}}})
def results(batch_id: str, tenant: TenantDep, settings: SettingsDep, storage: StorageDep) -> StreamingResponse:
    """JSONL, one line per item: custom_id, job_id, status, output URL(s) or error, usage."""
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
                line["error_code"] = job.error_code
                line["retryable"] = job.retryable
            usage = job_usage(job)
            if usage:
                line["usage"] = usage
            yield (json.dumps(line) + "\n").encode()

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.post("/{batch_id}/cancel", response_model=BatchOut)
def cancel(batch_id: str, tenant: TenantDep, settings: SettingsDep) -> BatchOut:
    """Cancel every job of the batch that has not finished; finished outputs stay available."""
    with session_scope(settings.database_url) as session:
        jobs.cancel_batch(session, tenant, batch_id)
    return _batch_out(settings, tenant, batch_id)


@router.delete("/{batch_id}", status_code=204, responses={409: {"description": "the batch is still running"}})
def remove(batch_id: str, tenant: TenantDep, settings: SettingsDep, storage: StorageDep) -> Response:
    """Delete a finished batch: its outputs in storage, its jobs and the batch. A running batch
    answers 409: cancel it first."""
    delete_batch(settings, storage, tenant, batch_id)
    return Response(status_code=204)
