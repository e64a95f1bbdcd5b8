from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.deps import IdempotencyKey, SettingsDep, StorageDep, TenantDep
from api.schemas import DURATION_HELP, BatchIn, BatchOut, JobOut, JobPage
from core import jobs
from core.catalog import BatchTerms
from core.db import session_scope
from core.errors import FieldError, InvalidInput
from core.retention import delete_batch
from core.settings import Settings
from core.status import JobStatus
from core.submit import submit
from core.usage import batch_usage, job_usage

router = APIRouter(prefix="/v1/batches", tags=["batches"])

MANIFEST_HELP = ("JSONL: one job spec (as in POST /v1/jobs, plus a custom_id unique in the batch) per line; blank "
                 "lines and lines starting with # are skipped. image, mask and edges are file ids from POST "
                 "/v1/files. Errors name an item by custom_id, else by its line.")
MANIFEST_EXAMPLE = "\n".join(json.dumps(item) for item in (
    {"custom_id": "sku-001", "kind": "generate", "prompt": "a white leather sneaker, studio light", "seed": 7},
    {"custom_id": "sku-002", "kind": "inpaint", "mode": "fill", "image": "<file id>", "mask": "<file id>",
     "output_format": "jpeg", "quality": 85},
    {"custom_id": "sku-003", "kind": "upscale", "image": "<file id>", "output_format": "webp"},
)) + "\n"


def _batch_out(settings: Settings, tenant: str, batch_id: str) -> BatchOut:
    with session_scope(settings.database_url) as session:
        batch = jobs.get_batch(session, tenant, batch_id)
        status, counts = jobs.summary(session, batch)
        return BatchOut.of(batch, status, counts, batch_usage(session, batch.id))


@router.post("", status_code=202, response_model=BatchOut)
def create(body: BatchIn, tenant: TenantDep, settings: SettingsDep, response: Response,
           idempotency_key: IdempotencyKey = None) -> BatchOut:
    """Submit a catalog batch. Every item is validated first: one bad item rejects the whole request
    with 422 listing every bad item and field, and nothing is stored."""
    terms = BatchTerms.parse(settings, body.completion_window, body.output_ttl)
    batch_id, created = submit(settings, tenant, body.items, as_batch=True, metadata=body.metadata, terms=terms,
                               idempotency_key=idempotency_key, body=body.model_dump())
    if not created:
        response.status_code = 200
    return _batch_out(settings, tenant, batch_id)


def parse_manifest(text: str) -> list[Any]:
    """JSONL: one item per line; blank lines and lines starting with # are skipped. An item that
    cannot be named by its custom_id is named by its line."""
    items, errors = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"line {number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(FieldError("item", f"not valid JSON: {exc.msg}", where))
            continue
        if not isinstance(item, dict):
            errors.append(FieldError("item", "must be a JSON object", where))
        elif not isinstance(item.get("custom_id"), str) or not item["custom_id"]:
            errors.append(FieldError("custom_id", "every batch item needs a custom_id", where))
        else:
            items.append(item)
    if errors:
        raise InvalidInput(errors)
    return items


@router.post("/manifest", status_code=202, response_model=BatchOut,
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/x-ndjson": {"schema": {"type": "string", "description": MANIFEST_HELP},
                                          "example": MANIFEST_EXAMPLE}}}})
async def create_from_manifest(request: Request, tenant: TenantDep, settings: SettingsDep, response: Response,
                               idempotency_key: IdempotencyKey = None,
                               metadata: Annotated[str | None, Query(description="JSON object")] = None,
                               completion_window: Annotated[str | None, Query(
                                   description=f"as in POST /v1/batches; {DURATION_HELP}", examples=["24h"])] = None,
                               output_ttl: Annotated[str | None, Query(
                                   description=f"as in POST /v1/batches; {DURATION_HELP}", examples=["7d"])] = None,
                               ) -> BatchOut:
    """Submit a JSONL manifest as the raw request body (`curl --data-binary @catalog.jsonl`)."""
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > settings.max_manifest_bytes:
            raise InvalidInput(f"the manifest is over the {settings.max_manifest_bytes}-byte limit: "
                               "split the catalog into several batches", "body")
    try:
        meta = json.loads(metadata) if metadata else {}
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"not valid JSON: {exc.msg}", "metadata") from None
    if not isinstance(meta, dict):
        raise InvalidInput("must be a JSON object", "metadata")
    terms = BatchTerms.parse(settings, completion_window, output_ttl)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"the manifest is not UTF-8 (byte {exc.start})", "body") from None
    items = parse_manifest(text)
    body = {"items": items, "metadata": meta, "completion_window": completion_window, "output_ttl": output_ttl}
    batch_id, created = await run_in_threadpool(
        submit, settings, tenant, items, as_batch=True, metadata=meta, idempotency_key=idempotency_key, body=body,
        terms=terms)
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
