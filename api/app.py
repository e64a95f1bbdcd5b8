"""The HTTP API: `uvicorn api.app:create_app --factory`. OpenAPI at /docs.

No torch here: the API validates, stores and dispatches; workers do the compute.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from api.routes import batches, files, health, jobs
from core.db import upgrade
from core.errors import Conflict, InvalidInput, NotFound, ServiceUnavailable
from core.settings import Settings, get_settings
from core.storage import Storage

log = logging.getLogger(__name__)


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
        yield

    app = FastAPI(title="Step1X Batch", version="0.1.0", lifespan=lifespan,
                  description="Batch image generation for e-commerce catalogs: generate, inpaint, upscale.")
    app.state.settings = settings
    app.state.storage = Storage(settings)
    for router in (health.router, files.router, jobs.router, batches.router):
        app.include_router(router)

    @app.exception_handler(InvalidInput)
    async def _invalid(_: Request, exc: InvalidInput) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "errors": [e.as_dict() for e in exc.errors]}, status_code=422)

    for error, status in ((NotFound, 404), (Conflict, 409), (ServiceUnavailable, 503)):
        app.add_exception_handler(error, _plain(status))
    return app


def _plain(status: int) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    async def handler(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status)
    return handler
