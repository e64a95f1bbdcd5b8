"""Request dependencies: settings, storage and the caller's tenant."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.throttle import AuthThrottle
from core.db import session_scope
from core.errors import InvalidInput, NotFound
from core.keys import tenant_for
from core.settings import Settings
from core.storage import Storage


# The dependencies that do no I/O are `async def`: FastAPI runs a plain `def` dependency in its
# thread pool, and each hop there and back cost a request about 0.3 ms (a GET of a batch went
# from four hops to two).
async def settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def storage_dep(request: Request) -> Storage:
    storage: Storage = request.app.state.storage
    return storage


# Declared as a security scheme so /docs offers "Authorize" and sends the key with every try.
_bearer = HTTPBearer(auto_error=False, description="an API key from `step1x keys create TENANT`")


def tenant_dep(request: Request, settings: Annotated[Settings, Depends(settings_dep)],
               credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    """The tenant of the bearer key; every /v1 query is scoped to it."""
    if credentials is None or not credentials.credentials:
        raise HTTPException(401, "send 'Authorization: Bearer <api key>' (create one with `step1x keys create`)",
                            headers={"WWW-Authenticate": "Bearer"})
    with session_scope(settings.database_url) as session:
        tenant = tenant_for(session, credentials.credentials.strip())
    if tenant is None:
        throttle: AuthThrottle = request.app.state.auth_throttle
        throttle.count_failure(request)
        raise HTTPException(401, "unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"})
    return tenant


# The shapes of the ids this API issues (core.tables.new_id, sha256 for files). Anything else is
# answered 404 before it reaches a query: no NUL or other text PostgreSQL would refuse gets there.
_IDS = {"job": re.compile(r"^job_[0-9a-f]{32}$"), "batch": re.compile(r"^bat_[0-9a-f]{32}$"),
        "file": re.compile(r"^[0-9a-f]{64}$"), "webhook": re.compile(r"^whe_[0-9a-f]{32}$"),
        "delivery": re.compile(r"^msg_[0-9a-f]{32}$")}
# Path parameters and the kind of id each holds.
_PATH_IDS = {"batch_id": "batch", "job_id": "job", "file_id": "file", "endpoint_id": "webhook",
             "delivery_id": "delivery"}


def known_id(kind: str, value: str) -> str:
    if not _IDS[kind].fullmatch(value):
        raise NotFound(f"{kind} {value[:80]!r} not found")
    return value


async def path_ids_dep(request: Request, _: Annotated[str, Depends(tenant_dep)]) -> None:
    """Every id in the path has the shape of one this API issues, or the answer is 404. A dependency
    of every /v1 router, so no route can forget it; after authentication, so a caller without a key
    still gets 401."""
    for name, value in request.path_params.items():
        if kind := _PATH_IDS.get(name):
            known_id(kind, value)


async def cursor_dep(
        cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page")] = None) -> str | None:
    if not cursor:
        return None
    if not _IDS["job"].fullmatch(cursor):
        raise InvalidInput("not a cursor this API issued: pass the `next_cursor` of the previous page", "cursor")
    return cursor


SettingsDep = Annotated[Settings, Depends(settings_dep)]
StorageDep = Annotated[Storage, Depends(storage_dep)]
TenantDep = Annotated[str, Depends(tenant_dep)]
CursorDep = Annotated[str | None, Depends(cursor_dep)]
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)]
