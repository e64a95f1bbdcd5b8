"""What each page shows, read through the tenant-scoped queries of `core.listing` and `core.monitor`.

A view returns the context its template needs; the page route renders it whole, and the page's
event stream renders its live part again every second.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.dashboard.charts import bar_chart, sparkline
from api.dashboard.session import Viewer, require_operator
from core import listing, monitor
from core.errors import InvalidInput, NotFound
from core.pauses import paused
from core.status import JobStatus
from core.storage import Storage
from core.tables import Batch, Job, WorkerRow, utcnow
from core.thumbs import INPUT_FIELDS, input_thumb_key, shown

PAGE = 50
# The stages a job's timings record (workers.batch), in order: (key, name on the page, what it covers).
STAGES = (
    ("queued", "queue wait", "from submission to the claim of its last attempt"),
    ("claim", "claim", "its share of the micro-batch's claim (one transaction)"),
    ("load", "load", "its share of making the model warm and fetching and decoding the inputs"),
    ("run", "run", "its share of the micro-batch's forward pass"),
    ("encode", "encode", "encoding its output images (PNG, JPEG or WebP)"),
    ("upload", "upload", "putting its outputs in storage"),
)
SHEET = 48  # thumbnails on a batch's contact sheet


_presigned: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()


def presign(storage: Storage, key: str) -> str:
    """A presigned thumbnail URL, reused for half its life: live updates re-render a page every second,
    and a fresh signature each time would make the browser fetch every thumbnail again."""
    now = time.monotonic()
    cached = _presigned.get((storage.bucket, key))
    if cached and cached[1] > now:
        return cached[0]
    url = storage.presign_get(key)
    _presigned[(storage.bucket, key)] = (url, now + storage.settings.presign_seconds / 2)
    _presigned.move_to_end((storage.bucket, key))
    while len(_presigned) > 20_000:
        _presigned.popitem(last=False)
    return url


def _find(session: Session, viewer: Viewer, row: type[Batch] | type[Job], what: str, row_id: str) -> Any:
    """A batch or job the viewer may see; any other id is NotFound, whether or not it exists."""
    query = select(row).where(row.id == row_id)
    if viewer.scope is not None:
        query = query.where(row.tenant_id == viewer.scope)
    found = session.scalar(query)
    if found is None:
        raise NotFound(f"{what} {row_id} not found")
    return found


def find_batch(session: Session, viewer: Viewer, batch_id: str) -> Batch:
    batch: Batch = _find(session, viewer, Batch, "batch", batch_id)
    return batch


def find_job(session: Session, viewer: Viewer, job_id: str) -> Job:
    job: Job = _find(session, viewer, Job, "job", job_id)
    return job


def overview(session: Session, viewer: Viewer, params: Mapping[str, str], storage: Storage) -> dict[str, Any]:
    series = monitor.per_minute(session, 60, viewer.scope)
    per_second = [m.succeeded / 60 for m in series]
    last5 = series[-5:]
    return {
        "now": utcnow(),
        "lanes": monitor.queues(session, "lane", viewer.scope),
        "models": monitor.queues(session, "model", viewer.scope),
        "chart": bar_chart(per_second, [m.failed / 60 for m in series], unit="images/s"),
        "rate_now": sum(m.succeeded for m in last5) / 300,
        "failure_rate": monitor.failure_rate(series),
        "failed_hour": sum(m.failed for m in series),
        "succeeded_hour": sum(m.succeeded for m in series),
        "workers": monitor.workers(session) if viewer.operator else [],
        "paused": {(p.scope, p.name) for p in paused(session)},
    }


def _date(value: str | None, field: str) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput("use a date like 2026-11-28 or 2026-11-28T09:30", field) from None


def batches(session: Session, viewer: Viewer, params: Mapping[str, str], storage: Storage) -> dict[str, Any]:
    status = params.get("status") or None
    if status not in (None, "active", "finished", "canceled"):
        raise InvalidInput("status is one of active, finished, canceled", "status")
    filters = listing.BatchFilter(status=status,  # type: ignore[arg-type]
                                  tenant=params.get("tenant") or None,
                                  created_from=_date(params.get("created_from"), "created_from"),
                                  created_to=_date(params.get("created_to"), "created_to"),
                                  q=params.get("q") or None)
    page, next_cursor = listing.list_batches(session, viewer.scope, filters, params.get("cursor") or None, PAGE)
    return {"now": utcnow(), "page": page, "next_cursor": next_cursor, "filters": filters}


def batch(session: Session, viewer: Viewer, params: Mapping[str, str], storage: Storage,
          batch_id: str) -> dict[str, Any]:
    row = find_batch(session, viewer, batch_id)
    progress = listing.batch_progress(session, row)
    status = params.get("status") or None
    if status is not None and status not in set(JobStatus):
        raise InvalidInput(f"status is one of {', '.join(JobStatus)}", "status")
    jobs = listing.job_page(session, row.id, status, params.get("error") or None, params.get("q") or None,
                            params.get("after") or None, PAGE)
    sheet = session.scalars(select(Job).where(Job.batch_id == row.id, Job.status == JobStatus.SUCCEEDED)
                            .order_by(Job.id).limit(SHEET)).all()
    return {
        "now": utcnow(), "batch": row, "progress": progress,
        "errors": listing.error_groups(session, row.id),
        "jobs": jobs, "next_after": jobs[-1].id if len(jobs) == PAGE else None,
        "sheet": [contact(job, storage) for job in sheet],
    }


def contact(job: Job, storage: Storage) -> dict[str, Any]:
    """A contact-sheet cell: the output's thumbnail and, for inpainting, the input's beside it."""
    cell: dict[str, Any] = {"job": job, "after": None, "before": None}
    if job.output_keys:
        cell["after"] = presign(storage, shown(job.output_keys[0], job.result))
    if job.kind == "inpaint" and isinstance(job.spec.get("image"), str):
        cell["before"] = presign(storage, input_thumb_key(job.tenant_id, job.spec["image"]))
    return cell


def job(session: Session, viewer: Viewer, params: Mapping[str, str], storage: Storage,
        job_id: str) -> dict[str, Any]:
    row = find_job(session, viewer, job_id)
    inputs = [(field, presign(storage, input_thumb_key(row.tenant_id, row.spec[field])))
              for field in INPUT_FIELDS if isinstance(row.spec.get(field), str)]
    outputs = [presign(storage, shown(key, row.result)) for key in row.output_keys or []]
    recorded = row.timings or {}
    stages = [(name, key, hint, recorded.get(key)) for key, name, hint in STAGES]
    total = (row.finished_at - row.started_at).total_seconds() if row.started_at and row.finished_at else None
    return {"now": utcnow(), "job": row, "inputs": inputs if row.started_at else [], "outputs": outputs,
            "stages": stages, "total_running": total, "result": row.result or {}}


def workers(session: Session, viewer: Viewer, params: Mapping[str, str], storage: Storage) -> dict[str, Any]:
    require_operator(viewer)  # a worker's micro-batch holds any tenant's job ids
    rows: list[WorkerRow] = monitor.workers(session)
    history = monitor.per_worker_minute(session, 60)
    memory = monitor.memory_history(session, 60)
    return {"now": utcnow(), "workers": rows,
            "history": {name: sparkline([n / 60 for n in counts]) for name, counts in history.items()},
            "memory": {name: sparkline([float(v) for v in values], unit="B") for name, values in memory.items()}}
