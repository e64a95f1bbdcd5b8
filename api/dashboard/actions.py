"""Dashboard actions. Each is two steps: a confirmation page that says what it will touch (a GET
that changes nothing), then a POST carrying the session's CSRF token.

A tenant key may cancel and retry its own work and redeliver its own webhooks; pausing queues and
draining workers affect every tenant, so they need an operator key.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.dashboard import deliveries, views
from api.dashboard.pages import page, with_notice
from api.dashboard.session import Viewer, ViewerDep, check_csrf, require_operator
from core import delivery, jobs, listing, monitor, operate, pauses
from core.db import session_scope
from core.errors import InvalidInput, NotFound
from core.settings import Settings
from core.tables import WebhookEndpoint, WorkerRow

router = APIRouter(prefix="/dashboard", include_in_schema=False)
OPERATOR_ONLY = {"pause", "resume", "drain", "undrain"}
# Actions whose work another process picks up: it is handed over once the change is committed.
HANDED_OVER = {"retry-batch", "redeliver"}


@dataclass
class Plan:
    title: str
    touches: str  # what the action will touch, in words, with counts
    back: str  # where to go afterwards
    tenant: str | None = None  # whose work it touches, when it is one tenant's


def _split(target: str) -> tuple[str, str]:
    scope, _, name = target.partition(":")
    if scope not in pauses.SCOPES or not name:
        raise InvalidInput("target is lane:NAME or model:NAME", "target")
    return scope, name


def _worker(session: Session, name: str) -> WorkerRow:
    worker = session.scalar(select(WorkerRow).where(WorkerRow.name == name))
    if worker is None:
        raise NotFound(f"worker {name} not found")
    return worker


def describe(session: Session, viewer: Viewer, action: str, target: str) -> Plan:
    if action in OPERATOR_ONLY:
        require_operator(viewer)
    if action in ("cancel-batch", "retry-batch"):
        batch = views.find_batch(session, viewer, target)
        p = listing.batch_progress(session, batch)
        c = p.counts
        back = f"/dashboard/batches/{batch.id}"
        if action == "cancel-batch":
            return Plan(f"Cancel batch {batch.id}?",
                        f"{c['queued']:,} queued and {c['running']:,} running jobs of tenant {batch.tenant_id} "
                        f"will be canceled; {c['succeeded']:,} succeeded and {c['failed']:,} failed jobs keep "
                        "their results.", back, batch.tenant_id)
        return Plan(f"Retry {c['failed']:,} failed jobs of batch {batch.id}?",
                    f"{c['failed']:,} failed jobs of tenant {batch.tenant_id} are queued again: new attempts, "
                    "the same job ids and output keys.", back, batch.tenant_id)
    if action == "cancel-job":
        job = views.find_job(session, viewer, target)
        return Plan(f"Cancel job {job.id}?", f"Job {job.custom_id or job.id} ({job.kind}, {job.model}) is "
                    f"{job.status}; a finished job is left as it is.", f"/dashboard/jobs/{job.id}")
    if action in ("pause", "resume"):
        scope, name = _split(target)
        queue = next((q for q in monitor.queues(session, scope) if q.name == name), monitor.Queue(name))
        if action == "pause":
            return Plan(f"Pause {scope} {name}?",
                        f"Workers stop taking its {queue.queued:,} queued jobs (of every tenant); submissions "
                        f"are still accepted; {queue.running:,} running jobs finish.", "/dashboard")
        return Plan(f"Resume {scope} {name}?", f"Workers take its {queue.queued:,} queued jobs again.", "/dashboard")
    if action in ("drain", "undrain"):
        worker = _worker(session, target)
        if action == "undrain":
            return Plan(f"Let worker {worker.name} take work again?",
                        "It consumes its queues again.", "/dashboard/workers")
        current = worker.current or {}
        hand = (f"the micro-batch in hand ({len(current.get('job_ids', []))} jobs of {current.get('model')})"
                if current else "nothing in hand now")
        return Plan(f"Drain worker {worker.name}?", f"It finishes {hand}, then takes nothing more.",
                    "/dashboard/workers")
    if action == "redeliver":
        found = deliveries.find_delivery(session, viewer, target)
        endpoint = session.get(WebhookEndpoint, found.delivery.endpoint_id)
        assert endpoint is not None  # the delivery cascades away with its endpoint
        warning = "" if endpoint.enabled else (f" The endpoint is disabled ({endpoint.disabled_reason}): "
                                               "enable it again first, or this attempt fails at once.")
        return Plan(f"Redeliver {found.type} to {endpoint.url}?",
                    f"Delivery {found.delivery.id} ({found.type} of {found.resource_id}, {found.delivery.status}, "
                    f"{len(found.attempts):,} attempts so far) is sent again now with the same webhook-id and a fresh "
                    f"signature; its retry schedule starts over.{warning}",
                    f"/dashboard/webhooks/{endpoint.id}", found.delivery.tenant_id)
    raise NotFound(f"no action {action!r}")


def perform(session: Session, settings: Settings, viewer: Viewer, action: str, target: str) -> str:
    """Does it (all but those HANDED_OVER, which `act` runs); returns what happened, for the notice on
    the next page."""
    if action in OPERATOR_ONLY:
        require_operator(viewer)
    if action == "cancel-batch":
        batch = views.find_batch(session, viewer, target)
        return f"canceled {jobs.cancel_batch(session, batch.tenant_id, batch.id):,} jobs"
    if action == "cancel-job":
        job = views.find_job(session, viewer, target)
        return f"job is {jobs.cancel_job(session, job.tenant_id, job.id).status}"
    if action in ("pause", "resume"):
        scope, name = _split(target)
        if action == "pause":
            pauses.pause(session, scope, name, viewer.tenant)
            return f"paused {scope} {name}"
        pauses.resume(session, scope, name)
        return f"resumed {scope} {name}"
    if action in ("drain", "undrain"):
        worker = operate.drain_worker(session, settings, target, drain=action == "drain")
        return f"worker {worker.name} {'draining' if worker.draining else 'takes work again'}"
    raise NotFound(f"no action {action!r}")


@router.get("/confirm")
async def confirm(request: Request, viewer: ViewerDep, action: str = "", target: str = "") -> Response:
    settings = request.app.state.settings

    def build() -> Plan:
        with session_scope(settings.database_url) as session:
            return describe(session, viewer, action, target)

    try:
        plan = await run_in_threadpool(build)
    except (NotFound, InvalidInput) as exc:
        return page(request, "error.html", {"viewer": viewer, "message": str(exc)}, 404)
    return page(request, "confirm.html", {"viewer": viewer, "plan": plan, "action": action, "target": target})


@router.post("/actions/{action}")
async def act(request: Request, viewer: ViewerDep, action: str, target: str = Form(""),
              csrf: str = Form("")) -> Response:
    check_csrf(viewer, csrf)
    settings = request.app.state.settings

    def run() -> tuple[str, str]:
        with session_scope(settings.database_url) as session:
            plan = describe(session, viewer, action, target)
            if action not in HANDED_OVER:
                return plan.back, perform(session, settings, viewer, action, target)
            if action == "redeliver":
                due = deliveries.redeliver(session, viewer, target)
        if action == "redeliver":
            delivery.kick(due, settings)
            return plan.back, f"redelivering {target}: a new attempt with the same webhook-id is on its way"
        assert plan.tenant is not None
        return plan.back, f"retried {operate.retry_failed(settings, plan.tenant, target):,} failed jobs"

    try:
        back, done = await run_in_threadpool(run)
    except (NotFound, InvalidInput) as exc:
        raise HTTPException(404, str(exc)) from None
    return with_notice(RedirectResponse(back, status_code=303), request, done)
