"""Webhook endpoints, secrets and Standard Webhooks signing, always scoped to one tenant.

A secret is `whsec_` + base64 of 32 random bytes; the HMAC key is those bytes. A signature is
`v1,` + base64(HMAC-SHA256(key, "{webhook-id}.{webhook-timestamp}.{body}")). For 24 hours after a
rotation the old secret signs too (the header carries both, space-separated), so a receiver can
switch secrets without dropping a delivery.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.errors import InvalidInput, NotFound
from core.events import BATCH_EVENTS, EVENT_TYPES, JOB_EVENTS
from core.outbound import Refused, check_url
from core.settings import Settings
from core.tables import WebhookCallback, WebhookDelivery, WebhookEndpoint, WebhookSigningSecret, utcnow

ROTATION_OVERLAP = timedelta(hours=24)


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signing_secrets(endpoint: WebhookEndpoint, now: datetime) -> list[str]:
    """The secrets that sign for this endpoint now: the current one, and the previous one while the
    rotation overlap lasts."""
    found = [endpoint.secret]
    if endpoint.previous_secret and endpoint.previous_secret_until and endpoint.previous_secret_until > now:
        found.append(endpoint.previous_secret)
    return found


def check_events(events: Sequence[str] | None, field: str = "events") -> list[str]:
    if events is None:
        return ["*"]
    unknown = [e for e in events if e != "*" and e not in EVENT_TYPES]
    if unknown or not events:
        raise InvalidInput(f"unknown event types {unknown}; known: *, {', '.join(EVENT_TYPES)}" if unknown
                           else "list at least one event type", field)
    return list(dict.fromkeys(events))


def check_webhook_url(url: str, settings: Settings, field: str = "url") -> str:
    try:
        check_url(url, settings, field)
    except Refused as exc:
        raise InvalidInput(exc.reason, field) from None
    return url


def create_endpoint(session: Session, settings: Settings, tenant: str, url: str, events: Sequence[str] | None,
                    description: str = "") -> WebhookEndpoint:
    endpoint = WebhookEndpoint(tenant_id=tenant, url=check_webhook_url(url, settings), events=check_events(events),
                               description=description, secret=new_secret(), enabled=True, created_at=utcnow())
    session.add(endpoint)
    session.flush()
    return endpoint


def get_endpoint(session: Session, tenant: str, endpoint_id: str) -> WebhookEndpoint:
    endpoint = session.scalar(select(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id,
                                                            WebhookEndpoint.tenant_id == tenant))
    if endpoint is None:
        raise NotFound(f"webhook endpoint {endpoint_id} not found")
    return endpoint


def list_endpoints(session: Session, tenant: str) -> list[WebhookEndpoint]:
    return list(session.scalars(select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == tenant)
                                .order_by(WebhookEndpoint.created_at)))


def update_endpoint(session: Session, settings: Settings, endpoint: WebhookEndpoint, *, url: str | None = None,
                    events: Sequence[str] | None = None, description: str | None = None,
                    enabled: bool | None = None) -> WebhookEndpoint:
    if url is not None:
        endpoint.url = check_webhook_url(url, settings)
    if events is not None:
        endpoint.events = check_events(events)
    if description is not None:
        endpoint.description = description
    if enabled is not None:
        endpoint.enabled = enabled
        if enabled:  # turning it back on forgives the failures that disabled it
            endpoint.disabled_reason, endpoint.failing_since = None, None
    return endpoint


def rotate(endpoint: WebhookEndpoint) -> WebhookEndpoint:
    endpoint.previous_secret = endpoint.secret
    endpoint.previous_secret_until = utcnow() + ROTATION_OVERLAP
    endpoint.secret = new_secret()
    return endpoint


def disable(session: Session, endpoint_id: str, reason: str) -> None:
    session.execute(update(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id, WebhookEndpoint.enabled)
                    .values(enabled=False, disabled_reason=reason))


def tenant_secret(session: Session, tenant: str) -> str:
    """The tenant's signing secret for per-request callbacks, made on first use."""
    row = session.get(WebhookSigningSecret, tenant)
    if row is not None:
        return row.secret
    try:
        with session.begin_nested():
            row = WebhookSigningSecret(tenant_id=tenant, secret=new_secret(), created_at=utcnow())
            session.add(row)
    except IntegrityError:  # made concurrently by another request: that one stands
        row = session.get(WebhookSigningSecret, tenant)
        assert row is not None
    return row.secret


@dataclass(frozen=True)
class Callback:
    """A per-request callback, checked before the request is accepted."""

    url: str
    events: list[str]

    @classmethod
    def parse(cls, settings: Settings, url: object, events: object, batch: bool) -> Callback | None:
        if url is None and events is None:
            return None
        if not isinstance(url, str):
            raise InvalidInput("give the callback URL (a string) when naming webhook_events", "webhook")
        if events is not None and (not isinstance(events, list) or not all(isinstance(e, str) for e in events)):
            raise InvalidInput("must be a list of event type names", "webhook_events")
        default = ["batch.completed", "batch.canceled"] if batch else list(JOB_EVENTS)
        chosen = check_events(events, "webhook_events") if events is not None else default
        allowed = set(EVENT_TYPES) if batch else set(JOB_EVENTS)
        if "*" in chosen or not set(chosen) <= allowed:
            kinds = ", ".join(BATCH_EVENTS + JOB_EVENTS) if batch else ", ".join(JOB_EVENTS)
            raise InvalidInput(f"a {'batch' if batch else 'job'} callback takes: {kinds}", "webhook_events")
        return cls(check_webhook_url(url, settings, "webhook"), chosen)

    def storer(self, tenant: str) -> Callable[[Session, str], None]:
        """Stores the callback beside the job or batch it belongs to, in the same transaction."""
        def store(session: Session, resource_id: str) -> None:
            tenant_secret(session, tenant)
            session.add(WebhookCallback(resource_id=resource_id, tenant_id=tenant, url=self.url, events=self.events))
        return store


def redeliver(session: Session, criteria: Sequence[object]) -> list[str]:
    """Make the matching deliveries due now, keeping their ids (the `webhook-id`)."""
    ids = list(session.scalars(update(WebhookDelivery).where(*criteria)  # type: ignore[arg-type]
                               .values(status="pending", attempts=0, next_attempt_at=utcnow(), finished_at=None)
                               .returning(WebhookDelivery.id)))
    return ids
