"""Webhook events, written to the outbox in the same transaction as the state change they report.

The hooks are single calls in the code that changes state (finishing, releasing, canceling,
reconciling, stamping a batch): the event and one delivery row per destination commit or roll back
with the change, so nothing is announced that did not happen and nothing that happened is lost.
After the commit the deliveries are handed to the control process at once; if that message is
lost, the periodic due pass finds them.

Who hears what: an endpoint takes the types it lists ("*" for all); a per-request callback takes
the `webhook_events` given with the request. A batch's per-item job events go only to those that
name the type, so a 100,000-item catalog does not write 100,000 events by default. Nothing is
written for an event nobody takes.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import event, func, insert, select
from sqlalchemy.orm import Session

from core.status import TERMINAL, BatchStatus, batch_status
from core.tables import Batch, Job, WebhookCallback, WebhookDelivery, WebhookEndpoint, WebhookEvent, new_id, utcnow

log = logging.getLogger(__name__)

JOB_EVENTS = ("job.succeeded", "job.failed", "job.canceled")
BATCH_EVENTS = ("batch.progress", "batch.completed", "batch.canceled")
EVENT_TYPES = JOB_EVENTS + BATCH_EVENTS
PROGRESS_INTERVAL = timedelta(seconds=5)  # at most one batch.progress per batch this often

_PENDING = "step1x_new_deliveries"


def ordered_id(prefix: str) -> str:
    """An id that sorts by creation time (microseconds, then random), so the delivery log pages by id."""
    return f"{prefix}_{time.time_ns() // 1000:014x}{secrets.token_hex(9)}"


def _z(value: Any) -> str | None:
    return value.isoformat(timespec="milliseconds") + "Z" if value else None


def _endpoints(session: Session, tenant: str) -> list[tuple[str, list[str]]]:
    """The tenant's enabled endpoints (id, events), read once per transaction."""
    cache: dict[str, list[tuple[str, list[str]]]] = session.info.setdefault("step1x_endpoints", {})
    if tenant not in cache:
        rows = session.execute(select(WebhookEndpoint.id, WebhookEndpoint.events)
                               .where(WebhookEndpoint.tenant_id == tenant, WebhookEndpoint.enabled.is_(True)))
        cache[tenant] = [(row.id, list(row.events)) for row in rows]
    return cache[tenant]


def _callbacks(session: Session, resource_ids: Iterable[str]) -> dict[str, tuple[str, list[str]]]:
    ids = [r for r in set(resource_ids) if r]
    if not ids:
        return {}
    rows = session.execute(select(WebhookCallback.resource_id, WebhookCallback.url, WebhookCallback.events)
                           .where(WebhookCallback.resource_id.in_(ids)))
    return {row.resource_id: (row.url, list(row.events)) for row in rows}


def _destinations(session: Session, tenant: str, type_: str, callback: tuple[str, list[str]] | None,
                  batch_item: bool) -> list[dict[str, str | None]]:
    found: list[dict[str, str | None]] = [
        {"endpoint_id": endpoint_id, "callback_url": None} for endpoint_id, events in _endpoints(session, tenant)
        if type_ in events or ("*" in events and not batch_item)]
    if callback is not None and type_ in callback[1]:
        found.append({"endpoint_id": None, "callback_url": callback[0]})
    return found


def emit(session: Session, tenant: str, type_: str, resource_id: str, data: dict[str, Any],
         destinations: Sequence[dict[str, str | None]], sequence: int) -> None:
    """Write the event and its deliveries; hand the deliveries over once the transaction commits."""
    now = utcnow()
    event_id = new_id("evt")
    payload = {"type": type_, "timestamp": _z(now), "data": {**data, "sequence": sequence}}
    session.execute(insert(WebhookEvent).values(id=event_id, tenant_id=tenant, type=type_, resource_id=resource_id,
                                                sequence=sequence, payload=payload, created_at=now))
    rows: list[dict[str, Any]] = [
        {"id": ordered_id("msg"), "event_id": event_id, "tenant_id": tenant, "status": "pending", "attempts": 0,
         "next_attempt_at": now, "created_at": now, **dest} for dest in destinations]
    session.execute(insert(WebhookDelivery), rows)
    pending: list[tuple[str, str | None, str | None]] = session.info.setdefault(_PENDING, [])
    if not pending:
        event.listen(session, "after_commit", _hand_over, once=True)
        event.listen(session, "after_rollback", _forget, once=True)
    pending.extend((row["id"], row["endpoint_id"], row["callback_url"]) for row in rows)


def _hand_over(session: Session) -> None:
    pending = session.info.pop(_PENDING, [])
    session.info.pop("step1x_endpoints", None)
    if pending:
        from core.delivery import kick, spread  # the sending half imports this module

        kick(spread(pending))


def _forget(session: Session) -> None:
    session.info.pop(_PENDING, None)
    session.info.pop("step1x_endpoints", None)


