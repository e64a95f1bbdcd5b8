"""The API's and workers' pooled database connections (`core.db`): pinged before use only after
sitting idle or when the server wrote to them meanwhile, so a database restart costs no request
an error while a busy pool pays no round trip per transaction. Real PostgreSQL, really restarted."""

import time

import pytest
from sqlalchemy import text

from core import db
from core.db import get_engine, session_scope

pytestmark = pytest.mark.integration


def select_one(url: str) -> int:
    with session_scope(url) as session:
        return session.scalar(text("select 1"))


def test_connections_that_died_while_idle_are_replaced_before_use(settings, stop_postgres, monkeypatch):
    """Even when nothing told the client (a lost network): the ping after a pause finds it dead."""
    url = settings.database_url
    monkeypatch.setattr(db, "_readable", lambda conn: False)  # as if the server had gone silent
    assert select_one(url) == 1  # a connection now waits in the pool
    with stop_postgres():
        pass  # down, then back on the same port: the pooled connection is dead
    time.sleep(db.FRESH_SECONDS)
    assert select_one(url) == 1  # no error: the ping found it dead and the pool opened another


def test_a_database_restarted_within_a_moment_costs_no_error_either(settings, stop_postgres):
    """The server told the pooled connection it was closing it: readable while idle, it is pinged
    (and replaced) though it was used a moment ago."""
    url = settings.database_url
    assert select_one(url) == 1
    with stop_postgres():
        pass
    assert select_one(url) == 1


def test_a_connection_used_a_moment_ago_is_not_pinged_again(settings, monkeypatch):
    url = settings.database_url
    engine = get_engine(url)
    pings: list[object] = []
    ping = engine.dialect.do_ping
    monkeypatch.setattr(engine.dialect, "do_ping", lambda conn: pings.append(conn) or ping(conn))
    monkeypatch.setattr(db, "FRESH_SECONDS", 0.2)
    for _ in range(5):
        select_one(url)
    assert pings == []  # back in the pool moments ago, or opened just now
    time.sleep(0.3)
    select_one(url)
    assert len(pings) == 1
