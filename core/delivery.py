"""Sending webhook deliveries from the outbox, the Standard Webhooks way.

A delivery is claimed by moving its `next_attempt_at` past the attempt's timeout (a lease): the
first claimant sends it, a duplicate message finds it not due and does nothing, and a sender that
crashed mid-attempt leaves it due again when the lease passes, for the periodic pass to find.
Every attempt is logged. 2xx is success; anything else (3xx included: redirects are never
followed) is retried on the schedule below, with jitter; `Retry-After` on 429/503 pushes the next
attempt later, never earlier, up to the last step of the schedule; 410 disables the endpoint;
an endpoint failing for 5 days without a success is disabled, saying why.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
from sqlalchemy import ColumnElement, and_, func, select, update
from sqlalchemy.orm import Session

from core import outbound, webhooks
from core.db import session_scope
from core.settings import Settings, get_settings
from core.storage import Storage
from core.tables import WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookEvent, WebhookSigningSecret, utcnow

log = logging.getLogger(__name__)

DELIVER = "step1x.deliver"
# Seconds before attempt n+1 (the first is at once): 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h, 24 h.
SCHEDULE = (0, 5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400)
DISABLE_AFTER = timedelta(days=5)
RESPONSE_LOGGED = 1024
# Attempts on the wire at once per destination (endpoint, or callback URL): a slow receiver holds
# this many of the control process's threads, and the rest keep delivering to everyone else.
PER_DESTINATION = 4


def kick(delivery_ids: Sequence[str], settings: Settings | None = None) -> None:
    """Hand deliveries to the control process now. A failure here only delays them: the periodic
    pass sends whatever is due."""
    from core.dispatch import CONTROL, app_for

    settings = settings or get_settings()
    try:
        app = app_for(settings)
        with app.producer_or_acquire() as producer:
            for delivery_id in delivery_ids:
                app.send_task(DELIVER, args=[delivery_id], queue=CONTROL, producer=producer)
    except Exception as exc:
        log.warning("could not queue %d webhook deliveries (the due pass will): %s", len(delivery_ids), exc)


def _lease(settings: Settings) -> timedelta:
    return timedelta(seconds=settings.webhook_timeout + 30)


def due(settings: Settings, limit: int = 1000) -> list[str]:
    """Deliveries whose time has come (retries, and any whose message was lost)."""
    with session_scope(settings.database_url) as session:
        return list(session.scalars(select(WebhookDelivery.id).where(
            WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= utcnow())
            .order_by(WebhookDelivery.next_attempt_at).limit(limit)))


@dataclass
class Prepared:
    url: str
    body: bytes
    secrets: list[str]
    endpoint_id: str | None
    callback_url: str | None

    def same_destination(self) -> ColumnElement[bool]:
        if self.endpoint_id is not None:
            return WebhookDelivery.endpoint_id == self.endpoint_id
        return and_(WebhookDelivery.endpoint_id.is_(None), WebhookDelivery.callback_url == self.callback_url)


def _claim(session: Session, settings: Settings, delivery_id: str) -> Prepared | None:
    now = utcnow()
    due_now = (WebhookDelivery.id == delivery_id, WebhookDelivery.status == "pending",
               WebhookDelivery.next_attempt_at <= now)
    row = session.execute(select(WebhookDelivery.event_id, WebhookDelivery.endpoint_id, WebhookDelivery.callback_url,
                                 WebhookDelivery.tenant_id).where(*due_now)).first()
    if row is None:
        return None
    if row.endpoint_id is not None:
        # Locked: claims for one endpoint count its attempts on the wire one at a time.
        endpoint = session.get(WebhookEndpoint, row.endpoint_id, with_for_update=True)
        if endpoint is None or not endpoint.enabled:
            reason = endpoint.disabled_reason if endpoint else "deleted"
            _finish(session, delivery_id, "failed", f"endpoint disabled: {reason}")
            return None
        url, secrets = endpoint.url, webhooks.signing_secrets(endpoint, now)
    else:
        secret = session.get(WebhookSigningSecret, row.tenant_id)
        assert secret is not None and row.callback_url is not None  # stored with the callback
        url, secrets = row.callback_url, [secret.secret]
    prepared = Prepared(url, b"", secrets, row.endpoint_id, row.callback_url)
    busy = session.scalar(select(func.count()).where(prepared.same_destination(), WebhookDelivery.sending_until > now))
    if (busy or 0) >= PER_DESTINATION:
        return None  # the attempt that finishes next hands this one over
    lease = now + _lease(settings)
    if not session.execute(update(WebhookDelivery).where(*due_now)
                           .values(next_attempt_at=lease, sending_until=lease)).rowcount:  # type: ignore[attr-defined]
        return None
    payload = session.scalar(select(WebhookEvent.payload).where(WebhookEvent.id == row.event_id))
    prepared.body = _body(settings, payload or {})
    return prepared


def _hand_over_next(settings: Settings, prepared: Prepared) -> None:
    """An attempt to this destination just ended: send the next one that waits for a free slot."""
    now = utcnow()
    with session_scope(settings.database_url) as session:
        waiting = list(session.scalars(select(WebhookDelivery.id).where(
            prepared.same_destination(), WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
            .order_by(WebhookDelivery.next_attempt_at).limit(PER_DESTINATION)))
    if waiting:
        kick(waiting, settings)


def _body(settings: Settings, payload: dict[str, Any]) -> bytes:
    """The stored payload with output keys turned into presigned URLs, fresh for this attempt."""
    data = dict(payload.get("data", {}))
    keys = data.pop("output_keys", None)
    if keys is not None:
        storage = Storage(settings)
        data["outputs"] = [{"key": key, "url": storage.presign_get(key)} for key in keys]
    return json.dumps({**payload, "data": data}, separators=(",", ":")).encode()


def _finish(session: Session, delivery_id: str, status: str, error: str | None) -> None:
    session.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id)
                    .values(status=status, finished_at=utcnow(), last_error=error))


def retry_after(response: httpx.Response) -> float | None:
    """Seconds the receiver asked us to wait (delta-seconds or an HTTP date), if it did."""
    value = response.headers.get("retry-after")
    if value is None or response.status_code not in (429, 503):
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, (parsedate_to_datetime(value).timestamp() - time.time()))
    except (TypeError, ValueError):
        return None


def deliver(settings: Settings, delivery_id: str, client: httpx.Client | None = None) -> str | None:
    """One attempt at one delivery, if it is due; returns its status afterwards (None: not due)."""
    with session_scope(settings.database_url) as session:
        prepared = _claim(session, settings, delivery_id)
    if prepared is None:
        return None
    timestamp = int(time.time())  # wall clock: receivers check it against theirs
    headers = {"content-type": "application/json", "webhook-id": delivery_id, "webhook-timestamp": str(timestamp),
               "webhook-signature": " ".join(webhooks.sign(s, delivery_id, timestamp, prepared.body)
                                             for s in prepared.secrets)}
    started = time.perf_counter()
    response: httpx.Response | None = None
    error: str | None = None
    text: str | None = None
    own = client is None
    http = client or outbound.client(settings, settings.webhook_timeout)
    try:
        with http.stream("POST", prepared.url, content=prepared.body, headers=headers) as response:
            head = b""
            for chunk in response.iter_bytes():
                head += chunk
                if len(head) >= RESPONSE_LOGGED:
                    break
            text = head[:RESPONSE_LOGGED].decode("utf-8", "replace")
    except outbound.Refused as exc:
        error = exc.reason
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
    finally:
        if own:
            http.close()
    latency = int((time.perf_counter() - started) * 1000)
    with session_scope(settings.database_url) as session:
        status = _record(session, settings, delivery_id, prepared, response, error, text, latency)
    _hand_over_next(settings, prepared)
    return status


def _record(session: Session, settings: Settings, delivery_id: str, prepared: Prepared,
            response: httpx.Response | None, error: str | None, text: str | None, latency: int) -> str:
    now = utcnow()
    code = response.status_code if response is not None and error is None else None
    session.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id).values(sending_until=None))
    session.add(WebhookAttempt(delivery_id=delivery_id, at=now, status_code=code, latency_ms=latency,
                               response=text, error=error))
    endpoint = session.get(WebhookEndpoint, prepared.endpoint_id, with_for_update=True) \
        if prepared.endpoint_id else None
    if code is not None and 200 <= code < 300:
        _finish(session, delivery_id, "succeeded", None)
        if endpoint is not None:
            endpoint.failing_since = None
        return "succeeded"
    problem = error or f"HTTP {code}" + (" (redirects are not followed)" if code and 300 <= code < 400 else "")
    if code == 410:
        _finish(session, delivery_id, "failed", problem)
        if endpoint is not None:
            webhooks.disable(session, endpoint.id, f"the receiver answered 410 Gone at {now.isoformat()}Z")
        return "failed"
    if endpoint is not None:
        endpoint.failing_since = endpoint.failing_since or now
        limit = DISABLE_AFTER * settings.outbound_retry_scale
        if now - endpoint.failing_since >= limit:
            webhooks.disable(session, endpoint.id, f"every delivery failed for {limit} without a success "
                                                   f"(last: {problem})")
    delivery = session.get(WebhookDelivery, delivery_id)
    assert delivery is not None
    delivery.attempts += 1
    if delivery.attempts >= len(SCHEDULE):
        _finish(session, delivery_id, "failed", f"gave up after {delivery.attempts} attempts: {problem}")
        return "failed"
    delay = SCHEDULE[delivery.attempts] * settings.outbound_retry_scale * random.uniform(0.8, 1.2)
    asked = retry_after(response) if response is not None and error is None else None
    if asked is not None:
        delay = max(delay, min(asked, SCHEDULE[-1] * settings.outbound_retry_scale))
    delivery.next_attempt_at = now + timedelta(seconds=delay)
    delivery.last_error = problem
    return "pending"


def attempts_of(session: Session, delivery_ids: Sequence[str]) -> dict[str, list[WebhookAttempt]]:
    found: dict[str, list[WebhookAttempt]] = {d: [] for d in delivery_ids}
    for row in session.scalars(select(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(list(delivery_ids)))
                               .order_by(WebhookAttempt.id)):
        found[row.delivery_id].append(row)
    return found


def time_of(value: datetime | None) -> str | None:
    return value.isoformat(timespec="milliseconds") + "Z" if value else None
