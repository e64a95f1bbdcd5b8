"""The engine's progress callback for one running micro-batch: records each job's progress and
stops the run once every job in it was canceled.

The engine calls its progress callback after every diffusion step or upscale tile, far more often
than the database should be asked, so the steps reach the Watch at most once per
STEP1X_PROGRESS_INTERVAL, thinned once where they are made: by `throttled` for an engine in the
worker process, by the engine process before it sends a step (`workers.engine_host`). Thinned twice,
a step arriving a little early would be dropped and a cancel would wait two intervals. A database
that does not answer only delays both: the run goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.orm import Session

from core.db import session_scope
from core.progress import lock_order
from core.settings import Settings
from core.status import JobStatus
from core.tables import Job
from models.engine import Progress

if TYPE_CHECKING:
    from workers.batch import Claimed

log = logging.getLogger(__name__)


class Watch:
    def __init__(self, settings: Settings, jobs: Sequence[Claimed]) -> None:
        self.settings = settings
        self.jobs = list(jobs)
        self.canceled: set[str] = set()

    def __call__(self, done: int, total: int) -> bool:
        """Record the progress and look for cancels; whether the run should go on."""
        try:
            self._record(done / total if total else 0.0)
        except Exception as exc:  # progress is best effort: the run goes on without it
            log.warning("progress not recorded: %s", exc)
        return len(self.canceled) < len(self.jobs)

    def _record(self, fraction: float) -> None:
        live = sorted((job for job in self.jobs if job.id not in self.canceled), key=lock_order)
        table = Job.__table__
        assert isinstance(table, Table)
        with session_scope(self.settings.database_url) as session:
            session.connection().execute(
                update(table).where(table.c.id == bindparam("b_id"), table.c.claims == bindparam("b_claims"),
                                    table.c.status == JobStatus.RUNNING)
                .values(progress=round(min(1.0, fraction), 4)),
                [{"b_id": job.id, "b_claims": job.claims} for job in live])
            self.canceled |= self._canceled(session)

    def _canceled(self, session: Session) -> set[str]:
        return set(session.scalars(select(Job.id).where(Job.id.in_([job.id for job in self.jobs]),
                                                        Job.status == JobStatus.CANCELED)))

    def canceled_now(self) -> set[str]:
        """The jobs of this run canceled by now (asked fresh: a cancel may have come after the last look)."""
        with session_scope(self.settings.database_url) as session:
            self.canceled |= self._canceled(session)
        return self.canceled


def throttled(progress: Progress, interval: float) -> Progress:
    """`progress`, called at most once per `interval` seconds (the first time one interval from now);
    the calls in between say go on."""
    last = time.monotonic()

    def call(done: int, total: int) -> bool:
        nonlocal last
        now = time.monotonic()
        if now - last < interval:
            return True
        last = now
        return progress(done, total)

    return call
