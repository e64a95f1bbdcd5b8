"""Accept work: validate every item against stored state, store jobs in bulk, dispatch them.

A request with any bad item is rejected whole, listing every bad item and field, and nothing of it
is stored (see `core.intake`: one transaction, committed after the last chunk). Accepted jobs are
committed before their messages are sent, so a worker never sees an id the database does not have;
if the broker is down, the jobs stay queued and the reconciler dispatches them later.

A catalog is marked sent by one stamp on its batch row after its last message left, not by
rewriting every job: `unsent` and `sent_before` are how the reconciler reads either stamp.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core import dispatch, fetch
from core.catalog import BatchTerms
from core.db import session_scope
from core.errors import Conflict, FieldError
from core.intake import Accepted, Intake
from core.settings import Settings
from core.tables import Batch, IdempotencyKey, Job, utcnow

log = logging.getLogger(__name__)

# Items validated and stored per step: bounds the memory a catalog takes, whatever its size.
CHUNK = 5000

Dispatcher = Callable[[Sequence[dispatch.Planned]], object]
Defer = Callable[[Callable[[], None]], object]
OnAccept = Callable[[Session, str], None]


def accept(session: Session, settings: Settings, tenant: str, raw_items: Sequence[Any], *,
           as_batch: bool, metadata: dict[str, Any] | None = None, terms: BatchTerms | None = None) -> Accepted:
    """Validate and store items already in memory; the caller commits, then sends."""
    intake = Intake(session, settings, tenant, as_batch=as_batch, metadata=metadata, terms=terms)
    for start in range(0, len(raw_items), CHUNK):
        intake.add(raw_items[start:start + CHUNK])
    return intake.close()


def unsent(older_than: datetime) -> ColumnElement[bool]:
    """Jobs stored before `older_than` whose message never left: neither the job nor its batch
    carries a dispatch stamp (the dispatch failed part-way, or the process died before it)."""
    batch_sent = select(Batch.id).where(Batch.id == Job.batch_id, Batch.dispatched_at.is_not(None)).exists()
    return and_(Job.dispatched_at.is_(None), ~batch_sent, Job.created_at < older_than)


def sent_before(moment: datetime) -> ColumnElement[bool]:
    """Jobs last sent before `moment`, by their own stamp (a re-send) or else their batch's."""
    batch_sent = select(Batch.id).where(Batch.id == Job.batch_id, Batch.dispatched_at < moment).exists()
    return or_(Job.dispatched_at < moment, and_(Job.dispatched_at.is_(None), batch_sent))


def send(session: Session, settings: Settings, planned: Sequence[dispatch.Planned]) -> int:
    """Dispatch jobs the reconciler or the coalescer hold, and stamp each (a bounded set)."""
    sent = dispatch.send(dispatch.cut(planned, settings), settings)
    ids = [job.id for job in planned]
    for start in range(0, len(ids), 5000):
        session.execute(update(Job).where(Job.id.in_(ids[start:start + 5000]), Job.status == "queued")
                        .values(dispatched_at=utcnow()), execution_options={"synchronize_session": False})
    return sent


def dispatch_undispatched(settings: Settings, tenant: str, resource: str) -> int:
    """A replay of a request whose first try was stored but not (fully) sent, say because the API
    died at the commit: send what was never sent, now, instead of waiting for the reconciler.
    A job sent twice costs nothing (the second claim skips it)."""
    owned = or_(Job.batch_id == resource, Job.id == resource)
    try:
        with session_scope(settings.database_url) as session:
            rows = session.execute(select(Job.id, Job.group_key, Job.cost, Job.lane).where(
                owned, Job.tenant_id == tenant, Job.status == "queued", Job.group_key != fetch.WAITING,
                unsent(utcnow()))).all()
            if rows:
                send(session, settings, [dispatch.Planned(*row) for row in rows])
                if session.get(Batch, resource) is not None:
                    session.execute(update(Batch).where(Batch.id == resource).values(dispatched_at=utcnow()))
                log.warning("replay of %s dispatched %d jobs its first request left unsent", resource, len(rows))
    except Exception as exc:  # the jobs are safe in the database; the reconciler dispatches them
        log.warning("dispatch of %s on replay failed, the reconciler will retry: %s", resource, exc)
        return 0
    return len(rows)


def send_committed(settings: Settings, planned: Sequence[dispatch.Planned]) -> None:
    with session_scope(settings.database_url) as session:
        send(session, settings, planned)


def send_accepted(settings: Settings, accepted: Accepted, defer: Defer | None = None) -> None:
    """Send a committed submission's micro-batches, then stamp it sent: the batch row for a catalog
    (one write, not one per job), the job itself for a single job. With `defer`, only the first
    micro-batch leaves now, so a worker starts at once, and the rest is handed to `defer` (the API
    sends it after answering). A failure leaves the stamp unset: the reconciler sends those jobs."""
    messages = accepted.messages
    if defer is not None and len(messages) > 1:
        _send_and_stamp(settings, accepted, messages[:1], stamp=False)
        defer(partial(_send_and_stamp, settings, accepted, messages[1:]))
    else:
        _send_and_stamp(settings, accepted, messages)


