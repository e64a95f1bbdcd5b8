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
from collections.abc import Iterable, Sequence
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


def spread(rows: Iterable[tuple[str, str | None, str | None]]) -> list[str]:
    """Of (delivery id, endpoint id, callback URL) rows, the first few per destination: each task
    goes on through its destination's backlog, so a message per delivery would only be skipped."""
    taken: dict[tuple[str | None, str | None], int] = {}
    chosen = []
    for delivery_id, endpoint_id, callback_url in rows:
        key = (endpoint_id, None if endpoint_id else callback_url)
        if taken.get(key, 0) < PER_DESTINATION:
            taken[key] = taken.get(key, 0) + 1
            chosen.append(delivery_id)
    return chosen


def _lease(settings: Settings) -> timedelta:
    return timedelta(seconds=settings.webhook_timeout + 30)


def due(settings: Settings, limit: int = 10_000) -> list[str]:
    """Deliveries whose time has come (retries, and any whose message was lost), a few per destination."""
    with session_scope(settings.database_url) as session:
        rows = session.execute(select(WebhookDelivery.id, WebhookDelivery.endpoint_id, WebhookDelivery.callback_url)
                               .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= utcnow())
                               .order_by(WebhookDelivery.next_attempt_at).limit(limit))
        return spread((row.id, row.endpoint_id, row.callback_url) for row in rows)


@dataclass
class Prepared:
    id: str
    url: str
    body: bytes
    secrets: list[str]
    endpoint_id: str | None
    callback_url: str | None

    def same_destination(self) -> ColumnElement[bool]:
        if self.endpoint_id is not None:
            return WebhookDelivery.endpoint_id == self.endpoint_id
        return and_(WebhookDelivery.endpoint_id.is_(None), WebhookDelivery.callback_url == self.callback_url)


def _claim(session: Session, settings: Settings, *which: ColumnElement[bool]) -> Prepared | None:
    """Claim the oldest due delivery matching `which`, if its destination has a free slot."""
    now = utcnow()
    row = session.execute(select(WebhookDelivery.id, WebhookDelivery.endpoint_id, WebhookDelivery.callback_url,
                                 WebhookDelivery.tenant_id, WebhookEvent.payload).join(WebhookEvent)
                          .where(*which, WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
                          .order_by(WebhookDelivery.next_attempt_at).limit(1)
                          .with_for_update(of=WebhookDelivery, skip_locked=True)).first()
    if row is None:
        return None
    if row.endpoint_id is not None:
        endpoint = session.get(WebhookEndpoint, row.endpoint_id)
        if endpoint is None or not endpoint.enabled:
            reason = endpoint.disabled_reason if endpoint else "deleted"
            _finish(session, row.id, "failed", f"endpoint disabled: {reason}")
            return None
        url, secrets = endpoint.url, webhooks.signing_secrets(endpoint, now)
    else:
        secret = session.get(WebhookSigningSecret, row.tenant_id)
        assert secret is not None and row.callback_url is not None  # stored with the callback
        url, secrets = row.callback_url, [secret.secret]
    prepared = Prepared(row.id, url, b"", secrets, row.endpoint_id, row.callback_url)
    busy = session.scalar(select(func.count()).where(prepared.same_destination(), WebhookDelivery.sending_until > now))
    # Counted without a lock, so two claims at the same instant may both pass: a soft cap.
    if (busy or 0) >= PER_DESTINATION:
        return None  # the tasks on the wire go on through this backlog
    lease = now + _lease(settings)
    # Still due: SQLite ignores SKIP LOCKED, so another sender may have read the same row and taken it.
    taken = session.execute(update(WebhookDelivery)
                            .where(WebhookDelivery.id == row.id, WebhookDelivery.status == "pending",
                                   WebhookDelivery.next_attempt_at <= now)
                            .values(next_attempt_at=lease, sending_until=lease))
    if taken.rowcount != 1:  # type: ignore[attr-defined]
        return None
    prepared.body = _body(settings, row.payload or {})
    return prepared


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


def deliver(settings: Settings, delivery_id: str, burst: int = 1000) -> str | None:
    """Attempt this delivery if it is due, then go on with its destination's due backlog (up to
    `burst` attempts) while a slot stays free; returns the first attempt's status (None: not due)."""
    with session_scope(settings.database_url) as session:
        prepared = _claim(session, settings, WebhookDelivery.id == delivery_id)
    if prepared is None:
        return None
    with outbound.client(settings, settings.webhook_timeout) as http:
        first = status = _attempt(settings, http, prepared)
        for _ in range(burst - 1):
            with session_scope(settings.database_url) as session:
                following = _claim(session, settings, prepared.same_destination())
            if following is None:
                break
            status = _attempt(settings, http, following)
    log.debug("delivery %s: %s (last of the burst: %s)", delivery_id, first, status)
    return first


def _attempt(settings: Settings, http: httpx.Client, prepared: Prepared) -> str:
    timestamp = int(time.time())  # wall clock: receivers check it against theirs
    headers = {"content-type": "application/json", "webhook-id": prepared.id, "webhook-timestamp": str(timestamp),
               "webhook-signature": " ".join(webhooks.sign(s, prepared.id, timestamp, prepared.body)
                                             for s in prepared.secrets)}
    started = time.perf_counter()
    response: httpx.Response | None = None
    error: str | None = None
    text: str | None = None
    try:
        with http.stream("POST", prepared.url, content=prepared.body, headers=headers) as response:
            head = b""
            for chunk in response.iter_raw():  # never inflated: see core.outbound
                head += chunk
                if len(head) >= RESPONSE_LOGGED:
                    break
            text = head[:RESPONSE_LOGGED].decode("utf-8", "replace")
    except outbound.Refused as exc:
        error = exc.reason
    except Exception as exc:  # httpx.HTTPError, or e.g. InvalidURL for a URL stored before URLs were checked for it
        error = f"{type(exc).__name__}: {exc}"
    latency = int((time.perf_counter() - started) * 1000)
    with session_scope(settings.database_url) as session:
        return _record(session, settings, prepared.id, prepared, response, error, text, latency)


def _record(session: Session, settings: Settings, delivery_id: str, prepared: Prepared,
            response: httpx.Response | None, error: str | None, text: str | None, latency: int) -> str:
    now = utcnow()
    code = response.status_code if response is not None and error is None else None
    session.add(WebhookAttempt(delivery_id=delivery_id, at=now, status_code=code, latency_ms=latency,
                               response=text, error=error))
    if code is not None and 200 <= code < 300:
        session.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id)
                        .values(status="succeeded", finished_at=now, last_error=None, sending_until=None))
        if prepared.endpoint_id:  # matches (and locks) the endpoint only when it was failing
            session.execute(update(WebhookEndpoint).where(WebhookEndpoint.id == prepared.endpoint_id,
                                                          WebhookEndpoint.failing_since.is_not(None))
                            .values(failing_since=None))
        return "succeeded"
    session.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id).values(sending_until=None))
    endpoint = session.get(WebhookEndpoint, prepared.endpoint_id, with_for_update=True) \
        if prepared.endpoint_id else None
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
