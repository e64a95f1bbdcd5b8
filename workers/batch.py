"""Run one micro-batch: claim -> load inputs -> run the engine (`MicroBatch.start`), then encode and
upload the outputs (`Staged.upload`) -> finish (`Staged.finish`), which the worker's store pipeline
overlaps with the next forward pass.

No Celery here: the task in `workers.tasks` is a thin shim, and tests run `MicroBatch` directly.
Every step is idempotent. The claim is one conditional UPDATE, so a job already running under a
live lease is skipped (a redelivered message never runs a job twice in parallel); outputs go to
deterministic keys, so a re-run overwrites; the finish UPDATE is fenced on the attempt number, so a
worker whose lease was taken over cannot overwrite the newer attempt's result.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from functools import cache, partial
from typing import Any

from PIL import Image
from sqlalchemy import JSON, String, Table, Update, and_, bindparam, func, or_, select, text, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from core import events, thumbs
from core.db import session_scope
from core.errors import InvalidInput, NotFound, Step1XError
from core.formats import CONTENT_TYPES, encode, flatten
from core.jobs import complete_batches
from core.masks import as_mask
from core.progress import lock_order
from core.settings import Settings
from core.specs import parse_item
from core.status import RETRYABLE, ErrorCode, JobStatus, failure, sources_of
from core.storage import Storage, input_key, output_key
from core.tables import Batch, Job, utcnow
from core.usage import Usage
from models.engine import Canceled, Engine, ImageRequest, ImageResult
from models.profiles import library_versions
from workers.engine_host import HostedEngine
from workers.forward import Running, submit
from workers.lookahead import Lookahead, input_keys, read_input
from workers.progress import Watch
from workers.registry import Presence
from workers.stopwatch import Stopwatch

log = logging.getLogger(__name__)


@dataclass
class Claimed:
    id: str
    tenant_id: str
    batch_id: str | None
    custom_id: str | None
    model: str
    spec: dict[str, Any]
    attempts: int
    created_at: datetime
    claims: int  # this run's fence: finishing, renewing and handing back touch only this claim
    charged: bool = True  # whether the claim charged an attempt (a take-over after trouble does not)

    @property
    def label(self) -> str:
        return self.custom_id or self.id


@dataclass
class Outcome:
    """What happened to one claimed job; becomes one row of the finishing UPDATE."""

    job: Claimed
    status: JobStatus = JobStatus.SUCCEEDED
    error: str | None = None
    code: ErrorCode | None = None
    output_keys: list[str] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    fingerprint: str | None = None
    usage: Usage = field(default_factory=Usage)

    def fail(self, code: ErrorCode, error: str) -> None:
        self.status, self.code, self.error = JobStatus.FAILED, code, error


_RETURNED = (Job.id, Job.tenant_id, Job.batch_id, Job.custom_id, Job.model, Job.spec, Job.attempts,
             Job.created_at, Job.claims)


def claim(session: Session, job_ids: Sequence[str], worker: str, settings: Settings,
          interrupted: Mapping[str, int] | None = None) -> list[Claimed]:
    """queued -> running for the jobs nobody else holds, while attempts remain. Also takes over
    running jobs whose lease expired (their worker died), and running jobs held under this very
    worker's name: a worker runs one micro-batch at a time, so if the message comes back to it, the
    process that held them is gone (killed mid-batch, then the message was redelivered).

    Each claim charges the job one attempt, except a take-over of a run listed in `interrupted`
    (job id -> its claim number): infrastructure trouble ended that run before it could hand its
    jobs back, and infrastructure trouble is never the item's fault."""
    now = utcnow()
    run = {"status": JobStatus.RUNNING, "claims": Job.claims + 1, "worker": worker, "started_at": now,
           "lease_until": now + timedelta(seconds=settings.lease_seconds), "error": None, "progress": 0.0}
    options = {"synchronize_session": False}
    claimed: list[Claimed] = []
    by_claim: dict[int, list[str]] = {}
    for job_id, number in (interrupted or {}).items():
        if job_id in job_ids:
            by_claim.setdefault(number, []).append(job_id)
    for number, ids in by_claim.items():
        stmt = (update(Job).where(Job.id.in_(ids), Job.claims == number, Job.status == JobStatus.RUNNING)
                .values(**run).returning(*_RETURNED))
        claimed += [replace(Claimed(*row), charged=False) for row in session.execute(stmt, execution_options=options)]
    taken = {c.id for c in claimed}
    rest = [job_id for job_id in job_ids if job_id not in taken]
    held_by_dead = or_(Job.lease_until < now, Job.worker == worker)
    claimable = or_(Job.status.in_(sources_of(JobStatus.RUNNING)),
                    and_(Job.status == JobStatus.RUNNING, held_by_dead))
    stmt = (
        update(Job)
        .where(Job.id.in_(rest), claimable, Job.attempts < settings.max_attempts)
        .values(**run, attempts=Job.attempts + 1)
        .returning(*_RETURNED)
    )
    if rest:
        claimed += [Claimed(*row) for row in session.execute(stmt, execution_options=options)]
    batch_ids = {c.batch_id for c in claimed if c.batch_id}
    if batch_ids:
        session.execute(update(Batch).where(Batch.id.in_(batch_ids), Batch.started_at.is_(None))
                        .values(started_at=now))
    order = {job_id: i for i, job_id in enumerate(job_ids)}
    return sorted(claimed, key=lambda c: order[c.id])


