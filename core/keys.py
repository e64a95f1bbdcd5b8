"""API keys: each belongs to one tenant and is stored only as a sha256 hash.

An operator key also sees every other tenant on the dashboard and may act on shared things (pause a
queue, drain a worker); a tenant key sees and acts on its own tenant only.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.errors import InvalidInput
from core.tables import ApiKey, Tenant

TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class Principal:
    """Who a key speaks for."""

    key_id: str
    tenant: str
    operator: bool


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, tenant: str, operator: bool = False) -> str:
    """A new key for `tenant` (created if new). The key is shown once: only its hash is kept."""
    if not TENANT_NAME.fullmatch(tenant):
        raise InvalidInput("use 1-64 lower-case letters, digits, '-' or '_'", "tenant")
    if session.get(Tenant, tenant) is None:
        session.add(Tenant(id=tenant))
        session.flush()
    key = f"sk_{secrets.token_urlsafe(32)}"
    session.add(ApiKey(tenant_id=tenant, key_hash=hash_key(key), prefix=key[:10], operator=operator))
    return key


def principal_for(session: Session, key: str) -> Principal | None:
    row = session.execute(
        select(ApiKey.id, ApiKey.tenant_id, ApiKey.operator)
        .where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    ).first()
    return Principal(row.id, row.tenant_id, row.operator) if row else None


def principal_by_id(session: Session, key_id: str) -> Principal | None:
    """The key behind a dashboard session, while it is not revoked."""
    row = session.execute(
        select(ApiKey.id, ApiKey.tenant_id, ApiKey.operator)
        .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
    ).first()
    return Principal(row.id, row.tenant_id, row.operator) if row else None


def tenant_for(session: Session, key: str) -> str | None:
    principal = principal_for(session, key)
    return principal.tenant if principal else None
