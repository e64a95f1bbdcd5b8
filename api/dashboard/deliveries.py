"""The webhook pages: each endpoint with its health and its deliveries counted by status, and one
endpoint's attempt log, newest first, with a redeliver action.

Scoped like every page: a tenant sees its own endpoints and deliveries (another tenant's are "not
found"), an operator sees all. Counts per status and the last success are read from the index
`(endpoint_id, status, finished_at)`, and the log pages along `(endpoint_id, created_at, id)`, so
no page reads an endpoint's whole history.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from api.dashboard.session import Viewer
from core import delivery, webhooks
from core.errors import InvalidInput, NotFound
from core.listing import decode_cursor, encode_cursor
from core.storage import Storage
from core.tables import WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookEvent, utcnow

STATUSES = ("pending", "succeeded", "failed")
ENDPOINTS_PAGE = 50
LOG_PAGE = 25  # deliveries per page of an endpoint's log, each with all its attempts


@dataclass
class Health:
    """An endpoint as the list shows it: its deliveries by status and its last success."""

    endpoint: WebhookEndpoint
    last_success: datetime | None
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))


@dataclass
class Logged:
    """One delivery of the log, with the event it carries and every attempt."""

    delivery: WebhookDelivery
    type: str
    resource_id: str
    attempts: list[WebhookAttempt]

    @property
    def resource_page(self) -> str:
        return f"/dashboard/{'batches' if self.type.startswith('batch.') else 'jobs'}/{self.resource_id}"


def _last_success(endpoint_id: Any) -> Any:
    return (select(func.max(WebhookDelivery.finished_at))
            .where(WebhookDelivery.endpoint_id == endpoint_id, WebhookDelivery.status == "succeeded")
            .scalar_subquery())


def _health(session: Session, rows: list[tuple[WebhookEndpoint, datetime | None]]) -> list[Health]:
    found = {endpoint.id: Health(endpoint, last) for endpoint, last in rows}
    if found:
        counted = session.execute(select(WebhookDelivery.endpoint_id, WebhookDelivery.status, func.count())
                                  .where(WebhookDelivery.endpoint_id.in_(list(found)))
                                  .group_by(WebhookDelivery.endpoint_id, WebhookDelivery.status))
        for endpoint_id, status, n in counted:
            found[str(endpoint_id)].counts[status] = n
    return list(found.values())


def find_endpoint(session: Session, viewer: Viewer, endpoint_id: str) -> Health:
    query = select(WebhookEndpoint, _last_success(WebhookEndpoint.id)).where(WebhookEndpoint.id == endpoint_id)
    if viewer.scope is not None:
        query = query.where(WebhookEndpoint.tenant_id == viewer.scope)
    row = session.execute(query).first()
    if row is None:
        raise NotFound(f"webhook endpoint {endpoint_id} not found")
    return _health(session, [(row[0], row[1])])[0]


def find_delivery(session: Session, viewer: Viewer, delivery_id: str) -> Logged:
    """A delivery to one of the viewer's endpoints (per-request callbacks have no page of their own)."""
    query = (select(WebhookDelivery, WebhookEvent.type, WebhookEvent.resource_id).join(WebhookEvent)
             .where(WebhookDelivery.id == delivery_id, WebhookDelivery.endpoint_id.is_not(None)))
    if viewer.scope is not None:
        query = query.where(WebhookDelivery.tenant_id == viewer.scope)
    row = session.execute(query).first()
    if row is None:
        raise NotFound(f"webhook delivery {delivery_id} not found")
    return Logged(row[0], row[1], row[2], delivery.attempts_of(session, [row[0].id])[row[0].id])


def redeliver(session: Session, viewer: Viewer, delivery_id: str) -> list[str]:
    """Due again now, the way `POST /v1/webhooks/{id}/deliveries/{delivery_id}/redeliver` does it;
    the caller hands the ids to `core.delivery.kick` once this is committed."""
    found = find_delivery(session, viewer, delivery_id).delivery
    return webhooks.redeliver(session, [WebhookDelivery.id == found.id,
                                        WebhookDelivery.endpoint_id == found.endpoint_id])


def _status(params: Mapping[str, str]) -> str | None:
    status = params.get("status") or None
    if status is not None and status not in STATUSES:
        raise InvalidInput(f"status is one of {', '.join(STATUSES)}", "status")
    return status


def endpoints(session: Session, viewer: Viewer, params: Mapping[str, str], storage: Storage) -> dict[str, Any]:
    query = select(WebhookEndpoint, _last_success(WebhookEndpoint.id))
    owner = viewer.scope if viewer.scope is not None else params.get("tenant") or None
    if owner is not None:
        query = query.where(WebhookEndpoint.tenant_id == owner)
    if cursor := params.get("cursor"):
        created, last_id = decode_cursor(cursor)
        query = query.where(or_(WebhookEndpoint.created_at < created,
                                and_(WebhookEndpoint.created_at == created, WebhookEndpoint.id < last_id)))
    rows = [(e, last) for e, last in session.execute(
        query.order_by(WebhookEndpoint.created_at.desc(), WebhookEndpoint.id.desc()).limit(ENDPOINTS_PAGE))]
    next_cursor = encode_cursor(rows[-1][0].created_at, rows[-1][0].id) if len(rows) == ENDPOINTS_PAGE else None
    return {"now": utcnow(), "endpoints": _health(session, rows), "next_cursor": next_cursor}


def endpoint(session: Session, viewer: Viewer, params: Mapping[str, str], storage: Storage,
             endpoint_id: str) -> dict[str, Any]:
    health = find_endpoint(session, viewer, endpoint_id)
    query = (select(WebhookDelivery, WebhookEvent.type, WebhookEvent.resource_id).join(WebhookEvent)
             .where(WebhookDelivery.endpoint_id == health.endpoint.id))
    if status := _status(params):
        query = query.where(WebhookDelivery.status == status)
    if cursor := params.get("cursor"):
        created, last_id = decode_cursor(cursor)
        query = query.where(or_(WebhookDelivery.created_at < created,
                                and_(WebhookDelivery.created_at == created, WebhookDelivery.id < last_id)))
    rows = session.execute(query.order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc())
                           .limit(LOG_PAGE)).all()
    attempts = delivery.attempts_of(session, [row[0].id for row in rows])
    log = [Logged(row[0], row[1], row[2], attempts[row[0].id]) for row in rows]
    last = log[-1].delivery if len(log) == LOG_PAGE else None
    return {"now": utcnow(), "health": health, "endpoint": health.endpoint, "log": log,
            "next_cursor": encode_cursor(last.created_at, last.id) if last else None}
