"""Dashboard pages under /dashboard: each works by reload alone, and each is also its own live feed.

A page requested with `Accept: text/event-stream` (what the browser's EventSource sends) answers
with Server-Sent Events instead: its live part rendered again every second and sent when it
changed. The stream runs the same view with the same tenant scope as the page, so it can never show
more than the page would.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from api.dashboard import deliveries, formats, views
from api.dashboard.session import COOKIE, MAX_AGE, ViewerDep, check_csrf, current_viewer, sign
from core.db import session_scope
from core.errors import InvalidInput, NotFound, TooManyRequests
from core.keys import principal_for

router = APIRouter(prefix="/dashboard", include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
templates.env.filters.update(formats.FILTERS)
TICK = 1.0  # seconds between renders of a live part: the page is at most ~2 s behind
# Live parts computed within the last tick, shared by every stream of the same view, scope and query:
# ten operators watching the overview cost the database one overview a second, not ten.
_recent: dict[tuple[object, ...], tuple[float, dict[str, Any]]] = {}
KEEPALIVE = 15  # ticks without a change before a comment line keeps proxies from closing the stream


async def serve(request: Request, viewer: views.Viewer, name: str, view: Callable[..., dict[str, Any]],
                *args: str) -> Response:
    settings = request.app.state.settings
    storage = request.app.state.storage
    params = dict(request.query_params)

    def build() -> dict[str, Any]:
        with session_scope(settings.database_url) as session:
            return view(session, viewer, params, storage, *args)

    try:
        context = await run_in_threadpool(build)
    except NotFound as exc:
        return page(request, "error.html", {"viewer": viewer, "message": str(exc)}, 404)
    except InvalidInput as exc:
        return page(request, "error.html", {"viewer": viewer, "message": "; ".join(map(str, exc.errors))}, 422)
    if "text/event-stream" in request.headers.get("accept", ""):
        return StreamingResponse(_events(request, name, build, context, viewer), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
    return page(request, f"{name}.html", {**context, "viewer": viewer, "params": params})


# What the last action did, shown once on the page it leads to. A short-lived cookie, not a query
# parameter: a link from elsewhere could put any text in a parameter; it cannot set this cookie.
NOTICE_COOKIE = "step1x_notice"


def page(request: Request, template: str, context: dict[str, Any], status: int = 200) -> HTMLResponse:
    notice = request.cookies.get(NOTICE_COOKIE)
    response = templates.TemplateResponse(request, template,
                                          {**context, "notice": unquote(notice) if notice else None},
                                          status_code=status)
    response.headers["Cache-Control"] = "no-store"
    if notice is not None:
        response.delete_cookie(NOTICE_COOKIE, path="/dashboard")
    return response


def with_notice(response: Response, request: Request, text: str) -> Response:
    response.set_cookie(NOTICE_COOKIE, quote(text), max_age=60, httponly=True, samesite="strict", path="/dashboard",
                        secure=request.url.scheme == "https")
    return response


async def _events(request: Request, name: str, build: Callable[[], dict[str, Any]], context: dict[str, Any],
                  viewer: views.Viewer) -> AsyncIterator[str]:
    template = templates.get_template(f"live/{name}.html")
    params = dict(request.query_params)
    last, quiet = None, 0
    while not await request.is_disconnected():
        html = template.render(**context, viewer=viewer, params=params)
        if html != last:
            yield "event: update\n" + "".join(f"data: {line}\n" for line in html.splitlines()) + "\n"
            last, quiet = html, 0
        elif (quiet := quiet + 1) >= KEEPALIVE:
            yield ": keepalive\n\n"
            quiet = 0
        await asyncio.sleep(TICK)
        # A revoked key or an expired session ends the stream, as it would end page loads.
        if await current_viewer(request) is None:
            return
        key = (id(request.app), name, viewer.scope, request.url.path, request.url.query)
        cached = _recent.get(key)
        if cached and time.monotonic() - cached[0] < TICK:
            context = cached[1]
            continue
        try:
            context = await run_in_threadpool(build)
        except NotFound:
            return
        if len(_recent) > 1000:
            _recent.clear()
        _recent[key] = (time.monotonic(), context)


@router.get("")
async def overview(request: Request, viewer: ViewerDep) -> Response:
    return await serve(request, viewer, "overview", views.overview)


@router.get("/batches")
async def batches(request: Request, viewer: ViewerDep) -> Response:
    return await serve(request, viewer, "batches", views.batches)


@router.get("/batches/{batch_id}")
async def batch(request: Request, viewer: ViewerDep, batch_id: str) -> Response:
    return await serve(request, viewer, "batch", views.batch, batch_id)


@router.get("/jobs/{job_id}")
async def job(request: Request, viewer: ViewerDep, job_id: str) -> Response:
    return await serve(request, viewer, "job", views.job, job_id)


@router.get("/workers")
async def workers(request: Request, viewer: ViewerDep) -> Response:
    return await serve(request, viewer, "workers", views.workers)


@router.get("/webhooks")
async def webhooks(request: Request, viewer: ViewerDep) -> Response:
    return await serve(request, viewer, "webhooks", deliveries.endpoints)


@router.get("/webhooks/{endpoint_id}")
async def webhook(request: Request, viewer: ViewerDep, endpoint_id: str) -> Response:
    return await serve(request, viewer, "webhook", deliveries.endpoint, endpoint_id)


@router.get("/login")
async def login_form(request: Request) -> Response:
    return page(request, "login.html", {"viewer": None, "next": request.query_params.get("next", "")})


def _safe_next(target: str) -> str:
    """Only back into the dashboard: an open redirect would let a link send a logged-in user anywhere."""
    return target if target.startswith("/dashboard") and not target.startswith("//") else "/dashboard"


@router.post("/login")
async def login(request: Request, key: str = Form(""), next: str = Form("")) -> Response:
    settings = request.app.state.settings

    def lookup() -> Any:
        with session_scope(settings.database_url) as session:
            return principal_for(session, key.strip())

    if not key.strip():  # no key at all: not a failed check, as in the API
        return page(request, "login.html", {"viewer": None, "next": next, "error": "enter an API key"}, 401)
    principal = await run_in_threadpool(lookup)
    if principal is None:
        try:  # the API's count of failed key checks: the login form is no way around it
            await run_in_threadpool(request.app.state.auth_throttle.count_failure, request)
        except TooManyRequests as exc:
            refused = page(request, "login.html", {"viewer": None, "next": next, "error": str(exc)}, 429)
            refused.headers["Retry-After"] = str(exc.retry_after)
            return refused
        return page(request, "login.html", {"viewer": None, "next": next, "error": "unknown or revoked API key"}, 401)
    value, _ = sign(request.app.state.session_secret, principal.key_id)
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(COOKIE, value, max_age=MAX_AGE, httponly=True, samesite="strict", path="/dashboard",
                        secure=request.url.scheme == "https")
    return response


@router.post("/logout")
async def logout(viewer: ViewerDep, csrf: str = Form("")) -> Response:
    check_csrf(viewer, csrf)
    response = RedirectResponse("/dashboard/login", status_code=303)
    response.delete_cookie(COOKIE, path="/dashboard")
    return response
