"""API keys: each belongs to one tenant and is stored only as a sha256 hash."""

from __future__ import annotations

import hashlib
import re
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.errors import InvalidInput
from core.tables import ApiKey, Tenant

TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, tenant: str) -> str:
    """A new key for `tenant` (created if new). The key is shown once: only its hash is kept."""
    if not TENANT_NAME.match(tenant):
        raise InvalidInput("use 1-64 lower-case letters, digits, '-' or '_'", "tenant")
    if session.get(Tenant, tenant) is None:
        session.add(Tenant(id=tenant))
        session.flush()
    key = f"sk_{secrets.token_urlsafe(32)}"
    session.add(ApiKey(tenant_id=tenant, key_hash=hash_key(key), prefix=key[:10]))
    return key


def tenant_for(session: Session, key: str) -> str | None:
    return session.scalar(
        select(ApiKey.tenant_id).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    )
