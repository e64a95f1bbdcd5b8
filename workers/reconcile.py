"""The periodic repair pass. The database is the source of truth; Redis is only transport.

- A running job whose lease expired lost its worker: back to queued and dispatched again at once
  while attempts remain, else failed.
- A queued job out of attempts fails with a message saying so.
- A batch whose jobs have all ended gets its `finished_at`, if nothing stamped it yet.
- A queued job dispatched long ago whose lane has no waiting messages lost its message (Redis
  restarted without persistence, say): it is dispatched again. Duplicate messages are harmless (the
  claim skips jobs already taken), but checking the backlog keeps a long catalog from being resent
  while its messages are simply waiting their turn.
- A queued job never stamped as sent (its dispatch failed part-way) is sent whatever the backlog.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import redis
from sqlalchemy import and_, or_, select, update

from core import dispatch
from core.db import session_scope
from core.jobs import complete_batches, unfinished_batches
from core.retention import sweep
from core.settings import Settings
from core.status import JobStatus
from core.submit import send
from core.tables import Job, utcnow

log = logging.getLogger(__name__)

# kombu's Redis transport keeps one list per priority step: "bulk", "bulk\x06\x163", ...
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


def backlog(settings: Settings, lane: str) -> int:
    client = redis.Redis.from_url(settings.redis_url)
    try:
        return sum(int(client.llen(lane + suffix)) for suffix in _PRIORITY_SUFFIXES)
    finally:
        client.close()


def reconcile(settings: Settings, limit: int = 20_000) -> dict[str, int]:
    now = utcnow()
    report = {"requeued": 0, "failed": 0, "redispatched": 0}
    with session_scope(settings.database_url) as session:
        expired = and_(Job.status == JobStatus.RUNNING, Job.lease_until < now)
        report["failed"] = session.execute(
            update(Job).where(or_(expired, Job.status == JobStatus.QUEUED), Job.attempts >= settings.max_attempts)
            .values(status=JobStatus.FAILED, finished_at=now, lease_until=None,
                    error=f"gave up after {settings.max_attempts} attempts: each was interrupted (worker lost)")
        ).rowcount  # type: ignore[attr-defined]
        requeued = [dispatch.Planned(*row) for row in session.execute(
            update(Job).where(expired).values(status=JobStatus.QUEUED, lease_until=None, worker=None)
            .returning(Job.id, Job.group_key, Job.cost, Job.lane)
        )]
        report["requeued"] = len(requeued)
        # Batches whose last job just failed here, and any whose last job ended without a stamp.
        complete_batches(session, unfinished_batches(session))
    if requeued:
        # Their worker is gone: send them now rather than behind whatever the lane holds.
        with session_scope(settings.database_url) as session:
            send(session, settings, requeued)

    stale = now - timedelta(seconds=settings.redispatch_after)
    # Never stamped as sent a minute after it was stored: its dispatch failed part-way.
    never_sent = and_(Job.dispatched_at.is_(None), Job.created_at < now - timedelta(seconds=60))
    for lane in dispatch.LANES:
        lost = never_sent if backlog(settings, lane) else or_(never_sent, Job.dispatched_at < stale)
        with session_scope(settings.database_url) as session:
            rows = session.execute(
                select(Job.id, Job.group_key, Job.cost, Job.lane)
                .where(Job.status == JobStatus.QUEUED, Job.lane == lane, lost)
                .order_by(Job.created_at).limit(limit)
            ).all()
            if rows:
                send(session, settings, [dispatch.Planned(*row) for row in rows])
                report["redispatched"] += len(rows)
    if any(report.values()):
        log.warning("reconcile: %s", report)
    sweep(settings)  # completion windows and output retention; it logs what it did
    return report
