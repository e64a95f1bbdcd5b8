"""Job inputs given as URLs: accepted at once, downloaded before dispatch.

At submission a URL is only checked (the guarded client's address rules; 422 naming the field),
and the job is stored with the group key `WAITING` and one `input_fetches` row per URL field. The
control process then downloads each distinct URL once per claim (a catalog naming one photo a
thousand times fetches it once) through the guarded client, with the upload limits applied while
streaming, stores the bytes content-addressed exactly like an upload (sniffed, checked for
decompression bombs), puts the file id in the job's spec, runs the checks that need the image
(sizes agree, model's size limit), plans the job and dispatches it. Timeouts and 5xx retry with
backoff; anything else fails only that job, with an error naming the field, the URL and the answer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import delete, event, insert, or_, select, update
from sqlalchemy.orm import Session

from core import dispatch, events, outbound
from core.db import session_scope
from core.errors import FieldError, InvalidInput
from core.files import store_file
from core.jobs import complete_batches
from core.settings import Settings, get_settings
from core.specs import AnySpec, input_files, parse_item
from core.status import ErrorCode, JobStatus, failure
from core.storage import Storage
from core.tables import InputFetch, Job, utcnow

log = logging.getLogger(__name__)

FETCH = "step1x.fetch_inputs"
WAITING = "waiting-for-inputs"  # the group key of a job whose inputs are still being downloaded
THREADS = 8
_PENDING = "step1x_new_fetches"


class Transient(Exception):
    """Worth trying again later: a timeout, a 5xx, a dropped connection."""


class Permanent(Exception):
    """Trying again cannot help: 4xx, a redirect, too large, not an image, a refused address."""


def is_url(value: object) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://"))


def has_urls(spec: AnySpec) -> bool:
    return any(is_url(ref) for ref in input_files(spec).values())


def url_errors(spec: AnySpec, settings: Settings, item: str) -> list[FieldError]:
    """The guarded client's verdict on each URL input, before anything is stored or fetched."""
    errors = []
    for field, ref in input_files(spec).items():
        if is_url(ref):
            try:
                outbound.check_url(ref, settings, field)
            except outbound.Refused as exc:
                errors.append(FieldError(field, exc.reason, item))
    return errors


