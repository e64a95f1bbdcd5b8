"""Database engine, sessions and migrations.

PostgreSQL in production and tests; SQLite for the embedded single-machine stack, opened in WAL
mode with a busy timeout because the API and the worker are separate processes writing one file.
"""

from __future__ import annotations

import select
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

from core.errors import ServiceUnavailable

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def _sqlite_folder(url: str) -> None:
    if url.startswith("sqlite"):
        Path(url.split("///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        _sqlite_folder(url)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    engine = create_engine(url, pool_size=10, max_overflow=20)
    _ping_when_idle(engine)
    return engine


# A pooled connection is pinged before use (a round trip) only when it sat idle longer than this,
# or when the server has written to it while idle. SQLAlchemy's pool_pre_ping pings on every
# checkout: a tenth of the API's time on `GET /v1/batches/{id}` (two transactions) and one round
# trip more on each of a worker's claims and finishes.
FRESH_SECONDS = 1.0


def _ping_when_idle(engine: Engine) -> None:
    """A connection that died while it sat in the pool is replaced before anyone uses it. A server
    shutting down (a restart, a failover, an administrator's kill) tells each client before it
    closes the socket, so such a connection is readable while idle, however short its idle time;
    one that went silent (a lost network) is caught by the ping once it has been idle a while."""

    def _idle_from_now(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    event.listen(engine, "connect", _idle_from_now)  # just opened: alive
    event.listen(engine, "checkin", _idle_from_now)

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        if time.monotonic() - record.info.get("idle_since", 0.0) < FRESH_SECONDS and not _readable(dbapi_conn):
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:  # the pool drops this connection and checks out another
            raise DisconnectionError(str(exc)) from exc


def _readable(dbapi_conn: Any) -> bool:
    """Whether the server wrote to this idle connection (it is closing it), or it is closed."""
    try:
        poller = select.poll()  # not select.select: it fails for descriptors past 1024
        poller.register(dbapi_conn.fileno(), select.POLLIN)
        return bool(poller.poll(0))
    except Exception:  # closed or broken: the ping decides
        return True


@lru_cache(maxsize=8)
def _sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits when the block ends and rolls back if it raises."""
    with _sessionmaker(url)() as session, session.begin():
        yield session


def ping(url: str) -> None:
    try:
        with get_engine(url).connect() as conn:
            conn.execute(text("select 1"))
    except Exception as exc:
        raise ServiceUnavailable(f"database at {redact(url)} is unreachable: {exc}") from exc


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def upgrade(url: str, revision: str = "head") -> None:
    """Run the Alembic migrations up to `revision` (the API and `step1x up` call this at start)."""
    from alembic import command
    from alembic.config import Config

    _sqlite_folder(url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, revision)
