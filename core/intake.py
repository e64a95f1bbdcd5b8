"""Store a submission chunk by chunk, inside one transaction, with the database's bulk path.

A 100,000-item catalog is never held whole: each chunk is validated, stored (PostgreSQL COPY,
SQLite executemany) and cut into micro-batches, then dropped; only the micro-batches' job ids stay
until they are sent. The transaction commits only after the last chunk, so one bad item anywhere
(the last line included) rolls back everything before it: nothing of a rejected request is stored.
After the first bad item the rest is still validated, so the user gets every error in one round
trip, but nothing more is written.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from core import dispatch, fetch
from core.catalog import BatchTerms
from core.db import session_scope
from core.errors import FieldError, InvalidInput, TooManyRequests
from core.files import files_by_id
from core.settings import Settings
from core.specs import AnySpec, GenerateSpec, InpaintSpec, UpscaleSpec, check_mask, input_files, parse_items
from core.status import JobStatus
from core.tables import Batch, Calibration, Job, new_id, new_ids, utcnow

# Errors kept for the answer: enough to fix a manifest, bounded however bad the upload is.
MAX_ERRORS = 1000
COPY_COLUMNS = ("id", "tenant_id", "batch_id", "custom_id", "kind", "model", "seed", "spec", "lane", "group_key",
                "cost", "status", "attempts", "created_at")


@dataclass
class Accepted:
    batch: Batch | None
    first_id: str  # the job's id for a single job
    # (queue, job ids) per micro-batch, in the order they should leave
    messages: list[tuple[str, list[str]]] = field(default_factory=list)
    planned: list[dispatch.Planned] = field(default_factory=list)  # single jobs only: the coalescer's input

    @property
    def resource(self) -> str:
        return self.batch.id if self.batch else self.first_id


def queued_jobs(session: Session, tenant: str) -> int:
    """The tenant's queued jobs, from the batch counters plus its single jobs (few by nature)."""
    in_batches = session.scalar(select(func.coalesce(func.sum(Batch.queued_count), 0))
                                .where(Batch.tenant_id == tenant, Batch.finished_at.is_(None)))
    singles = session.scalar(select(func.count()).where(Job.tenant_id == tenant, Job.batch_id.is_(None),
                                                        Job.status == JobStatus.QUEUED))
    return int(in_batches or 0) + int(singles or 0)


def calibrated_budgets(session: Session) -> dict[str, int]:
    """Pixel budgets measured by workers (`--calibrate`); the smallest device's wins, so a
    micro-batch fits whichever worker takes it."""
    rows = session.execute(select(Calibration.profile, func.min(Calibration.pixel_budget))
                           .group_by(Calibration.profile))
    return {profile: int(budget) for profile, budget in rows}


def store(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Insert job rows (their spec as JSON text) with the database's fast path, and the fetches of
    their URL inputs. The batch's counters follow from the rows (the jobs table's triggers)."""
    if not rows:
        return
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        raw: Any = conn.connection.driver_connection  # psycopg, inside this session's transaction
        with raw.cursor() as cursor, cursor.copy(f"COPY jobs ({', '.join(COPY_COLUMNS)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row([row[c] for c in COPY_COLUMNS])
    else:
        conn.execute(insert(Job), [_spec_parsed(row) for row in rows])
    fetch.record(session, [_spec_parsed(row) for row in rows if row["group_key"] == fetch.WAITING])


def _spec_parsed(row: dict[str, Any]) -> dict[str, Any]:
    """A job row whose spec is a dict again, for the ORM's JSON column and the fetch stage."""
    return {**row, "spec": json.loads(row["spec"])}


def check_files(session: Session, tenant: str, specs: Sequence[AnySpec], settings: Settings
                ) -> tuple[dict[str, Any], list[FieldError]]:
    """Every referenced file exists for this tenant and sizes agree; returns the file rows by id and
    the problems found."""
    # Text-to-image items refer to no file: skipping them keeps a catalog of them cheap.
    with_files = [(index, spec) for index, spec in enumerate(specs) if not isinstance(spec, GenerateSpec)]
    wanted = {fid for _, spec in with_files for fid in input_files(spec).values() if not fetch.is_url(fid)}
    files = files_by_id(session, tenant, wanted) if wanted else {}
    errors: list[FieldError] = []
    for index, spec in with_files:
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


