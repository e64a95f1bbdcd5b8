"""Batch progress counters: jobs per status, kept on the batch row by the database itself.

Triggers on `jobs` move a batch's `<status>_count` columns in the statement (so the transaction)
that inserts, deletes or changes the status of its jobs. Every path is covered, whoever writes it:
the worker's claim and finish, hand-backs and refunds, the reconciler's recoveries, cancels,
operator retries, URL-fetch failures, expiry, retention, and SQL typed by hand. No caller has to
remember anything, so reading a batch is one row (no COUNT over 100,000 jobs) and finishing a
micro-batch never counts the whole batch. One more trigger keeps each batch's usage totals (per
device kind, in `batch_usage`) the same way, whenever a job's usage is recorded or replaced.

PostgreSQL runs one statement-level trigger per statement (transition tables: one UPDATE per batch
touched, in batch id order, so two transactions lock batch rows in the same order); SQLite runs a
row-level one. A migration that rebuilds `jobs` on SQLite (batch mode "recreate") drops its
triggers: call `install(connection)` again after it; tests check they exist at head.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

from sqlalchemy import Connection, func, select, text, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import InstrumentedAttribute, Session

from core.status import JobStatus
from core.tables import Batch, Job, utcnow


class _JobRow(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def batch_id(self) -> str | None: ...


def lock_order(job: _JobRow) -> tuple[str, str]:
    """The order every writer of several job rows in one transaction takes them in. Each job's
    status change also moves its batch's counters (the triggers below), which locks the batch row:
    two transactions taking the same jobs and batches in the same order never wait on each other
    in a cycle."""
    return job.batch_id or "", job.id


COUNTERS: Mapping[JobStatus, InstrumentedAttribute[int]] = {
    status: getattr(Batch, f"{status.value}_count") for status in JobStatus}

TRIGGERS = ("step1x_progress_insert", "step1x_progress_update", "step1x_progress_delete", "step1x_usage_update")
USAGE = ("usage_megapixels", "usage_steps", "usage_compute_seconds", "usage_device")


def _deltas(alias: str, sign: str) -> str:
    return ", ".join(f"{status.value}_count = {status.value}_count {sign} ({alias}.status = '{status.value}')"
                     for status in JobStatus)


def _sqlite() -> list[str]:
    return [
        f"CREATE TRIGGER IF NOT EXISTS {TRIGGERS[0]} AFTER INSERT ON jobs WHEN NEW.batch_id IS NOT NULL "
        f"BEGIN UPDATE batches SET {_deltas('NEW', '+')} WHERE id = NEW.batch_id; END",
        f"CREATE TRIGGER IF NOT EXISTS {TRIGGERS[1]} AFTER UPDATE OF status, batch_id ON jobs "
        "WHEN OLD.status IS NOT NEW.status OR OLD.batch_id IS NOT NEW.batch_id "
        f"BEGIN UPDATE batches SET {_deltas('OLD', '-')} WHERE id = OLD.batch_id; "
        f"UPDATE batches SET {_deltas('NEW', '+')} WHERE id = NEW.batch_id; END",
        f"CREATE TRIGGER IF NOT EXISTS {TRIGGERS[2]} AFTER DELETE ON jobs WHEN OLD.batch_id IS NOT NULL "
        f"BEGIN UPDATE batches SET {_deltas('OLD', '-')} WHERE id = OLD.batch_id; END",
        f"CREATE TRIGGER IF NOT EXISTS {TRIGGERS[3]} AFTER UPDATE OF {', '.join(USAGE)} ON jobs "
        "WHEN NEW.batch_id IS NOT NULL AND (" + " OR ".join(f"OLD.{c} IS NOT NEW.{c}" for c in USAGE) + ") "
        f"BEGIN {_sqlite_usage('OLD', '-')} {_sqlite_usage('NEW', '+')} END",
    ]


def _sqlite_usage(row: str, sign: str) -> str:
    device, where = f"coalesce({row}.usage_device, '')", f"{row}.usage_megapixels IS NOT NULL"
    return (f"INSERT OR IGNORE INTO batch_usage (batch_id, device, megapixels, steps, compute_seconds) "
            f"SELECT NEW.batch_id, {device}, 0, 0, 0 WHERE {where}; "
            f"UPDATE batch_usage SET megapixels = megapixels {sign} {row}.usage_megapixels, "
            f"steps = steps {sign} coalesce({row}.usage_steps, 0), "
            f"compute_seconds = compute_seconds {sign} coalesce({row}.usage_compute_seconds, 0) "
            f"WHERE {where} AND batch_id = NEW.batch_id AND device = {device};")


def _postgresql_usage() -> list[str]:
    """Rows whose usage changed: minus the old figures, plus the new, summed per batch and device."""
    changed = ("SELECT n.batch_id, " + ", ".join(f"n.{c} AS n_{c}, o.{c} AS o_{c}" for c in USAGE) +
               " FROM new_rows n JOIN old_rows o ON o.id = n.id WHERE n.batch_id IS NOT NULL AND (" +
               ", ".join(f"n.{c}" for c in USAGE) + ") IS DISTINCT FROM (" + ", ".join(f"o.{c}" for c in USAGE) + ")")
    sides = " UNION ALL ".join(
        f"SELECT batch_id, coalesce({p}_usage_device, '') AS device, {sign}{p}_usage_megapixels AS mp, "
        f"{sign}coalesce({p}_usage_steps, 0) AS st, {sign}coalesce({p}_usage_compute_seconds, 0) AS sec "
        f"FROM changed WHERE {p}_usage_megapixels IS NOT NULL" for p, sign in (("n", ""), ("o", "-")))
    trigger = TRIGGERS[3]
    return [
        f"CREATE OR REPLACE FUNCTION {trigger}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"WITH changed AS ({changed}), d AS ({sides}) "
        "INSERT INTO batch_usage AS u (batch_id, device, megapixels, steps, compute_seconds) "
        "SELECT batch_id, device, sum(mp), sum(st), sum(sec) FROM d GROUP BY batch_id, device "
        "ORDER BY batch_id, device ON CONFLICT (batch_id, device) DO UPDATE SET "
        "megapixels = u.megapixels + excluded.megapixels, steps = u.steps + excluded.steps, "
        "compute_seconds = u.compute_seconds + excluded.compute_seconds; RETURN NULL; END $$",
        f"DROP TRIGGER IF EXISTS {trigger} ON jobs",
        f"CREATE TRIGGER {trigger} AFTER UPDATE ON jobs REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {trigger}()",
    ]


def _postgresql() -> list[str]:
    sums = ", ".join(f"sum(sign * (status = '{s.value}')::int) AS {s.value}" for s in JobStatus)
    moved = " OR ".join(f"d.{s.value} <> 0" for s in JobStatus)
    sets = ", ".join(f"{s.value}_count = {s.value}_count + d.{s.value}" for s in JobStatus)
    statements = []
    for trigger, event, tables in ((TRIGGERS[0], "INSERT", ("new_rows",)),
                                   (TRIGGERS[1], "UPDATE", ("new_rows", "old_rows")),
                                   (TRIGGERS[2], "DELETE", ("old_rows",))):
        rows = " UNION ALL ".join(f"SELECT batch_id, status, {1 if t == 'new_rows' else -1} AS sign FROM {t} "
                                  "WHERE batch_id IS NOT NULL" for t in tables)
        referencing = " ".join(f"{'NEW' if t == 'new_rows' else 'OLD'} TABLE AS {t}" for t in tables)
        statements += [
            f"CREATE OR REPLACE FUNCTION {trigger}() RETURNS trigger LANGUAGE plpgsql AS $$ "
            f"DECLARE d record; BEGIN "
            f"FOR d IN SELECT batch_id, {sums} FROM ({rows}) AS moved GROUP BY batch_id ORDER BY batch_id LOOP "
            f"IF {moved} THEN UPDATE batches SET {sets} WHERE id = d.batch_id; END IF; "
            f"END LOOP; RETURN NULL; END $$",
            f"DROP TRIGGER IF EXISTS {trigger} ON jobs",
            f"CREATE TRIGGER {trigger} AFTER {event} ON jobs REFERENCING {referencing} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {trigger}()",
        ]
    return statements + _postgresql_usage()


def install(connection: Connection) -> None:
    """Create (or replace) the counting triggers on `jobs`."""
    for statement in _postgresql() if connection.dialect.name == "postgresql" else _sqlite():
        connection.execute(text(statement))


def uninstall(connection: Connection) -> None:
    for trigger in TRIGGERS:
        if connection.dialect.name == "postgresql":
            connection.execute(text(f"DROP TRIGGER IF EXISTS {trigger} ON jobs"))
            connection.execute(text(f"DROP FUNCTION IF EXISTS {trigger}()"))
        else:
            connection.execute(text(f"DROP TRIGGER IF EXISTS {trigger}"))


def installed(connection: Connection) -> set[str]:
    """The counting triggers present on `jobs`."""
    if connection.dialect.name == "postgresql":
        query = "SELECT tgname FROM pg_trigger WHERE tgrelid = 'jobs'::regclass AND NOT tgisinternal"
    else:
        query = "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'jobs'"
    return {name for (name,) in connection.execute(text(query))} & set(TRIGGERS)


def of(batch: Batch) -> dict[str, int]:
    """A batch's jobs per status from a row loaded in this very transaction (no second read)."""
    return {status.value: int(getattr(batch, column.key)) for status, column in COUNTERS.items()}


