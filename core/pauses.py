"""Paused lanes and model queues.

Pausing stops workers from taking the work, not users from submitting it: jobs keep being accepted
and stay queued; a worker that receives a micro-batch of paused work hands the message back to the
broker without claiming its jobs (so no attempt is spent) and the work runs once it is resumed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from sqlalchemy import delete, or_, select
from sqlalchemy.orm import Session

from core.errors import InvalidInput
from core.tables import Job, QueuePause

Scope = Literal["lane", "model"]
SCOPES: tuple[Scope, ...] = ("lane", "model")


def pause(session: Session, scope: str, name: str, by: str) -> None:
    if scope not in SCOPES:
        raise InvalidInput(f"pause a 'lane' or a 'model', not {scope!r}", "scope")
    if not name or len(name) > 100:
        raise InvalidInput("name the lane or model to pause (1-100 characters)", "name")
    if session.get(QueuePause, (scope, name)) is None:
        session.add(QueuePause(scope=scope, name=name, paused_by=by))


def resume(session: Session, scope: str, name: str) -> bool:
    result = session.execute(delete(QueuePause).where(QueuePause.scope == scope, QueuePause.name == name))
    return bool(getattr(result, "rowcount", 0))


def paused(session: Session) -> list[QueuePause]:
    return list(session.scalars(select(QueuePause).order_by(QueuePause.scope, QueuePause.name)))


def held(session: Session, job_ids: Sequence[str]) -> bool:
    """Whether the micro-batch of these jobs belongs to a paused lane or model. A micro-batch is cut
    within one lane and one model, so one of its jobs answers for all of them."""
    if not job_ids:
        return False
    first = select(Job.lane, Job.model).where(Job.id == job_ids[0]).subquery()
    match = or_(
        (QueuePause.scope == "lane") & (QueuePause.name == first.c.lane),
        (QueuePause.scope == "model") & (QueuePause.name == first.c.model),
    )
    return session.execute(select(QueuePause.name).join(first, match).limit(1)).first() is not None
