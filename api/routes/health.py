from __future__ import annotations

from typing import Any

import redis
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.deps import SettingsDep, StorageDep
from api.schemas import ReadyOut
from core.db import ping

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up (liveness): no dependency is checked."""
    return {"status": "ok"}


@router.get("/readyz", response_model=ReadyOut,
            responses={503: {"model": ReadyOut, "description": "a service named in `checks` is down"}})
def readyz(settings: SettingsDep, storage: StorageDep) -> JSONResponse:
    """Database, Redis and S3 each answer (readiness): 503 naming the ones that do not."""
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
    ready = all(value == "ok" for value in checks.values())
    return JSONResponse({"status": "ok" if ready else "unavailable", "checks": checks},
                        status_code=200 if ready else 503,
                        headers=None if ready else {"Retry-After": str(settings.unavailable_retry_after)})