def read(session: Session, batch_id: str) -> dict[str, int]:
    """A batch's jobs per status, read fresh from its row (a loaded Batch may predate a change)."""
    row = session.execute(select(*COUNTERS.values()).where(Batch.id == batch_id)).one()
    return {status.value: int(n) for status, n in zip(COUNTERS, row, strict=True)}


def recount(session: Session, batch_id: str) -> dict[str, int]:
    """The same figures counted from the job rows: what `read` must always equal."""
    rows = session.execute(select(Job.status, func.count()).where(Job.batch_id == batch_id).group_by(Job.status))
    found = {status: n for status, n in rows}
    return {status.value: int(found.get(status.value, 0)) for status in JobStatus}


def stamp_finished(session: Session, batch_ids: Iterable[str]) -> list[str]:
    """Stamp `finished_at` on each batch with no queued or running job left; returns those stamped.
    The stamp is a conditional UPDATE on the counters: in PostgreSQL a concurrent transaction's
    counter change holds the batch row, and the WHERE is re-checked on the row it committed, so the
    stamp happens exactly once, by whoever moved the last job."""
    stamped = []
    for batch_id in sorted(batch_ids):
        result = session.execute(
            update(Batch).where(Batch.id == batch_id, Batch.finished_at.is_(None), Batch.queued_count == 0,
                                Batch.running_count == 0).values(finished_at=utcnow()),
            execution_options={"synchronize_session": False})
        assert isinstance(result, CursorResult)
        if result.rowcount:
            stamped.append(batch_id)
    return stamped
