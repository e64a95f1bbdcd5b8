from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Request, Response

from api.deps import IdempotencyKey, SettingsDep, StorageDep, TenantDep
from api.schemas import JobOut
from core import jobs
from core.db import session_scope
from core.submit import submit
from core.webhooks import Callback

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

EXAMPLES = {
    "generate": {"value": {"kind": "generate", "prompt": "a white sneaker on a wooden table", "width": 512,
                           "height": 512, "steps": 30, "seed": 7}},
    "inpaint": {"value": {"kind": "inpaint", "mode": "fill", "image": "<file id>", "mask": "<file id>"}},
    "upscale": {"value": {"kind": "upscale", "image": "<file id>", "scale": 4, "output_format": "jpeg",
                          "quality": 90}},
}


@router.post("", status_code=202, response_model=JobOut, responses={200: {
    "model": JobOut, "description": "a replay: this Idempotency-Key and body created the job earlier"}})
def create(spec: Annotated[dict[str, Any], Body(openapi_examples=EXAMPLES)], tenant: TenantDep,
           settings: SettingsDep, storage: StorageDep, request: Request, response: Response,
           idempotency_key: IdempotencyKey = None) -> JobOut:
    """Submit one job (interactive lane). Returns at once with its id; poll GET /v1/jobs/{id}, or add
    `webhook` (a URL) and optionally `webhook_events` to be called when it ends."""
    coalescer = request.app.state.coalescer
    hook, hook_events = spec.pop("webhook", None), spec.pop("webhook_events", None)
    callback = Callback.parse(settings, hook, hook_events, batch=False)
    body = {"item": spec, "webhook": hook, "webhook_events": hook_events} if callback else None
    job_id, created = submit(settings, tenant, [spec], as_batch=False, idempotency_key=idempotency_key, body=body,
                             dispatcher=coalescer.add if coalescer else None,
                             on_accept=callback.storer(tenant) if callback else None)
    if not created:
        response.status_code = 200
    with session_scope(settings.database_url) as session:
        return JobOut.of(jobs.get_job(session, tenant, job_id), storage)


@router.get("/{job_id}", response_model=JobOut)
def read(job_id: str, tenant: TenantDep, settings: SettingsDep, storage: StorageDep) -> JobOut:
    with session_scope(settings.database_url) as session:
        return JobOut.of(jobs.get_job(session, tenant, job_id), storage)


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel(job_id: str, tenant: TenantDep, settings: SettingsDep, storage: StorageDep) -> JobOut:
    """Cancel a queued or running job; a finished job is returned unchanged."""
    with session_scope(settings.database_url) as session:
        return JobOut.of(jobs.cancel_job(session, tenant, job_id), storage)