def _send_and_stamp(settings: Settings, accepted: Accepted, messages: Sequence[tuple[str, list[str]]],
                    stamp: bool = True) -> None:
    try:
        dispatch.send_ids(messages, settings)
        if stamp:
            with session_scope(settings.database_url) as session:
                if accepted.batch is not None:
                    session.execute(update(Batch).where(Batch.id == accepted.batch.id)
                                    .values(dispatched_at=utcnow()))
                elif messages:  # a job waiting for its URL inputs is sent by core.fetch, later
                    session.execute(update(Job).where(Job.id == accepted.first_id).values(dispatched_at=utcnow()))
    except Exception as exc:  # the jobs are safe in the database; the reconciler dispatches them
        log.warning("dispatch of %s failed, the reconciler will retry: %s", accepted.resource, exc)


def body_hash(body: Any) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def replayed(session: Session, tenant: str, key: str | None, digest: str) -> str | None:
    """The resource an earlier request with this Idempotency-Key created, if any."""
    if key is None:
        return None
    row = session.get(IdempotencyKey, (tenant, key))
    if row is None:
        return None
    if row.request_hash != digest:
        raise Conflict(f"Idempotency-Key {key!r} was used with a different request body: use a new key",
                       "Idempotency-Key")
    return row.resource_id


class Submission:
    """One submission fed in chunks (a streamed manifest, or items already in memory): `add` each
    chunk, then `finish` with the request's digest. Everything happens in one transaction that only
    `finish` commits; `abort` (or any error) rolls it back, leaving nothing stored."""

    def __init__(self, settings: Settings, tenant: str, *, as_batch: bool, metadata: dict[str, Any] | None = None,
                 idempotency_key: str | None = None, terms: BatchTerms | None = None,
                 on_accept: OnAccept | None = None) -> None:
        self.settings, self.tenant, self.key, self.on_accept = settings, tenant, idempotency_key, on_accept
        self._scope: AbstractContextManager[Session] = session_scope(settings.database_url)
        self.session = self._scope.__enter__()
        self._open = True
        self.intake: Intake | None = None
        try:
            # A replay of a stored request only needs its digest: nothing is validated or stored.
            self.earlier = self.session.get(IdempotencyKey, (tenant, idempotency_key)) if idempotency_key else None
            if self.earlier is None:
                self.intake = Intake(self.session, settings, tenant, as_batch=as_batch, metadata=metadata,
                                     terms=terms)
        except BaseException as exc:
            self.abort(exc)
            raise

    def add(self, items: Sequence[Any], errors: Sequence[FieldError] = ()) -> None:
        """Validate and store a chunk; `errors` are problems found upstream (a manifest's bad lines)."""
        if self.intake is not None:
            try:
                self.intake.reject(errors)
                self.intake.add(items)
            except BaseException as exc:
                self.abort(exc)
                raise

    def abort(self, exc: BaseException | None = None) -> None:
        """Roll back; safe to call again."""
        if self._open:
            self._open = False
            if self.intake is not None:
                self.intake.discard()
            error = exc or Exception("submission aborted")
            self._scope.__exit__(type(error), error, None)

    def _commit(self) -> None:
        self._open = False
        self._scope.__exit__(None, None, None)

    def finish(self, digest: str, dispatcher: Dispatcher | None = None, defer: Defer | None = None
               ) -> tuple[str, bool]:
        """Commit and dispatch (see `send_accepted` for `defer`); returns (batch or job id, whether it
        was created now)."""
        if self.intake is None:
            self._commit()
            assert self.earlier is not None
            if self.earlier.request_hash != digest:
                raise Conflict(f"Idempotency-Key {self.key!r} was used with a different request body: use a new key",
                               "Idempotency-Key")
            dispatch_undispatched(self.settings, self.tenant, self.earlier.resource_id)
            return self.earlier.resource_id, False
        try:
            accepted = self.intake.close()
            if self.on_accept is not None:
                self.on_accept(self.session, accepted.resource)
            if self.key is not None:
                self.session.add(IdempotencyKey(tenant_id=self.tenant, key=self.key, request_hash=digest,
                                                resource_id=accepted.resource))
        except BaseException as exc:
            self.abort(exc)
            raise
        try:
            self._commit()
        except IntegrityError:
            # A concurrent request with the same key committed first: answer with its resource.
            with session_scope(self.settings.database_url) as session:
                earlier = replayed(session, self.tenant, self.key, digest)
            if earlier is None:
                raise
            return earlier, False
        if dispatcher is not None:
            dispatcher(accepted.planned)  # the coalescer: it only queues them in memory
        else:
            send_accepted(self.settings, accepted, defer)
        return accepted.resource, True


def submit(settings: Settings, tenant: str, items: Sequence[Any], *, as_batch: bool,
           metadata: dict[str, Any] | None = None, idempotency_key: str | None = None,
           body: Any = None, terms: BatchTerms | None = None, dispatcher: Dispatcher | None = None,
           on_accept: OnAccept | None = None) -> tuple[str, bool]:
    """Validate, store and dispatch items already in memory; returns (batch or job id, whether it was
    created now). With an Idempotency-Key, a repeat of the same request returns the first one's
    resource. `dispatcher` replaces sending at once (the API's coalescer for single interactive jobs);
    `on_accept(session, resource id)` stores what belongs with the request (its webhook callback)."""
    submission = Submission(settings, tenant, as_batch=as_batch, metadata=metadata, idempotency_key=idempotency_key,
                            terms=terms, on_accept=on_accept)
    for start in range(0, len(items), CHUNK):
        submission.add(items[start:start + CHUNK])
    return submission.finish(body_hash(body if body is not None else items), dispatcher)