def _next_sequence(session: Session, resource_id: str) -> int:
    last = session.scalar(select(func.max(WebhookEvent.sequence)).where(WebhookEvent.resource_id == resource_id))
    return (last or 0) + 1


def jobs_ended(session: Session, *criteria: Any) -> None:
    """Events for the jobs matching `criteria` that are now terminal and were not announced yet, and
    progress for their batches. Callers pass what identifies the rows they just changed."""
    groups = session.execute(select(Job.tenant_id, Job.batch_id).where(*criteria, Job.status.in_(TERMINAL))
                             .group_by(Job.tenant_id, Job.batch_id)).all()
    if not groups:
        return
    batch_ids = {g.batch_id for g in groups if g.batch_id}
    callbacks = _callbacks(session, batch_ids)
    # Single jobs always have a possible callback of their own; a batch's items only when named.
    wanted = [g for g in groups if g.batch_id is None or any(
        _destinations(session, g.tenant_id, t, callbacks.get(g.batch_id), True) for t in JOB_EVENTS)]
    for group in wanted:
        in_group = Job.batch_id.is_(None) if group.batch_id is None else Job.batch_id == group.batch_id
        # Announced means: for this ending. A job retried after it ended is announced again when it
        # ends again (its finished_at is newer than every earlier event of it).
        announced = select(WebhookEvent.id).where(WebhookEvent.resource_id == Job.id,
                                                  WebhookEvent.created_at >= Job.finished_at).exists()
        jobs = session.scalars(select(Job).where(*criteria, in_group, Job.tenant_id == group.tenant_id,
                                                 Job.status.in_(TERMINAL), ~announced)).all()
        own = _callbacks(session, [j.id for j in jobs]) if group.batch_id is None else {}
        for job in jobs:
            type_ = f"job.{job.status}"
            callback = own.get(job.id) if group.batch_id is None else callbacks.get(group.batch_id)
            destinations = _destinations(session, job.tenant_id, type_, callback, group.batch_id is not None)
            if destinations:
                emit(session, job.tenant_id, type_, job.id, job_data(job), destinations,
                     _next_sequence(session, job.id))
    batch_progress(session, batch_ids)


def job_data(job: Job) -> dict[str, Any]:
    # Output keys, not URLs: each delivery attempt presigns them fresh.
    return {"id": job.id, "batch_id": job.batch_id, "custom_id": job.custom_id, "status": job.status,
            "error": (job.error or "")[:2000] or None, "output_keys": list(job.output_keys or []),
            "finished_at": _z(job.finished_at)}


def _batch_data(session: Session, batch: Batch, public_url: str | None) -> tuple[BatchStatus, dict[str, Any]]:
    from core.jobs import counts  # core.jobs calls into this module

    per_status = counts(session, batch.id)
    status = batch_status(per_status, batch.canceled)
    done = sum(per_status[s] for s in TERMINAL)
    data: dict[str, Any] = {"id": batch.id, "status": status.value, "total": batch.total, "counts": per_status,
                            "progress": round(done / batch.total, 4) if batch.total else 1.0,
                            "finished_at": _z(batch.finished_at)}
    if public_url is not None:
        data["results_url"] = f"{public_url.rstrip('/')}/v1/batches/{batch.id}/results"
    return status, data


def batch_progress(session: Session, batch_ids: Iterable[str]) -> None:
    """One batch.progress per batch at most every 5 s, and only if someone takes it."""
    ids = sorted(set(batch_ids))
    if not ids:
        return
    callbacks = _callbacks(session, ids)
    for batch_id in ids:
        batch = session.get(Batch, batch_id, with_for_update=True)  # serialises the 5-second check
        if batch is None or batch.finished_at is not None:
            continue
        destinations = _destinations(session, batch.tenant_id, "batch.progress", callbacks.get(batch_id), False)
        if not destinations:
            continue
        last = session.scalar(select(func.max(WebhookEvent.created_at)).where(
            WebhookEvent.resource_id == batch_id, WebhookEvent.type == "batch.progress"))
        if last is not None and utcnow() - last < PROGRESS_INTERVAL:
            continue
        _, data = _batch_data(session, batch, None)
        emit(session, batch.tenant_id, "batch.progress", batch_id, data, destinations,
             _next_sequence(session, batch_id))


def batches_ended(session: Session, batch_ids: Iterable[str]) -> None:
    """batch.completed (or batch.canceled) for batches just stamped finished."""
    from core.settings import get_settings

    ids = sorted(set(batch_ids))
    callbacks = _callbacks(session, ids)
    for batch_id in ids:
        batch = session.get(Batch, batch_id)
        if batch is None:
            continue
        type_ = "batch.canceled" if batch.canceled else "batch.completed"
        destinations = _destinations(session, batch.tenant_id, type_, callbacks.get(batch_id), False)
        if destinations:
            _, data = _batch_data(session, batch, get_settings().public_url)
            emit(session, batch.tenant_id, type_, batch_id, data, destinations, _next_sequence(session, batch_id))
