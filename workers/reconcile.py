"""The periodic repair pass, run by the control process. The database is the source of truth;
Redis is only transport.

- A running job whose worker is dead (its heartbeat in the workers table is older than
  STEP1X_WORKER_DEAD_AFTER) goes back to queued and is dispatched again at once, while attempts
  remain, else it fails (`worker_lost`). So does one whose lease expired under a worker that has no
  heartbeat at all. A dead worker counts against the job's attempts: the item may be what killed it.
- A running job whose lease expired while its worker lives on, but no longer holds it, was
  abandoned by infrastructure trouble (its hand-back could not be written): queued again without
  charging the attempt.
- Dead workers are judged only after the reconciler itself has seen the database for
  STEP1X_WORKER_DEAD_AFTER: after a database outage every heartbeat looks old, and the workers
  need one interval to write a new one.
- A queued job out of attempts fails with a message saying so.
- A batch whose jobs have all ended gets its `finished_at`, if nothing stamped it yet.
- A queued job dispatched long ago whose lane has no waiting messages lost its message (Redis
  restarted without persistence, say): it is dispatched again. Duplicate messages are harmless (the
  claim skips jobs already taken and charges nothing for a job it does not take), but checking the
  backlog keeps a long catalog from being resent while its messages are simply waiting their turn.
- A queued job never stamped as sent STEP1X_NEVER_SENT_AFTER after it was stored (its dispatch
  failed part-way) is sent whatever the backlog.

Each pass records when it ran (`reconciler_runs`), so `/readyz` shows a deployment whose
reconciler is missing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import redis
from sqlalchemy import and_, false, insert, or_, select, update
from sqlalchemy.orm import Session

from core import dispatch, events, fetch
from core.db import session_scope
from core.jobs import RECONCILER, complete_batches, unfinished_batches
from core.retention import sweep
from core.settings import Settings
from core.status import ErrorCode, JobStatus, failure
from core.submit import send, sent_before, unsent
from core.tables import Job, ReconcilerRun, WorkerRow, utcnow

log = logging.getLogger(__name__)

# kombu's Redis transport keeps one list per priority step: "bulk", "bulk\x06\x163", ...
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


def backlog(settings: Settings, lane: str) -> int:
    client = redis.Redis.from_url(settings.redis_url)
    try:
        return sum(int(client.llen(queue + suffix)) for queue in dispatch.lane_queues(lane, settings)
                   for suffix in _PRIORITY_SUFFIXES)
    finally:
        client.close()


def _seeing_since(session: Session, settings: Settings, now: datetime) -> datetime:
    """Since when the reconciler has run without a gap (a gap: its database or broker was away)."""
    last = session.get(ReconcilerRun, RECONCILER)
    if last is None or now - last.ran_at > timedelta(seconds=3 * settings.reconcile_interval):
        return now
    since = (last.report or {}).get("seeing_since")
    return datetime.fromisoformat(since) if since else now


@dataclass
class _Live:
    started_at: datetime  # when the process now heartbeating under this name started
    holding: set[str]  # the job ids in its hands


def _workers(session: Session, settings: Settings, now: datetime) -> tuple[list[str], dict[str, _Live]]:
    """(names of dead workers, live workers by name)."""
    silent = now - timedelta(seconds=settings.worker_dead_after)
    dead, alive = [], {}
    for row in session.execute(select(WorkerRow.name, WorkerRow.heartbeat_at, WorkerRow.stopped_at,
                                      WorkerRow.started_at, WorkerRow.current)):
        if row.stopped_at is not None or row.heartbeat_at < silent:
            dead.append(row.name)
        else:
            alive[row.name] = _Live(row.started_at, set((row.current or {}).get("job_ids", [])))
    return dead, alive


def _recoverable(session: Session, settings: Settings, now: datetime, judge: bool) -> tuple[Any, Any]:
    """(running jobs whose worker is lost, running jobs their live worker abandoned) as conditions."""
    running, expired = Job.status == JobStatus.RUNNING, Job.lease_until < now
    dead, alive = _workers(session, settings, now)
    if not judge:  # every heartbeat may just be unheard yet: only workers with no row at all are lost
        known = [*dead, *alive]
        return and_(running, expired, Job.worker.not_in(known)), false()
    # A worker restarted under the same name (a replaced pool process, a restarted container) holds
    # nothing it claimed before it started: the process that did is gone.
    replaced = [and_(Job.worker == name, Job.started_at < live.started_at) for name, live in alive.items()]
    lost = and_(running, or_(Job.worker.in_(dead), *replaced, and_(expired, Job.worker.not_in(list(alive)))))
    held = [job_id for live in alive.values() for job_id in live.holding]
    return lost, and_(running, expired, Job.worker.in_(list(alive)), Job.id.not_in(held))


def reconcile(settings: Settings, limit: int = 20_000) -> dict[str, Any]:
    now = utcnow()
    report: dict[str, Any] = {"requeued": 0, "failed": 0, "redispatched": 0}
    with session_scope(settings.database_url) as session:
        seeing_since = _seeing_since(session, settings, now)
        judge = now - seeing_since >= timedelta(seconds=settings.worker_dead_after)
        lost, abandoned = _recoverable(session, settings, now, judge)
        report["failed"] = session.execute(
            update(Job).where(or_(lost, Job.status == JobStatus.QUEUED), Job.attempts >= settings.max_attempts)
            .values(status=JobStatus.FAILED, finished_at=now, lease_until=None, **failure(ErrorCode.WORKER_LOST),
                    error=f"gave up after {settings.max_attempts} attempts: each was interrupted (worker lost)")
        ).rowcount  # type: ignore[attr-defined]
        events.jobs_ended(session, Job.finished_at == now)
        back = {"status": JobStatus.QUEUED, "lease_until": None, "worker": None, "dispatched_at": now}
        returning = (Job.id, Job.group_key, Job.cost, Job.lane)
        requeued = [dispatch.Planned(*row) for row in session.execute(
            update(Job).where(lost).values(**back).returning(*returning))]
        requeued += [dispatch.Planned(*row) for row in session.execute(
            update(Job).where(abandoned).values(**back, attempts=Job.attempts - 1).returning(*returning))]
        report["requeued"] = len(requeued)
        # Batches whose last job just failed here, and any whose last job ended without a stamp.
        complete_batches(session, unfinished_batches(session))
    if requeued:
        # Their worker is gone: send them now rather than behind whatever the lane holds.
        with session_scope(settings.database_url) as session:
            send(session, settings, requeued)

    stale = now - timedelta(seconds=settings.redispatch_after)
    # Never stamped as sent (neither the job nor its batch) a while after it was stored: its
    # dispatch failed part-way.
    never_sent = unsent(now - timedelta(seconds=settings.never_sent_after))
    for lane in dispatch.LANES:
        lost_message = never_sent if backlog(settings, lane) else or_(never_sent, sent_before(stale))
        with session_scope(settings.database_url) as session:
            rows = session.execute(
                select(Job.id, Job.group_key, Job.cost, Job.lane)
                .where(Job.status == JobStatus.QUEUED, Job.lane == lane, lost_message, Job.group_key != fetch.WAITING)
                .order_by(Job.created_at).limit(limit)
            ).all()
            if rows:
                send(session, settings, [dispatch.Planned(*row) for row in rows])
                report["redispatched"] += len(rows)
    record(settings, now, {**report, "seeing_since": seeing_since.isoformat()})
    if any(report.values()):
        log.warning("reconcile: %s", report)
    sweep(settings)  # completion windows and output retention; it logs what it did
    return report


def record(settings: Settings, ran_at: datetime, report: dict[str, Any]) -> None:
    with session_scope(settings.database_url) as session:
        updated = session.execute(update(ReconcilerRun).where(ReconcilerRun.name == RECONCILER)
                                  .values(ran_at=ran_at, report=report))
        if not updated.rowcount:  # type: ignore[attr-defined]
            session.execute(insert(ReconcilerRun).values(name=RECONCILER, ran_at=ran_at, report=report))
