"""The HTTP API: `uvicorn api.app:create_app --factory`. OpenAPI at /docs.

No torch here: the API validates, stores and dispatches; workers do the compute.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import TypeAdapter

from api.routes import batches, files, health, jobs, webhooks
from api.schemas import ErrorOut
from core.coalesce import Coalescer
from core.db import upgrade
from core.errors import Conflict, FieldError, InvalidInput, NotFound, ServiceUnavailable
from core.settings import Settings, get_settings
from core.specs import JobSpec
from core.storage import Storage
from core.submit import send_committed

log = logging.getLogger(__name__)

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "missing, unknown or revoked API key"},
    404: {"model": ErrorOut, "description": "no such resource for this tenant"},
    409: {"model": ErrorOut, "description": "Idempotency-Key reused with a different body"},
    422: {"model": ErrorOut, "description": "invalid input: `errors` names every bad item and field"},
}


def create_app(settings: Settings | None = None, migrate: bool = True) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if migrate:
            upgrade(settings.database_url)
        try:
            app.state.storage.ensure_bucket()
        except Exception as exc:  # not fatal: /readyz reports it until S3 is reachable
            log.warning("S3 bucket check failed: %s", exc)
        if settings.coalesce_ms > 0:
            app.state.coalescer = Coalescer(partial(send_committed, settings), settings.coalesce_ms / 1000)
        yield
        if app.state.coalescer is not None:
            app.state.coalescer.close()

    app = FastAPI(title="Step1X Batch", version="0.1.0", lifespan=lifespan,
                  description="Batch image generation for e-commerce catalogs: generate, inpaint, upscale.")
    app.state.settings = settings
    app.state.storage = Storage(settings)
    app.state.coalescer = None
    app.include_router(health.router)
    for router in (files.router, jobs.router, batches.router, webhooks.router):
        app.include_router(router, responses=ERRORS)

    @app.exception_handler(InvalidInput)
    async def _invalid(_: Request, exc: InvalidInput) -> JSONResponse:
        return _unprocessable(exc.errors)

    @app.exception_handler(RequestValidationError)
    async def _malformed(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own checks (query parameters, body shape) answer in the same shape as ours.
        return _unprocessable([FieldError(".".join(str(p) for p in e["loc"] if p != "body") or "body", e["msg"])
                               for e in exc.errors()])

    for error, status in ((NotFound, 404), (Conflict, 409), (ServiceUnavailable, 503)):
        app.add_exception_handler(error, _plain(status))
    app.openapi = partial(_openapi_with_job_specs, app)  # type: ignore[method-assign]
    return app


def _openapi_with_job_specs(app: FastAPI) -> dict[str, Any]:
    """Routes take job specs as plain objects so that `core.specs` validates them (messages naming
    each item and field); /docs should still show what a spec looks like."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        spec = TypeAdapter(JobSpec).json_schema(ref_template="#/components/schemas/{model}")
        components = schema["components"]["schemas"]
        components.update(spec.pop("$defs", {}))
        components["JobSpec"] = spec
        ref = {"$ref": "#/components/schemas/JobSpec"}
        schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"] = ref
        components["BatchIn"]["properties"]["items"]["items"] = ref
        app.openapi_schema = schema
    return app.openapi_schema


def _unprocessable(errors: list[FieldError]) -> JSONResponse:
    body = ErrorOut(detail="; ".join(str(e) for e in errors[:20]), errors=[e.as_dict() for e in errors])
    return JSONResponse(body.model_dump(), status_code=422)


def _plain(status: int) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    async def handler(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status)
    return handler
