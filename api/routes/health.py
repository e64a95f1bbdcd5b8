from __future__ import annotations

import logging
import time
from typing import Any

import redis
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.deps import SettingsDep, StorageDep
from api.schemas import ReadyOut
from core.db import ping, session_scope
from core.jobs import reconciler_ran_at
from core.settings import Settings
from core.tables import utcnow

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


def _reconciler(settings: Settings, request: Request) -> str:
    """Without a reconciler, jobs of dead workers and lost messages wait forever: say so."""
    allowed = 3 * settings.reconcile_interval + 5
    with session_scope(settings.database_url) as session:
        ran_at = reconciler_ran_at(session)
    if ran_at is None:
        # The grace runs from this app's first readiness probe: a stack starting up probes at once.
        state = request.app.state
        if not hasattr(state, "first_readiness_probe"):
            state.first_readiness_probe = time.monotonic()
        if time.monotonic() - state.first_readiness_probe < allowed:
            return "ok"  # a stack just started: its control process has not had its first turn yet
        log.warning("the reconciler never ran")
        return "the reconciler never ran: start the control process (step1x up does; docker compose: control)"
    age = (utcnow() - ran_at).total_seconds()
    if age > allowed:
        problem = (f"the reconciler last ran {age:.0f} s ago (every {settings.reconcile_interval:g} s "
                   "expected): is the control process running?")
        log.warning(problem)
        return problem
    return "ok"


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up (liveness): no dependency is checked."""
    return {"status": "ok"}


@router.get("/readyz", response_model=ReadyOut,
            responses={503: {"model": ReadyOut, "description": "a service named in `checks` is down"}})
def readyz(settings: SettingsDep, storage: StorageDep, request: Request) -> JSONResponse:
    """Database, Redis and S3 each answer, and the reconciler runs (readiness): 503 naming the ones
    that do not."""
    checks: dict[str, Any] = {}
    try:
        ping(settings.database_url)
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = str(exc)
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"redis at {settings.redis_url} is unreachable: {exc}"
    finally:
        client.close()
    try:
        storage.ping()
        checks["s3"] = "ok"
    except Exception as exc:
        checks["s3"] = str(exc)
    if checks["database"] == "ok":
        checks["reconciler"] = _reconciler(settings, request)
    ready = all(value == "ok" for value in checks.values())
    return JSONResponse({"status": "ok" if ready else "unavailable", "checks": checks},
                        status_code=200 if ready else 503,
                        headers=None if ready else {"Retry-After": str(settings.unavailable_retry_after)})
