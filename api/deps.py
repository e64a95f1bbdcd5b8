"""Request dependencies: settings, storage and the caller's tenant."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from core.db import session_scope
from core.keys import tenant_for
from core.settings import Settings
from core.storage import Storage


def settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def storage_dep(request: Request) -> Storage:
    storage: Storage = request.app.state.storage
    return storage


# Declared as a security scheme so /docs offers "Authorize" and sends the key with every try.
_bearer = HTTPBearer(auto_error=False, description="an API key from `step1x keys create TENANT`")


def tenant_dep(settings: Annotated[Settings, Depends(settings_dep)],
               credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    """The tenant of the bearer key; every /v1 query is scoped to it."""
    if credentials is None or not credentials.credentials:
        raise HTTPException(401, "send 'Authorization: Bearer <api key>' (create one with `step1x keys create`)",
                            headers={"WWW-Authenticate": "Bearer"})
    with session_scope(settings.database_url) as session:
        tenant = tenant_for(session, credentials.credentials.strip())
    if tenant is None:
        raise HTTPException(401, "unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"})
    return tenant


SettingsDep = Annotated[Settings, Depends(settings_dep)]
StorageDep = Annotated[Storage, Depends(storage_dep)]
TenantDep = Annotated[str, Depends(tenant_dep)]
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)]