def requests_for(job: Claimed, images: Callable[[str], Image.Image]) -> list[ImageRequest]:
    """The engine requests of one job: one per output image."""
    spec = parse_item({**job.spec, "custom_id": job.custom_id}, job.label)
    data = spec.model_dump(exclude={"custom_id", "model", "kind", "cache", "num_images", "seed", "output_format",
                                    "quality", "background"})
    data["prompt"] = data.get("prompt") or ""  # fill and structure modes may omit it
    for name in ("image", "mask", "edges"):
        if data.get(name) is not None:
            data[name] = as_mask(images(data[name])) if name == "mask" else flatten(images(data[name]), spec.background)
    count = job.spec.get("num_images", 1)
    seed = job.spec["seed"]
    return [ImageRequest(kind=spec.kind, seed=seed + i, label=job.label, **data) for i in range(count)]


def fingerprint(job: Claimed, engine: Engine) -> str:
    """Identical jobs (same spec, content-addressed inputs, seed and model weights) share one. The
    seed is left out for engines that do not use it, so identical upscales and fills match."""
    ignored = {"cache"} if engine.profile.seeded else {"cache", "seed"}
    spec = {k: v for k, v in job.spec.items() if k not in ignored}
    blob = json.dumps([spec, engine.name, engine.model_hash], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def device_kind(engine: Engine) -> str:
    """"cuda" or "cpu": what the engine's compute ran on (engines without torch run on the CPU)."""
    return str(getattr(getattr(engine, "device", None), "type", "cpu"))


class Interrupted(Exception):
    """Storage, database or broker trouble stopped a micro-batch: not its items' fault. `held` lists
    the runs that could not even be handed back (job id -> claim number), for the retry to take
    over without charging an attempt."""

    def __init__(self, cause: BaseException, held: dict[str, int]) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.held = held


@dataclass
class _Pending:
    """One engine group's forward pass, done or under way in the engine process: its outputs
    become a `_Store` once its results are in (`MicroBatch._complete`)."""

    engine: Engine
    jobs: list[tuple[Outcome, list[ImageRequest]]]
    watch: Watch
    result: Running
    load_seconds: float  # the group's, before the forward pass


@dataclass
class _Store:
    """One engine group's outputs waiting to be encoded and uploaded."""

    uploads: list[tuple[str, Image.Image, str, int | None]]
    thumbnails: list[tuple[Claimed, list[tuple[str, Image.Image]]]]
    outcomes: list[Outcome]
    watch: Watch


class Staged:
    """A micro-batch whose forward pass is done: its outputs still to encode and upload, then its
    jobs to finish. Finishing comes only after every upload, so a crash before it loses nothing:
    the jobs are still running under a lease (renewed until then) and are recovered like any other
    run whose worker died. Stored at most once."""

    def __init__(self, batch: MicroBatch, claimed: Sequence[Claimed], outcomes: list[Outcome],
                 pending: list[_Pending], heartbeat: Heartbeat, held: dict[str, Any] | None = None) -> None:
        self.batch, self.claimed, self.outcomes = batch, claimed, outcomes
        self._pending, self._heartbeat, self._held = pending, heartbeat, held
        self._stores: list[_Store] = []
        self._uploaded = False

    def when_ready(self, callback: Callable[[], None]) -> None:
        """Call `callback` once, when every forward pass is over (at once if they are)."""
        left = [len(self._pending)]
        lock = threading.Lock()

        def one_over() -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                callback()

        if not self._pending:
            callback()
        for group in self._pending:
            group.result.add_done_callback(one_over)

    def complete(self) -> None:
        """Wait for the forward passes (in the engine process) and prepare their outputs."""
        pending, self._pending = self._pending, []
        try:
            for group in pending:
                self._stores += self.batch._complete(group)
        finally:
            self.batch._let_go(self._held)  # the workers table shows the micro-batch in hand until here

    @property
    def job_ids(self) -> list[str]:
        return [job.id for job in self.claimed]

    @property
    def images(self) -> int:
        """Outputs to upload; before `complete`, the images asked of the engine."""
        if self._pending:
            return sum(len(requests) for group in self._pending for _, requests in group.jobs)
        return sum(len(store.uploads) for store in self._stores)

    def store(self) -> list[Outcome]:
        """Encode, upload, finish. Raises Interrupted on infrastructure trouble, after handing the
        jobs back like a failed `start`."""
        self.upload()
        return self.finish()

    def upload(self) -> None:
        """Encode and upload every output (the store pipeline's first stage). Raises Interrupted
        on infrastructure trouble, after handing the jobs back."""
        try:
            self.complete()
            for store in self._stores:
                self.batch._store(store)
            self._uploaded = True
        except Exception as exc:
            self._heartbeat.stop()  # before the hand-back: never two writers on these rows at once
            raise self.batch._interrupted(self.claimed, exc) from exc
        except BaseException:
            self._heartbeat.stop()  # the thread dies with its process: the leases must run out
            raise
        finally:
            self._stores = []  # the decoded images go now, not when the caller drops this object

    def finish(self) -> list[Outcome]:
        """Finish the jobs, once `upload` is done (the store pipeline's second stage). Raises
        Interrupted on infrastructure trouble, after handing the jobs back."""
        batch = self.batch
        # Stopped before finishing: never two writers on these rows at once (PostgreSQL's one
        # finishing statement locks them in its plan's order, a beat in sorted order).
        self._heartbeat.stop()
        if not self._uploaded:  # a caller's mistake: the leases lapse and the reconciler re-runs the jobs
            raise RuntimeError("finishing jobs whose outputs were not uploaded")
        try:
            uploaded = finish(batch.settings, self.outcomes)
            batch._drop_canceled(uploaded)
        except Exception as exc:
            raise batch._interrupted(self.claimed, exc) from exc
        if batch.presence is not None:
            batch.presence.images_done += sum(len(o.output_keys) for o in self.outcomes
                                              if o.status == JobStatus.SUCCEEDED)
        return self.outcomes

    def abandon(self) -> None:
        """Leave the jobs as a dead process would: running, their leases left to lapse, so the
        reconciler sends them again."""
        self._heartbeat.stop()
        self.batch._let_go(self._held)
        self._pending, self._stores = [], []


@cache
def _threads(purpose: str, threads: int) -> ThreadPoolExecutor:
    """The process's threads for one purpose ("upload", "inputs"), started once (made after the
    pool process forked): a pool per micro-batch started its threads every time, one in twenty
    samples of a store. Inputs have their own, so reading the next micro-batch's inputs never
    queues behind the previous one's uploads."""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix=purpose)


