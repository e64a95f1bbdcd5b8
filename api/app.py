"""The HTTP API: `uvicorn api.app:create_app --factory`. OpenAPI at /docs.

No torch here: the API validates, stores and dispatches; workers do the compute.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import cache, partial
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi_offline import FastAPIOffline
from pydantic import TypeAdapter

from api import dashboard, errors, metrics
from api.deps import path_ids_dep
from api.guard import RequestGuard
from api.routes import batches, files, health, jobs, listing, webhooks
from api.throttle import AuthThrottle
from core import heap
from core.coalesce import Coalescer
from core.db import upgrade
from core.settings import Settings, get_settings
from core.specs import JobSpec
from core.storage import Storage
from core.submit import send_committed

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
        if settings.coalesce_ms > 0:
            app.state.coalescer = Coalescer(partial(send_committed, settings), settings.coalesce_ms / 1000)
        _tune_gc()
        yield
        if app.state.coalescer is not None:
            app.state.coalescer.close()

    # /docs and /redoc with swagger-ui and redoc assets from an installed package: no CDN needed.
    app = FastAPIOffline(title="Step1X Batch", version="0.1.0", lifespan=lifespan,
                         description="Batch image generation for e-commerce catalogs: generate, inpaint, upscale.")
    app.state.settings = settings
    app.state.storage = Storage(settings)
    app.state.coalescer = None
    app.state.auth_throttle = AuthThrottle(settings)
    app.include_router(health.router)
    for router in (files.router, jobs.router, listing.router, batches.router, webhooks.router):
        app.include_router(router, responses=errors.RESPONSES, dependencies=[Depends(path_ids_dep)])
    app.state.metrics = metrics.registry_for(settings)
    app.include_router(metrics.router)
    dashboard.install(app, settings)

    errors.install(app, settings)
    app.add_middleware(RequestGuard, settings=settings)
    app.openapi = partial(_openapi_with_job_specs, app)  # type: ignore[method-assign]
    return app


@cache  # once per process: a test app built many times collects once
def _tune_gc() -> None:
    """A 100,000-item manifest allocates millions of short-lived objects, and with Python's default
    thresholds the collector looked at the young ones every 700 allocations: 15% of a submission
    (43,000 against 51,000 items/s validated and stored in-process). What exists once the app has
    started (modules, routes, pools) is frozen out of every collection, and young objects are
    collected every 50,000 allocations."""
    heap.freeze()
    gc.set_threshold(50_000, 10, 10)


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
