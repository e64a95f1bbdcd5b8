"""Dashboard sessions: log in with an API key, get a signed cookie; every action carries a CSRF token.

The cookie holds the key's id (never the key), a CSRF token and the time it was issued, signed with
HMAC-SHA256 under the session secret; it is HttpOnly and SameSite=Strict. Each request looks the key
up again, so revoking the key ends its sessions at once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from starlette.concurrency import run_in_threadpool

from core.db import session_scope
from core.keys import Principal, principal_by_id
from core.settings import Settings

COOKIE = "step1x_session"
MAX_AGE = 12 * 3600


@dataclass(frozen=True)
class Viewer:
    principal: Principal
    csrf: str

    @property
    def tenant(self) -> str:
        return self.principal.tenant

    @property
    def operator(self) -> bool:
        return self.principal.operator

    @property
    def scope(self) -> str | None:
        """The tenant every query is narrowed to; None lets an operator see all."""
        return None if self.operator else self.principal.tenant


def session_secret(settings: Settings) -> bytes:
    # Development without a configured secret: one per process, so nobody can forge a cookie with a
    # value read from the source (production refuses to start without one, see core.settings).
    return (settings.session_secret or secrets.token_hex(32)).encode()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def sign(secret: bytes, key_id: str) -> tuple[str, str]:
    """A new session cookie value for this key, and its CSRF token."""
    csrf = secrets.token_urlsafe(24)
    body = _b64(json.dumps({"k": key_id, "c": csrf, "t": int(time.time())}).encode())
    mac = hmac.new(secret, body.encode(), hashlib.sha256).hexdigest()
    return f"{body}.{mac}", csrf


def unsign(secret: bytes, value: str) -> dict[str, str] | None:
    body, _, mac = value.partition(".")
    expected = hmac.new(secret, body.encode(), hashlib.sha256).hexdigest()
    if not mac or not hmac.compare_digest(mac, expected):
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except ValueError:
        return None
    if not isinstance(data, dict) or time.time() - data.get("t", 0) > MAX_AGE:
        return None
    return data


def _lookup(settings: Settings, key_id: str) -> Principal | None:
    with session_scope(settings.database_url) as session:
        return principal_by_id(session, key_id)


async def current_viewer(request: Request) -> Viewer | None:
    value = request.cookies.get(COOKIE)
    data = unsign(request.app.state.session_secret, value) if value else None
    if data is None:
        return None
    principal = await run_in_threadpool(_lookup, request.app.state.settings, str(data.get("k")))
    return Viewer(principal, str(data["c"])) if principal else None


class LoginRequired(Exception):
    """Raised by `viewer_dep`; the app answers with a redirect to the login page."""

    def __init__(self, next_url: str) -> None:
        self.next_url = next_url


async def viewer_dep(request: Request) -> Viewer:
    viewer = await current_viewer(request)
    if viewer is None:
        if "text/event-stream" in request.headers.get("accept", ""):
            raise HTTPException(401, "log in at /dashboard/login")
        raise LoginRequired(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
    return viewer


def check_csrf(viewer: Viewer, token: str | None) -> None:
    if not token or not hmac.compare_digest(token, viewer.csrf):
        raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")


def require_operator(viewer: Viewer) -> None:
    if not viewer.operator:
        raise HTTPException(403, "only an operator key may do this (`step1x keys create --operator NAME`)")


ViewerDep = Annotated[Viewer, Depends(viewer_dep)]