class MicroBatch:
    """One micro-batch's run through the stages, with the worker's warm engines and storage."""

    def __init__(self, settings: Settings, storage: Storage, engines: Callable[[str], Engine], worker: str,
                 presence: Presence | None = None, lookahead: Lookahead | None = None):
        self.settings = settings
        self.storage = storage
        self.engines = engines
        self.worker = worker
        self.presence = presence
        self.lookahead = lookahead
        self._inputs: dict[str, Image.Image] = {}

    def _input(self, key: str) -> Image.Image:
        if key not in self._inputs:
            self._inputs[key] = read_input(self.storage, key)
        return self._inputs[key]

    def _image(self, tenant: str) -> Callable[[str], Image.Image]:
        return lambda file_id: self._input(input_key(tenant, file_id))

    def _read_inputs(self, jobs: Sequence[Claimed]) -> None:
        """Read every input of the micro-batch at once (S3 GETs wait on the network, Pillow decodes
        with the GIL released) instead of one after another as each job asks for its own. A read
        that fails is left for the job itself to repeat and report: a missing object fails that
        job alone, storage trouble interrupts the micro-batch."""
        wanted = {key for job in jobs for key in input_keys(job.tenant_id, job.spec)}
        if self.lookahead is not None:  # read ahead: adopted now, before the next peek can drop them
            for key in list(wanted):
                image = self.lookahead.adopt(key)
                if image is not None:
                    self._inputs[key] = image
                    wanted.discard(key)
        if len(wanted) < 2:
            return

        def read(key: str) -> None:
            with contextlib.suppress(Exception):
                self._input(key)

        list(_threads("inputs", self.settings.upload_concurrency).map(read, wanted))

    def run(self, job_ids: Sequence[str], interrupted: Mapping[str, int] | None = None) -> list[Outcome]:
        """Claim, run and store, all in this thread (`start`, then `Staged.store`)."""
        staged = self.start(job_ids, interrupted)
        return staged.store() if staged is not None else []

    def start(self, job_ids: Sequence[str], interrupted: Mapping[str, int] | None = None) -> Staged | None:
        """Claim and run the engine. What is left (encode, upload, finish) is returned as a `Staged`
        that holds the leases until it is stored, here or in the worker's pipeline while the engine
        runs the next micro-batch. None when nothing was claimed. Raises Interrupted on
        infrastructure trouble, after handing the claimed jobs back uncharged where the database allows."""
        now, started = utcnow(), time.perf_counter()  # the queue wait ends where the claim starts
        with session_scope(self.settings.database_url) as session:
            claimed = claim(session, job_ids, self.worker, self.settings, interrupted)
        if not claimed:
            return None
        share = round((time.perf_counter() - started) / len(claimed), 4)
        outcomes = [Outcome(job, timings={"queued": round((now - job.created_at).total_seconds(), 4), "claim": share})
                    for job in claimed]
        heartbeat = Heartbeat(self.settings, claimed).start()
        held = self.presence.hold([job.id for job in claimed], claimed[0].model) if self.presence else None
        try:
            staged = Staged(self, claimed, outcomes, self._run_all(outcomes), heartbeat, held)
            if not any(isinstance(group.engine, HostedEngine) for group in staged._pending):
                staged.complete()  # run in this thread: nothing to wait for
        except Exception as exc:
            heartbeat.stop()
            self._let_go(held)
            raise self._interrupted(claimed, exc) from exc
        return staged

    def _interrupted(self, claimed: Sequence[Claimed], exc: Exception) -> Interrupted:
        held: dict[str, int] = {}
        try:
            release(self.settings, claimed, f"{type(exc).__name__}: {exc}")
        except Exception as again:  # the database is down too: the retry takes these runs over
            log.warning("could not hand back %d jobs (%s); the retry takes them over", len(claimed), again)
            held = {job.id: job.claims for job in claimed}
        return Interrupted(exc, held)

    def _let_go(self, held: dict[str, Any] | None) -> None:
        if self.presence is not None and held is not None:
            self.presence.let_go(held)

    def _run_all(self, outcomes: list[Outcome]) -> list[_Pending]:
        pending: list[_Pending] = []
        by_model: dict[str, list[Outcome]] = {}
        for outcome in outcomes:
            by_model.setdefault(outcome.job.model, []).append(outcome)
        for model, group in by_model.items():
            loading = time.perf_counter()  # load: the model made warm, then the inputs fetched
            try:
                engine = self.engines(model)
            except Step1XError as exc:  # missing weights, bad profile: retrying cannot help
                for outcome in group:
                    outcome.fail(ErrorCode.MODEL_UNAVAILABLE, f"model {model!r}: {exc}")
                continue
            pending += self._run_group(engine, group, loading)
        return pending

    def _run_group(self, engine: Engine, group: list[Outcome], loading: float) -> list[_Pending]:
        """Start the group's forward pass, after reusing identical earlier outputs and reading
        the inputs; jobs whose inputs cannot be read fail here."""
        pending: list[tuple[Outcome, list[ImageRequest]]] = []
        for outcome in group:
            outcome.fingerprint = fingerprint(outcome.job, engine)
        earlier = self._earlier_outputs([o for o in group if o.job.spec.get("cache", True)])
        to_run: list[Outcome] = []
        for outcome in group:
            job = outcome.job
            reusable = job.spec.get("cache", True)
            source = earlier.get((job.tenant_id, outcome.fingerprint)) if reusable else None
            if source is None or not self._reuse(outcome, *source):
                to_run.append(outcome)
        self._read_inputs([outcome.job for outcome in to_run])
        if self.lookahead is not None:  # this micro-batch's inputs are in: read the next one's meanwhile
            self.lookahead.ahead(outcome.job.id for outcome in group)
        for outcome in to_run:
            job = outcome.job
            try:
                requests = requests_for(job, self._image(job.tenant_id))
            except Step1XError as exc:
                outcome.fail(ErrorCode.INVALID_INPUT, str(exc))
                continue
            except OSError as exc:  # undecodable input bytes
                outcome.fail(ErrorCode.INVALID_INPUT, f"image: cannot decode input ({exc})")
                continue
            pending.append((outcome, requests))
        if not pending:
            return []
        watch = Watch(self.settings, [outcome.job for outcome, _ in pending])
        interactive = any(outcome.job.batch_id is None for outcome, _ in pending)
        load_seconds = time.perf_counter() - loading
        result = submit(engine, [requests for _, requests in pending], watch, interactive,
                        self.settings.progress_interval)
        return [_Pending(engine, pending, watch, result, load_seconds)]

    def _complete(self, group: _Pending) -> list[_Store]:
        """The group's forward pass is over (waits for it): its outcomes, and its outputs to store."""
        try:
            done = group.result.result()
        except Canceled:
            for outcome, _ in group.jobs:
                outcome.status = JobStatus.CANCELED
            return []
        ran: list[tuple[Outcome, list[ImageRequest], list[ImageResult | Exception]]] = []
        for (outcome, requests), result in zip(group.jobs, done.results, strict=True):
            if not isinstance(result, list):  # refused by the engine's checks, before any compute
                outcome.fail(ErrorCode.INVALID_INPUT, str(result))
            else:
                ran.append((outcome, requests, result))
        images_run = sum(len(requests) for _, requests, _ in ran)
        if not images_run:
            return []
        engine = group.engine
        run_seconds = done.seconds / images_run
        load_seconds = group.load_seconds / images_run
        # Canceled while it ran, as the run's last look saw it: nothing of theirs is prepared. The
        # store asks afresh before uploading, so no extra query here.
        canceled = group.watch.canceled
        uploads: list[tuple[str, Image.Image, str, int | None]] = []
        thumbnails: list[tuple[Claimed, list[tuple[str, Image.Image]]]] = []
        for outcome, reqs, mine in ran:
            if outcome.job.id in canceled:
                outcome.status = JobStatus.CANCELED
                continue
            failure = next((r for r in mine if isinstance(r, Exception)), None)
            if failure is not None:
                code = ErrorCode.INVALID_INPUT if isinstance(failure, InvalidInput) else ErrorCode.ENGINE_ERROR
                outcome.fail(code, f"{type(failure).__name__}: {failure}")
                continue
            job = outcome.job
            fmt = job.spec.get("output_format", "png")
            keys = [output_key(job.tenant_id, job.batch_id, job.id, i, fmt) for i in range(len(mine))]
            images = [r for r in mine if isinstance(r, ImageResult)]  # all of them: no failure above
            uploads.extend((key, r.image, fmt, job.spec.get("quality")) for key, r in zip(keys, images, strict=True))
            thumbnails.append((job, [(key, r.image) for key, r in zip(keys, images, strict=True)]))
            outcome.output_keys = keys
            outcome.result = {"seeds": [r.seed for r in images], "model": engine.name,
                              "model_hash": engine.model_hash, "versions": library_versions(), "cached": False,
                              "thumbnails": any(thumbs.needed(r.image) for r in images)}
            outcome.timings["run"] = round(run_seconds * len(reqs), 4)
            outcome.timings["load"] = round(load_seconds * len(reqs), 4)
            steps = sum(r.steps for r in reqs) if engine.profile.seeded else 0
            outcome.usage = Usage.of((r.image.size for r in images), steps, run_seconds * len(reqs),
                                     device_kind(engine))
        return [_Store(uploads, thumbnails, [outcome for outcome, _, _ in ran], group.watch)]

    def _store(self, store: _Store) -> None:
        """Encode and upload one group's outputs and thumbnails; jobs canceled since their forward
        pass upload nothing."""
        canceled = store.watch.canceled_now()
        for outcome in store.outcomes:
            if outcome.job.id in canceled and outcome.status == JobStatus.SUCCEEDED:
                outcome.status, outcome.output_keys = JobStatus.CANCELED, []
        live = {key for outcome in store.outcomes for key in outcome.output_keys}
        uploads = [up for up in store.uploads if up[0] in live]
        thumbnails = [(job, pairs) for job, pairs in store.thumbnails if job.id not in canceled]
        made: dict[str, Callable[[], bytes]] = {}  # thumbnails: after the outputs, in the same transfers
        for job, pairs in thumbnails:
            made |= thumbs.wanted(job.tenant_id, job.spec, pairs, self._image(job.tenant_id))
        level = self.settings.png_compress_level
        objects: list[tuple[str, Callable[[], bytes], str]] = [
            (key, partial(encode, image, fmt, quality, level), CONTENT_TYPES[fmt])
            for key, image, fmt, quality in uploads]
        objects += [(key, make, "image/webp") for key, make in made.items()]
        clock = Stopwatch()
        # Encodes (zlib and libwebp release the GIL) run side by side in threads; each object is
        # uploaded as soon as it is encoded and a connection is free.
        pool = _threads("upload", self.settings.upload_concurrency)
        encoded = [pool.submit(lambda o: (o[0], clock.time("encode", o[0], o[1]), o[2]), o) for o in objects]
        try:
            self.storage.put_many(encoded, lambda key, seconds: clock.add("upload", key, seconds))
        finally:
            for future in encoded:  # after a failure, no more encodes for nothing
                future.cancel()
        thumbs.written(made)
        for outcome in store.outcomes:
            if outcome.status == JobStatus.SUCCEEDED:
                outcome.timings["encode"] = clock.total("encode", outcome.output_keys)
                outcome.timings["upload"] = clock.total("upload", outcome.output_keys)

    def _drop_canceled(self, uploaded: Sequence[Outcome]) -> None:
        """A job canceled between its upload and the finishing UPDATE kept its canceled status (the
        UPDATE is fenced on running): delete what was uploaded for it, so no object outlives a cancel."""
        if not uploaded:
            return
        with session_scope(self.settings.database_url) as session:
            canceled = set(session.scalars(select(Job.id).where(
                Job.id.in_([o.job.id for o in uploaded]), Job.status == JobStatus.CANCELED)))
        for outcome in uploaded:
            if outcome.job.id in canceled and not outcome.result.get("cached"):
                for key in outcome.output_keys:
                    self.storage.delete(key)

    def _earlier_outputs(self, outcomes: Sequence[Outcome]) -> dict[tuple[str, str | None], tuple[list[str], Any]]:
        """Outputs of earlier succeeded jobs with the same fingerprint, for the whole micro-batch in
        one query: (tenant, fingerprint) -> (output keys, result)."""
        if not outcomes:
            return {}
        found: dict[tuple[str, str | None], tuple[list[str], Any]] = {}
        with session_scope(self.settings.database_url) as session:
            rows = session.execute(select(Job.tenant_id, Job.fingerprint, Job.output_keys, Job.result).where(
                Job.tenant_id.in_({o.job.tenant_id for o in outcomes}),
                Job.fingerprint.in_({o.fingerprint for o in outcomes}), Job.status == JobStatus.SUCCEEDED))
            for tenant, print_, keys, result in rows:
                if keys:
                    found.setdefault((tenant, print_), (keys, result))
        return found

    def _reuse(self, outcome: Outcome, source_keys: list[str], source_result: Any) -> bool:
        """Copy the output of an earlier identical job of the same tenant instead of running again."""
        job = outcome.job
        keys = [output_key(job.tenant_id, job.batch_id, job.id, i, job.spec.get("output_format", "png"))
                for i in range(len(source_keys))]
        try:
            for src, dst in zip(source_keys, keys, strict=True):
                self.storage.copy(src, dst)
        except NotFound:  # the earlier output was deleted from the bucket: draw it again
            return False
        if (source_result or {}).get("thumbnails", True):
            for src, dst in zip(source_keys, keys, strict=True):
                with contextlib.suppress(NotFound):  # pages then show no picture, nothing worse
                    self.storage.copy(thumbs.thumb_key(src), thumbs.thumb_key(dst))
        outcome.output_keys = keys
        outcome.result = {**(source_result or {}), "cached": True}
        return True