def record(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """One fetch row per URL input of the jobs just inserted; they are fetched once this commits."""
    fetches = [{"job_id": row["id"], "field": field, "tenant_id": row["tenant_id"], "batch_id": row["batch_id"],
                "url": row["spec"][field], "attempts": 0, "next_attempt_at": row["created_at"]}
               for row in rows if row["group_key"] == WAITING
               for field in ("image", "mask", "edges") if is_url(row["spec"].get(field))]
    if not fetches:
        return
    session.execute(insert(InputFetch), fetches)
    resources: set[str] = session.info.setdefault(_PENDING, set())
    if not resources:
        event.listen(session, "after_commit", _hand_over, once=True)
    resources.update(f["batch_id"] or f["job_id"] for f in fetches)


def _hand_over(session: Session) -> None:
    kick(sorted(session.info.pop(_PENDING, set())))


def kick(resources: Sequence[str], settings: Settings | None = None) -> None:
    settings = settings or get_settings()
    try:
        app = dispatch.app_for(settings)
        with app.producer_or_acquire() as producer:
            for resource in resources:
                app.send_task(FETCH, args=[resource], queue=dispatch.CONTROL, producer=producer)
    except Exception as exc:  # the due pass finds them
        log.warning("could not queue input fetches for %s: %s", resources, exc)


def due(settings: Settings, limit: int = 100) -> list[str]:
    with session_scope(settings.database_url) as session:
        rows = session.execute(select(InputFetch.batch_id, InputFetch.job_id)
                               .where(InputFetch.next_attempt_at <= utcnow()).limit(limit * 20))
        return sorted({row.batch_id or row.job_id for row in rows})[:limit]


def download(http: httpx.Client, url: str, settings: Settings) -> bytes:
    """The body of `url`. Whatever goes wrong is this URL's failure (Permanent or Transient): the
    download touches no storage or database, so nothing raised here is an outage of ours."""
    try:
        with http.stream("GET", url) as response:
            code = response.status_code
            if 300 <= code < 400:
                where = response.headers.get("location", "?")
                raise Permanent(f"answered HTTP {code} (redirect to {where[:200]}): redirects are not followed")
            if code in (408, 425, 429) or code >= 500:
                raise Transient(f"answered HTTP {code}")
            if code != 200:
                raise Permanent(f"answered HTTP {code}")
            encoding = response.headers.get("content-encoding", "")
            if any(token.strip().lower() not in ("", "identity") for token in encoding.split(",")):
                raise Permanent(f"was sent compressed (Content-Encoding: {encoding[:50]}) although asked "
                                "for identity: images are fetched uncompressed")
            limit = settings.max_upload_bytes
            if int(response.headers.get("content-length") or 0) > limit:
                raise Permanent(f"is over the {limit}-byte upload limit")
            data = bytearray()
            for chunk in response.iter_raw():
                data += chunk
                if len(data) > limit:
                    raise Permanent(f"is over the {limit}-byte upload limit")
            return bytes(data)
    except (Permanent, Transient):
        raise
    except outbound.Refused as exc:
        raise Permanent(exc.reason) from None
    except httpx.TimeoutException:
        raise Transient(f"timed out after {settings.fetch_timeout:g} s") from None
    except httpx.HTTPError as exc:
        raise Transient(f"{type(exc).__name__}: {exc}") from None
    except Exception as exc:  # e.g. httpx.InvalidURL for a URL stored before URLs were checked for it
        raise Permanent(f"could not be fetched ({type(exc).__name__}: {exc})") from None


def _fetch_and_store(settings: Settings, storage: Storage, http: httpx.Client, tenant: str, url: str
                     ) -> tuple[str, str]:
    """('ok', file id), ('retry' | 'fail', why the download failed) or ('invalid', why the bytes
    that arrived are not a usable image)."""
    try:
        data = download(http, url, settings)
        with session_scope(settings.database_url) as session:
            return "ok", store_file(session, storage, tenant, data, settings).id
    except Transient as exc:
        return "retry", str(exc)
    except Permanent as exc:
        return "fail", str(exc)
    except InvalidInput as exc:
        return "invalid", exc.errors[0].message


def _claim(session: Session, settings: Settings, resource: str) -> list[InputFetch]:
    """Every due fetch row of up to 4 x THREADS distinct URLs of the resource, leased for the work."""
    now = utcnow()
    mine = or_(InputFetch.batch_id == resource, InputFetch.job_id == resource)
    urls = list(session.scalars(select(InputFetch.url).where(mine, InputFetch.next_attempt_at <= now)
                                .distinct().limit(4 * THREADS)))
    if not urls:
        return []
    lease = now + timedelta(seconds=4 * settings.fetch_timeout + 30)
    return list(session.scalars(update(InputFetch).where(mine, InputFetch.url.in_(urls),
                                                         InputFetch.next_attempt_at <= now)
                                .values(next_attempt_at=lease).returning(InputFetch)))


def run(settings: Settings, storage: Storage, resource: str) -> int:
    """Fetch what is due for a batch (or single job) until nothing is; returns the URLs fetched."""
    fetched = 0
    with outbound.client(settings, settings.fetch_timeout) as http, ThreadPoolExecutor(THREADS) as pool:
        while True:
            with session_scope(settings.database_url) as session:
                claimed = _claim(session, settings, resource)
            if not claimed:
                return fetched
            tenant = claimed[0].tenant_id
            urls = sorted({row.url for row in claimed})
            got = pool.map(_fetch_and_store, *zip(*[(settings, storage, http, tenant, u) for u in urls], strict=True))
            results = dict(zip(urls, got, strict=True))
            fetched += len(urls)
            with session_scope(settings.database_url) as session:
                ready = _apply(session, settings, claimed, results)
            if ready:
                from core.submit import send_committed  # core.submit records fetches through this module

                send_committed(settings, ready)


def _apply(session: Session, settings: Settings, claimed: Sequence[InputFetch],
           results: dict[str, tuple[str, str]]) -> list[dispatch.Planned]:
    now = utcnow()  # the retry times
    failed: dict[str, tuple[ErrorCode, str]] = {}
    jobs = {job.id: job for job in session.scalars(select(Job).where(Job.id.in_({r.job_id for r in claimed}),
                                                                      Job.status == JobStatus.QUEUED))}
    for row in claimed:
        outcome, detail = results[row.url]
        job = jobs.get(row.job_id)
        where = [InputFetch.job_id == row.job_id, InputFetch.field == row.field]
        if job is None:  # canceled meanwhile: nothing left to feed
            session.execute(delete(InputFetch).where(*where))
        elif outcome == "ok":
            job.spec = {**job.spec, row.field: detail}
            session.execute(delete(InputFetch).where(*where))
        elif outcome == "retry" and row.attempts + 1 < settings.fetch_attempts:
            delay = 2 ** (row.attempts + 1) * settings.outbound_retry_scale
            session.execute(update(InputFetch).where(*where).values(
                attempts=row.attempts + 1, last_error=detail, next_attempt_at=now + timedelta(seconds=delay)))
        else:
            tries = f" (after {row.attempts + 1} attempts)" if outcome == "retry" else ""
            code = ErrorCode.INVALID_INPUT if outcome == "invalid" else ErrorCode.INPUT_FETCH_FAILED
            failed.setdefault(row.job_id, (code, f"{row.field}: {row.url} {detail}{tries}"))
    return _settle(session, settings, list(jobs.values()), failed)


def _settle(session: Session, settings: Settings, jobs: Sequence[Job], failed: dict[str, tuple[ErrorCode, str]]
            ) -> list[dispatch.Planned]:
    """Fail the `failed` jobs; plan those with no input left to fetch and return them for dispatch."""
    now = utcnow()
    ready: list[dispatch.Planned] = []
    for job in jobs:
        if job.id in failed or session.scalar(select(InputFetch.field).where(InputFetch.job_id == job.id).limit(1)):
            continue
        problem, planned = _plan(session, settings, job)
        if problem:
            failed[job.id] = (ErrorCode.INVALID_INPUT, problem)
        elif planned:
            ready.append(planned)
    if failed:
        session.execute(delete(InputFetch).where(InputFetch.job_id.in_(list(failed))))
        for job_id, (code, error) in failed.items():
            session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED)
                            .values(status=JobStatus.FAILED, error=error, finished_at=now, **failure(code)))
        complete_batches(session, {j.batch_id for j in jobs if j.id in failed and j.batch_id})
        events.jobs_ended(session, Job.id.in_(list(failed)), Job.finished_at == now)
    return ready


