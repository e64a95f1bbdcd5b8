"""Webhook endpoints, their delivery log, redelivery and recovery; the tenant's callback secret."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, Field
from sqlalchemy import and_, or_, select

from api.deps import SettingsDep, TenantDep
from core import delivery, webhooks
from core.db import session_scope
from core.errors import NotFound
from core.events import EVENT_TYPES
from core.listing import decode_cursor, encode_cursor
from core.tables import WebhookDelivery, WebhookEndpoint, WebhookEvent

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])
_t = delivery.time_of


class EndpointIn(BaseModel):
    url: str = Field(max_length=2000, description="https URL (http only in development or when allow-listed)")
    events: list[str] | None = Field(None, description=f"any of {', '.join(EVENT_TYPES)}; omitted or [\"*\"]: "
                                                       "all, except a batch's per-item job events (name those)")
    description: str = Field("", max_length=500)


class EndpointPatch(BaseModel):
    url: str | None = Field(None, max_length=2000)
    events: list[str] | None = None
    description: str | None = Field(None, max_length=500)
    enabled: bool | None = Field(None, description="true re-enables an endpoint that was disabled")


class EndpointOut(BaseModel):
    id: str
    url: str
    events: list[str]
    description: str
    enabled: bool
    disabled_reason: str | None
    created_at: str | None
    secret: str | None = Field(None, description="shown only when created and when rotated")

    @classmethod
    def of(cls, row: WebhookEndpoint, secret: bool = False) -> EndpointOut:
        return cls(id=row.id, url=row.url, events=row.events, description=row.description, enabled=row.enabled,
                   disabled_reason=row.disabled_reason, created_at=_t(row.created_at),
                   secret=row.secret if secret else None)


class EndpointList(BaseModel):
    data: list[EndpointOut]


class SecretOut(BaseModel):
    secret: str = Field(description="signs the per-request callbacks (`webhook` on jobs and batches)")


class AttemptOut(BaseModel):
    at: str | None
    status_code: int | None
    latency_ms: int
    response: str | None = Field(description="first 1 kB of the answer")
    error: str | None


class DeliveryOut(BaseModel):
    id: str = Field(description="the webhook-id header, the same on every attempt")
    event_id: str
    type: str
    status: Literal["pending", "succeeded", "failed"]
    attempts: list[AttemptOut]
    next_attempt_at: str | None
    last_error: str | None
    created_at: str | None
    finished_at: str | None


class DeliveryPage(BaseModel):
    data: list[DeliveryOut]
    next_cursor: str | None


class RecoverIn(BaseModel):
    since: datetime = Field(description="re-send every failed delivery created since then")


class RecoverOut(BaseModel):
    redelivering: int


def _deliveries(session: object, rows: list[tuple[WebhookDelivery, str]]) -> list[DeliveryOut]:
    logged = delivery.attempts_of(session, [d.id for d, _ in rows])  # type: ignore[arg-type]
    return [DeliveryOut(
        id=d.id, event_id=d.event_id, type=type_, status=d.status,
        attempts=[AttemptOut(at=_t(a.at), status_code=a.status_code, latency_ms=a.latency_ms, response=a.response,
                             error=a.error) for a in logged[d.id]],
        next_attempt_at=_t(d.next_attempt_at) if d.status == "pending" else None, last_error=d.last_error,
        created_at=_t(d.created_at), finished_at=_t(d.finished_at)) for d, type_ in rows]


@router.post("", status_code=201, response_model=EndpointOut)
def create(body: EndpointIn, tenant: TenantDep, settings: SettingsDep) -> EndpointOut:
    """Register an endpoint; the answer carries its signing secret, shown only here and on rotation."""
    with session_scope(settings.database_url) as session:
        return EndpointOut.of(webhooks.create_endpoint(session, settings, tenant, body.url, body.events,
                                                       body.description), secret=True)


@router.get("", response_model=EndpointList)
def list_all(tenant: TenantDep, settings: SettingsDep) -> EndpointList:
    with session_scope(settings.database_url) as session:
        return EndpointList(data=[EndpointOut.of(e) for e in webhooks.list_endpoints(session, tenant)])


@router.get("/secret", response_model=SecretOut)
def secret(tenant: TenantDep, settings: SettingsDep) -> SecretOut:
    """The secret that signs callbacks given per request (`webhook` on POST /v1/jobs and /v1/batches)."""
    with session_scope(settings.database_url) as session:
        return SecretOut(secret=webhooks.tenant_secret(session, tenant))


@router.get("/{endpoint_id}", response_model=EndpointOut)
def read(endpoint_id: str, tenant: TenantDep, settings: SettingsDep) -> EndpointOut:
    with session_scope(settings.database_url) as session:
        return EndpointOut.of(webhooks.get_endpoint(session, tenant, endpoint_id))


@router.patch("/{endpoint_id}", response_model=EndpointOut)
def patch(endpoint_id: str, body: EndpointPatch, tenant: TenantDep, settings: SettingsDep) -> EndpointOut:
    with session_scope(settings.database_url) as session:
        endpoint = webhooks.get_endpoint(session, tenant, endpoint_id)
        return EndpointOut.of(webhooks.update_endpoint(session, settings, endpoint, url=body.url, events=body.events,
                                                       description=body.description, enabled=body.enabled))


@router.delete("/{endpoint_id}", status_code=204, response_class=Response)
def remove(endpoint_id: str, tenant: TenantDep, settings: SettingsDep) -> Response:
    with session_scope(settings.database_url) as session:
        session.delete(webhooks.get_endpoint(session, tenant, endpoint_id))
    return Response(status_code=204)


@router.post("/{endpoint_id}/rotate", response_model=EndpointOut)
def rotate(endpoint_id: str, tenant: TenantDep, settings: SettingsDep) -> EndpointOut:
    """A new secret; for 24 hours deliveries carry signatures by both the old and the new one."""
    with session_scope(settings.database_url) as session:
        return EndpointOut.of(webhooks.rotate(webhooks.get_endpoint(session, tenant, endpoint_id)), secret=True)


@router.get("/{endpoint_id}/deliveries", response_model=DeliveryPage)
def deliveries(endpoint_id: str, tenant: TenantDep, settings: SettingsDep,
               status: Literal["pending", "succeeded", "failed"] | None = None, cursor: str | None = None,
               limit: Annotated[int, Query(ge=1, le=500)] = 100) -> DeliveryPage:
    """Newest first, every attempt of each (time, status code, latency, start of the answer or the error)."""
    with session_scope(settings.database_url) as session:
        webhooks.get_endpoint(session, tenant, endpoint_id)
        query = (select(WebhookDelivery, WebhookEvent.type).join(WebhookEvent)
                 .where(WebhookDelivery.endpoint_id == endpoint_id, WebhookDelivery.tenant_id == tenant))
        if status is not None:
            query = query.where(WebhookDelivery.status == status)
        if cursor is not None:  # newest first along (created_at, id), the index the pages use too
            created, last_id = decode_cursor(cursor)
            query = query.where(or_(WebhookDelivery.created_at < created,
                                    and_(WebhookDelivery.created_at == created, WebhookDelivery.id < last_id)))
        rows = [(d, t) for d, t in session.execute(
            query.order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc()).limit(limit))]
        last = rows[-1][0] if len(rows) == limit else None
        data = _deliveries(session, rows)
    return DeliveryPage(data=data, next_cursor=encode_cursor(last.created_at, last.id) if last else None)


@router.post("/{endpoint_id}/deliveries/{delivery_id}/redeliver", response_model=DeliveryOut)
def redeliver(endpoint_id: str, delivery_id: str, tenant: TenantDep, settings: SettingsDep) -> DeliveryOut:
    """Send it again now, with the same webhook-id (a fresh timestamp and signature)."""
    with session_scope(settings.database_url) as session:
        webhooks.get_endpoint(session, tenant, endpoint_id)
        ids = webhooks.redeliver(session, [WebhookDelivery.id == delivery_id,
                                           WebhookDelivery.endpoint_id == endpoint_id])
        if not ids:
            raise NotFound(f"delivery {delivery_id} not found")
    delivery.kick(ids, settings)
    with session_scope(settings.database_url) as session:
        row = session.execute(select(WebhookDelivery, WebhookEvent.type).join(WebhookEvent)
                              .where(WebhookDelivery.id == delivery_id)).one()
        return _deliveries(session, [(row[0], row[1])])[0]


@router.post("/{endpoint_id}/recover", response_model=RecoverOut)
def recover(endpoint_id: str, body: RecoverIn, tenant: TenantDep, settings: SettingsDep) -> RecoverOut:
    """Re-send every failed delivery to this endpoint created since `since`."""
    since = body.since.astimezone(UTC).replace(tzinfo=None) if body.since.tzinfo else body.since
    with session_scope(settings.database_url) as session:
        webhooks.get_endpoint(session, tenant, endpoint_id)
        ids = webhooks.redeliver(session, [WebhookDelivery.endpoint_id == endpoint_id,
                                           WebhookDelivery.status == "failed", WebhookDelivery.created_at >= since])
    delivery.kick(ids, settings)
    return RecoverOut(redelivering=len(ids))