# Set by the finishing UPDATE from each outcome (lease_until and outage_since are cleared besides).
_FINISHED = ("status", "error", "error_code", "retryable", "output_keys", "result", "timings", "fingerprint",
             "finished_at", "progress", *Usage().columns())


def _record_type(name: str) -> str:
    """The PostgreSQL type a `_FINISHED` column is read as from the finishing statement's JSON
    document, from the table. Strings as text: assigning text to a varchar(n) column fails when the
    value is too long, where a cast would cut it. JSON values as text too (each one encoded on its
    own, then cast), so None is stored as JSON null, as SQLAlchemy's JSON type does."""
    kind = Job.__table__.c[name].type
    return "text" if isinstance(kind, JSON | String) else kind.compile(dialect=postgresql.dialect())


_JSON_COLUMNS = {name for name in _FINISHED if isinstance(Job.__table__.c[name].type, JSON)}


def finish(settings: Settings, outcomes: Sequence[Outcome], one_statement: bool | None = None) -> list[Outcome]:
    """Record every outcome, fenced on status and claim (`record`). Returns the outcomes that put
    objects in storage."""
    now = utcnow()
    rows = [{
        "id": o.job.id, "claims": o.job.claims, "status": o.status.value, "error": o.error,
        "error_code": o.code.value if o.code else None, "retryable": o.code in RETRYABLE if o.code else None,
        "output_keys": o.output_keys or None, "result": o.result or None, "timings": o.timings,
        "fingerprint": o.fingerprint, "finished_at": now,
        "progress": 1.0 if o.status == JobStatus.SUCCEEDED else 0.0, **o.usage.columns(),
    } for o in sorted(outcomes, key=lambda o: lock_order(o.job)) if o.status != JobStatus.CANCELED]
    with session_scope(settings.database_url) as session:
        record(session.connection(), rows, one_statement)
        complete_batches(session, {o.job.batch_id for o in outcomes if o.job.batch_id})
        events.jobs_ended(session, Job.id.in_([o.job.id for o in outcomes]), Job.finished_at == now)
    return [o for o in outcomes if o.output_keys and o.status == JobStatus.SUCCEEDED]