class Intake:
    """One submission in progress. `add` each chunk of raw items, then `close`; the caller owns the
    session's transaction and commits only after `close` returned."""

    def __init__(self, session: Session, settings: Settings, tenant: str, *, as_batch: bool,
                 metadata: dict[str, Any] | None = None, terms: BatchTerms | None = None) -> None:
        self.session, self.settings, self.tenant, self.as_batch = session, settings, tenant, as_batch
        self.lane = "bulk" if as_batch else "interactive"
        self.now = utcnow()
        self.count = 0
        self.errors: list[FieldError] = []
        self.error_count = 0
        self.seen: set[str] = set()
        self.cap = settings.max_queued_per_tenant
        self.queued_before = queued_jobs(session, tenant) if self.cap else 0
        if self.cap and self.queued_before >= self.cap:
            self._refuse()
        self.cutter = dispatch.Cutter(settings, calibrated_budgets(session))
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="intake-writer")
        self._writing: Future[None] | None = None
        self.accepted = Accepted(None, "")
        if as_batch:
            terms = terms or BatchTerms.parse(settings)
            self.accepted.batch = Batch(id=new_id("bat"), tenant_id=tenant, metadata_=metadata or {}, total=0,
                                        created_at=self.now, **terms.columns(self.now))
            session.add(self.accepted.batch)
            session.flush()

    def _refuse(self) -> None:
        raise TooManyRequests(
            f"tenant {self.tenant!r} has {self.queued_before} jobs queued and this request would pass the cap of "
            f"{self.cap}: nothing of it was stored; retry after the backlog drains",
            self.settings.backpressure_retry_after)

    def reject(self, errors: Sequence[FieldError]) -> None:
        """Record errors found before the items reached here (a manifest's bad lines)."""
        self._error(errors)

    def _error(self, errors: Sequence[FieldError]) -> None:
        self.error_count += len(errors)
        self.errors.extend(errors[:MAX_ERRORS - len(self.errors)])

    def add(self, raw_items: Sequence[Any]) -> None:
        self.count += len(raw_items)
        if self.cap and self.queued_before + self.count > self.cap:
            self._refuse()
        specs, errors = parse_items(raw_items, self.settings, require_custom_id=self.as_batch)
        self._error(errors)
        flagged = {e.item for e in errors if e.field == "custom_id"}  # duplicates within the chunk
        for spec in specs:
            if spec.custom_id is None:
                continue
            if spec.custom_id in self.seen and spec.custom_id not in flagged:
                self._error([FieldError("custom_id", "appears more than once in this batch", spec.custom_id)])
            self.seen.add(spec.custom_id)
        # Files were committed by earlier requests: read them on a connection of their own, since the
        # writer thread may be using this transaction's connection right now.
        with session_scope(self.settings.database_url) as files_session:
            files, file_errors = check_files(files_session, self.tenant, specs, self.settings)
        self._error(file_errors)
        if self.error_count:
            return  # keep validating for the report, store nothing more: it will all roll back
        rows = [self._row(spec, files, job_id) for spec, job_id in zip(specs, new_ids("job", len(specs)), strict=True)]
        self._write(rows)
        for row in rows:
            if row["group_key"] == fetch.WAITING:
                continue  # dispatched once its inputs are downloaded (core.fetch)
            planned = dispatch.Planned(row["id"], row["group_key"], row["cost"], row["lane"])
            if not self.as_batch:
                self.accepted.planned.append(planned)
            if (full := self.cutter.add(planned)) is not None:
                self._ready(full)
        if not self.accepted.first_id and rows:
            self.accepted.first_id = rows[0]["id"]

    def _row(self, spec: AnySpec, files: dict[str, Any], job_id: str) -> dict[str, Any]:
        image = files.get(spec.image) if isinstance(spec, InpaintSpec | UpscaleSpec) else None
        key, cost = (fetch.WAITING, 0) if fetch.has_urls(spec) else \
            dispatch.plan(spec, self.settings, (image.width, image.height) if image else None)
        batch = self.accepted.batch
        return {
            "id": job_id, "tenant_id": self.tenant, "batch_id": batch.id if batch else None,
            "custom_id": spec.custom_id, "kind": spec.kind, "model": spec.model, "seed": spec.seed,
            # JSON text, serialized by pydantic in one step: the column takes it as it is
            "spec": spec.model_dump_json(exclude={"custom_id"}), "lane": self.lane, "group_key": key,
            "cost": cost, "status": JobStatus.QUEUED.value, "attempts": 0, "created_at": self.now,
        }

    def _ready(self, jobs: list[dispatch.Planned]) -> None:
        queue = dispatch.queue_for(jobs[0].lane, dispatch.model_of(jobs[0].group_key))
        self.accepted.messages.append((queue, [job.id for job in jobs]))

    def _write(self, rows: list[dict[str, Any]]) -> None:
        """Store a chunk in the writer thread, so the database takes it in while the next chunk is
        validated here. One chunk in flight at most: memory stays bounded when the database is slower."""
        self._drain()
        self._writing = self._writer.submit(store, self.session, rows)

    def _drain(self) -> None:
        if self._writing is not None:
            writing, self._writing = self._writing, None
            writing.result()  # re-raises the writer's error here

    def discard(self) -> None:
        """Wait for the writer and stop it (the caller then rolls the transaction back)."""
        with contextlib.suppress(Exception):  # the transaction is being rolled back anyway
            self._drain()
        self._writer.shutdown()

    def close(self) -> Accepted:
        """Raise InvalidInput if anything was wrong; else finish the batch row and return what to send."""
        self._drain()
        self._writer.shutdown()
        if self.count > self.settings.max_batch_items:
            self._error([FieldError("items", f"{self.count} items: at most {self.settings.max_batch_items} "
                                             "per batch")])
        if self.error_count:
            if self.error_count > len(self.errors):
                self.errors.append(FieldError("items", f"{self.error_count - len(self.errors)} more errors "
                                                       "not listed: fix these and submit again"))
            raise InvalidInput(self.errors)
        if self.count == 0:
            raise InvalidInput("a batch needs at least one item", "items")
        for jobs in self.cutter.flush():
            self._ready(jobs)
        batch = self.accepted.batch
        if batch is not None:
            self.session.execute(update(Batch).where(Batch.id == batch.id).values(total=self.count),
                                 execution_options={"synchronize_session": False})
            batch.total = self.count
        return self.accepted
