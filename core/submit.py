"""Accept work: validate every item against stored state, store jobs in bulk, dispatch them.

A request with any bad item is rejected whole, listing every bad item and field, and nothing of it
is stored. Accepted jobs are committed before their messages are sent, so a worker never sees an
id the database does not have; if the broker is down, the jobs stay queued and the reconciler
dispatches them later.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core import dispatch, fetch
from core.catalog import BatchTerms
from core.db import session_scope
from core.errors import Conflict, FieldError, InvalidInput
from core.files import files_by_id
from core.settings import Settings
from core.specs import AnySpec, InpaintSpec, UpscaleSpec, check_mask, input_files, parse_items
from core.tables import Batch, IdempotencyKey, Job, new_id, utcnow

log = logging.getLogger(__name__)


@dataclass
class Accepted:
    batch: Batch | None
    jobs: list[dict[str, Any]]  # the inserted rows, as dicts (a catalog is not loaded as ORM objects)

    @property
    def planned(self) -> list[dispatch.Planned]:
        return [dispatch.Planned(j["id"], j["group_key"], j["cost"], j["lane"]) for j in self.jobs
                if j["group_key"] != fetch.WAITING]


def check_files(session: Session, tenant: str, specs: Sequence[AnySpec], settings: Settings
                ) -> tuple[dict[str, Any], list[FieldError]]:
    """Every referenced file exists for this tenant and sizes agree; returns the file rows by id and
    the problems found."""
    wanted = {fid for spec in specs for fid in input_files(spec).values() if not fetch.is_url(fid)}
    files = files_by_id(session, tenant, wanted)
    errors: list[FieldError] = []
    for index, spec in enumerate(specs):
        name = spec.custom_id or f"#{index}"
        refs = input_files(spec)
        # URL inputs are checked here, and their sizes after the fetch stage has them (core.fetch).
        errors.extend(fetch.url_errors(spec, settings, name))
        missing = [field for field, fid in refs.items() if fid not in files and not fetch.is_url(fid)]
        errors.extend(FieldError(f, f"file {refs[f]} does not exist (upload it with POST /v1/files)", name)
                      for f in missing)
        if missing or fetch.has_urls(spec) or not isinstance(spec, InpaintSpec | UpscaleSpec):
            continue
        image = files[spec.image]
        assert spec.model is not None
        limit = settings.models[spec.model].max_size
        if max(image.width, image.height) > limit:
            errors.append(FieldError("image", f"{image.width}x{image.height} exceeds {limit} px per side "
                                              f"for model {spec.model!r}", name))
        if isinstance(spec, InpaintSpec):
            errors.extend(check_mask(spec, files[spec.mask], name))
            for field in ("mask", "edges"):
                other = files.get(refs.get(field, ""))
                if other is not None and (other.width, other.height) != (image.width, image.height):
                    errors.append(FieldError(field, f"{field} is {other.width}x{other.height} but image is "
                                                    f"{image.width}x{image.height}: they must match", name))
    return files, errors


def accept(session: Session, settings: Settings, tenant: str, raw_items: Sequence[Any], *,
           as_batch: bool, metadata: dict[str, Any] | None = None, terms: BatchTerms | None = None
           ) -> Accepted:
    """Validate and store; the caller commits, then calls `send`."""
    if not raw_items:
        raise InvalidInput("a batch needs at least one item", "items")
    specs, errors = parse_items(raw_items, settings, require_custom_id=as_batch)
    files, file_errors = check_files(session, tenant, specs, settings)
    if errors or file_errors:
        raise InvalidInput(errors + file_errors)
    batch = None
    now = utcnow()
    if as_batch:
        terms = terms or BatchTerms.parse(settings)
        batch = Batch(id=new_id("bat"), tenant_id=tenant, metadata_=metadata or {},
                      total=len(specs), created_at=now, **terms.columns(now))
        session.add(batch)
        session.flush()
    lane = "bulk" if as_batch else "interactive"
    rows = []
    for spec in specs:
        image = files.get(getattr(spec, "image", None) or "")
        key, cost = (fetch.WAITING, 0) if fetch.has_urls(spec) else \
            dispatch.plan(spec, settings, (image.width, image.height) if image else None)
        assert spec.seed is not None and spec.model is not None
        rows.append({
            "id": new_id("job"), "tenant_id": tenant, "batch_id": batch.id if batch else None,
            "custom_id": spec.custom_id, "kind": spec.kind, "model": spec.model, "seed": spec.seed,
            "spec": spec.model_dump(mode="json", exclude={"custom_id"}), "lane": lane, "group_key": key,
            "cost": cost, "status": "queued", "attempts": 0, "created_at": now,
        })
    for start in range(0, len(rows), 5000):
        session.execute(insert(Job), rows[start:start + 5000])
    fetch.record(session, rows)
    return Accepted(batch, rows)


def send(session: Session, settings: Settings, planned: Sequence[dispatch.Planned]) -> int:
    """Dispatch micro-batches and stamp the jobs. A broker failure leaves them for the reconciler."""
    batches = dispatch.cut(planned, settings)
    sent = dispatch.send(batches, settings)
    ids = [job.id for job in planned]
    for start in range(0, len(ids), 5000):
        session.execute(update(Job).where(Job.id.in_(ids[start:start + 5000]), Job.status == "queued")
                        .values(dispatched_at=utcnow()))
    return sent


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
        raise Conflict(f"Idempotency-Key {key!r} was used with a different request body: use a new key")
    return row.resource_id


def remember(session: Session, tenant: str, key: str | None, digest: str, resource_id: str) -> None:
    if key is not None:
        session.add(IdempotencyKey(tenant_id=tenant, key=key, request_hash=digest, resource_id=resource_id))


def dispatch_undispatched(settings: Settings, tenant: str, resource: str) -> int:
    """A replay of a request whose first try was stored but not (fully) sent, say because the API
    died at the commit: send what was never sent, now, instead of waiting for the reconciler.
    A job sent twice costs nothing (the second claim skips it)."""
    owned = or_(Job.batch_id == resource, Job.id == resource)
    try:
        with session_scope(settings.database_url) as session:
            rows = session.execute(select(Job.id, Job.group_key, Job.cost, Job.lane).where(
                owned, Job.tenant_id == tenant, Job.status == "queued", Job.dispatched_at.is_(None))).all()
            if rows:
                send(session, settings, [dispatch.Planned(*row) for row in rows])
                log.warning("replay of %s dispatched %d jobs its first request left unsent", resource, len(rows))
    except Exception as exc:  # the jobs are safe in the database; the reconciler dispatches them
        log.warning("dispatch of %s on replay failed, the reconciler will retry: %s", resource, exc)
        return 0
    return len(rows)


def send_committed(settings: Settings, planned: Sequence[dispatch.Planned]) -> None:
    with session_scope(settings.database_url) as session:
        send(session, settings, planned)


def submit(settings: Settings, tenant: str, items: Sequence[Any], *, as_batch: bool,
           metadata: dict[str, Any] | None = None, idempotency_key: str | None = None,
           body: Any = None, terms: BatchTerms | None = None,
           dispatcher: Callable[[Sequence[dispatch.Planned]], object] | None = None,
           on_accept: Callable[[Session, str], None] | None = None) -> tuple[str, bool]:
    """Validate, store and dispatch; returns (batch or job id, whether it was created now).

    With an Idempotency-Key, a repeat of the same request returns the first one's resource.
    `dispatcher` replaces sending at once (the API's coalescer for single interactive jobs);
    `on_accept(session, resource id)` stores what belongs with the request (its webhook callback)."""
    digest = body_hash(body if body is not None else items)
    try:
        with session_scope(settings.database_url) as session:
            earlier = replayed(session, tenant, idempotency_key, digest)
        if earlier is not None:
            dispatch_undispatched(settings, tenant, earlier)
            return earlier, False
        with session_scope(settings.database_url) as session:
            accepted = accept(session, settings, tenant, items, as_batch=as_batch, metadata=metadata, terms=terms)
            resource = accepted.batch.id if accepted.batch else accepted.jobs[0]["id"]
            if on_accept is not None:
                on_accept(session, resource)
            remember(session, tenant, idempotency_key, digest, resource)
    except IntegrityError:
        # A concurrent request with the same key committed first: answer with its resource.
        with session_scope(settings.database_url) as session:
            earlier = replayed(session, tenant, idempotency_key, digest)
        if earlier is None:
            raise
        return earlier, False
    try:
        if dispatcher is not None:
            dispatcher(accepted.planned)
        else:
            send_committed(settings, accepted.planned)
    except Exception as exc:  # the jobs are safe in the database; the reconciler dispatches them
        log.warning("dispatch of %s failed, the reconciler will retry: %s", resource, exc)
    return resource, True