def requeue(session: Session, settings: Settings, planned: Sequence[dispatch.Planned]) -> list[dispatch.Planned]:
    """Jobs an operator queued again: those that never got past the fetch stage go back to it (each
    input still named by URL is fetched again once this commits; a job whose inputs all arrived is
    checked and planned anew). Returns what to dispatch now."""
    waiting = [p.id for p in planned if p.group_key == WAITING]
    if not waiting:
        return list(planned)
    jobs = list(session.scalars(select(Job).where(Job.id.in_(waiting), Job.status == JobStatus.QUEUED)))
    now = utcnow()
    record(session, [{"id": j.id, "tenant_id": j.tenant_id, "batch_id": j.batch_id, "spec": j.spec,
                      "group_key": WAITING, "created_at": now} for j in jobs])
    session.flush()
    return [p for p in planned if p.group_key != WAITING] + _settle(session, settings, jobs, {})


def _plan(session: Session, settings: Settings, job: Job) -> tuple[str | None, dispatch.Planned | None]:
    """With every input stored: the checks that need the images, then the job's micro-batch key."""
    from core.intake import check_files  # core.intake records fetches through this module

    spec = parse_item({**job.spec, "custom_id": job.custom_id}, job.custom_id or job.id)
    files, errors = check_files(session, job.tenant_id, [spec], settings)
    if errors:
        return "; ".join(f"{e.field}: {e.message}" for e in errors), None
    image = files.get(getattr(spec, "image", None) or "")
    job.group_key, job.cost = dispatch.plan(spec, settings, (image.width, image.height) if image else None)
    return None, dispatch.Planned(job.id, job.group_key, job.cost, job.lane)