def record(connection: Connection, rows: list[dict[str, Any]], one_statement: bool | None = None) -> None:
    """The finishing UPDATE of these rows (id, claims and the `_FINISHED` columns). PostgreSQL gets
    one statement for all of them, SQLite an executemany; `one_statement` forces either, for
    `python -m bench.finish` to compare them on the same database."""
    if not rows:
        return
    if one_statement if one_statement is not None else connection.dialect.name == "postgresql":
        document = [{**row, "finished_at": row["finished_at"].isoformat(),
                     **{name: json.dumps(row[name]) for name in _JSON_COLUMNS}} for row in rows]
        connection.execute(_FINISH_ALL, {"rows": json.dumps(document)})
    else:
        connection.execute(_FINISH_EACH, [{f"b_{name}": value for name, value in row.items()} for row in rows])


# PostgreSQL: one UPDATE for the whole micro-batch, so the counter and usage triggers (statement-
# level) run once instead of once per job as an executemany's statements do, with the same text
# whatever the number of jobs (an UPDATE ... FROM VALUES of 200 rows cost more to compile than it
# saved). `python -m bench.finish` measures it against the executemany. The rows go as one JSON
# document, which json.dumps encodes in C: sent as one array per column, which psycopg dumps
# element by element in Python, 256 rows took 3.4x the client CPU (12.7 against 3.8 ms, measured
# once, side by side on the same database).
_FINISH_ALL = text(
    "UPDATE jobs SET lease_until = NULL, outage_since = NULL, "
    + ", ".join(f"{name} = f.{name}" + ("::json" if name in _JSON_COLUMNS else "") for name in _FINISHED)
    + " FROM json_to_recordset(CAST(:rows AS json)) AS f(id text, claims int, "
    + ", ".join(f"{name} {_record_type(name)}" for name in _FINISHED) + ") "
    # A canceled job stays canceled.
    f"WHERE jobs.id = f.id AND jobs.claims = f.claims AND jobs.status = '{JobStatus.RUNNING.value}'"
)


def _finish_each() -> Update:
    """SQLite (row-level triggers either way, and no arrays): one statement per job, executemany."""
    table = Job.__table__
    assert isinstance(table, Table)
    return (update(table)
            .where(table.c.id == bindparam("b_id"), table.c.claims == bindparam("b_claims"),
                   table.c.status == JobStatus.RUNNING)  # a canceled job stays canceled
            .values(lease_until=None, outage_since=None, **{name: bindparam(f"b_{name}") for name in _FINISHED}))


_FINISH_EACH = _finish_each()


def release(settings: Settings, claimed: Sequence[Claimed], error: str) -> None:
    """Hand back the jobs this run still holds after infrastructure trouble, refunding the attempt
    the claim charged: queued again, unless the trouble has lasted past the outage budget, then
    failed with error_code "outage"."""
    now = utcnow()
    over_budget = now - timedelta(seconds=settings.outage_budget)
    with session_scope(settings.database_url) as session:
        for job in sorted(claimed, key=lock_order):
            this_run = (Job.id == job.id, Job.claims == job.claims, Job.status == JobStatus.RUNNING)
            session.execute(
                update(Job).where(*this_run, Job.outage_since < over_budget)
                .values(status=JobStatus.FAILED, lease_until=None, worker=None, finished_at=now,
                        attempts=Job.attempts - int(job.charged), **failure(ErrorCode.OUTAGE),
                        error=f"storage or database unavailable for longer than the outage budget "
                              f"({settings.outage_budget:g} s): {error}"))
            session.execute(
                update(Job).where(*this_run)
                .values(status=JobStatus.QUEUED, lease_until=None, worker=None, error=error,
                        attempts=Job.attempts - int(job.charged), outage_since=func.coalesce(Job.outage_since, now),
                        # The retry is this job's dispatch: the reconciler need not send another.
                        dispatched_at=now))
        complete_batches(session, {job.batch_id for job in claimed if job.batch_id})
        events.jobs_ended(session, Job.id.in_([job.id for job in claimed]), Job.finished_at == now)


class Heartbeat:
    """Extends the micro-batch's leases while it runs, so a long run is not mistaken for a dead
    worker and handed to another one. Renewal is fenced like finishing: only this attempt's rows."""

    def __init__(self, settings: Settings, claimed: Sequence[Claimed]) -> None:
        self.settings = settings
        self.claimed = claimed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)

    def _beat(self) -> None:
        seconds = self.settings.lease_seconds
        while not self._stop.wait(seconds / 3):
            try:
                with session_scope(self.settings.database_url) as session:
                    for job in sorted(self.claimed, key=lock_order):
                        session.execute(
                            update(Job).where(Job.id == job.id, Job.claims == job.claims,
                                              Job.status == JobStatus.RUNNING)
                            .values(lease_until=utcnow() + timedelta(seconds=seconds)))
            except Exception as exc:  # a missed beat only shortens the lease; the next one retries
                log.warning("lease renewal failed: %s", exc)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
