"""The migrations build exactly the schema the ORM declares, on PostgreSQL and on SQLite."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, text

from core import progress
from core.db import upgrade
from core.services import ChildService
from core.settings import Settings
from core.tables import Base


def _drift(url: str) -> list[object]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))
    finally:
        engine.dispose()


@pytest.mark.integration
def test_postgres_schema_matches_tables(settings: Settings) -> None:
    assert _drift(settings.database_url) == []


def test_sqlite_schema_matches_tables(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'step1x.db'}"
    upgrade(url)
    assert _drift(url) == []


def _rows_survive_the_lighter_jobs_table(url: str) -> None:
    """Migration 0010 drops the jobs table's foreign keys; SQLite does it by copying the table. The
    jobs already stored stay, and so do the triggers that keep each batch's counters."""
    upgrade(url, "0009_deliveries")
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO tenants (id, created_at) VALUES ('acme', '2026-12-01')"))
            conn.execute(text("INSERT INTO batches (id, tenant_id, metadata, total, canceled, created_at, "
                              "completion_window, output_ttl) VALUES ('bat_1', 'acme', '{}', 2, false, "
                              "'2026-12-01', 86400, 604800)"))
            conn.execute(text("INSERT INTO jobs (id, tenant_id, batch_id, custom_id, kind, model, spec, seed, lane, "
                              "group_key, cost, status, attempts, claims, created_at) VALUES "
                              "('job_1', 'acme', 'bat_1', 'a', 'generate', 'tiny-sd', '{}', 1, 'bulk', 'g', 1, "
                              "'queued', 0, 0, '2026-12-01'), ('job_2', 'acme', 'bat_1', 'b', 'generate', "
                              "'tiny-sd', '{}', 2, 'bulk', 'g', 1, 'queued', 0, 0, '2026-12-01')"))
        upgrade(url)
        with engine.begin() as conn:
            assert progress.installed(conn) == set(progress.TRIGGERS)
            assert conn.execute(text("SELECT id, custom_id FROM jobs ORDER BY id")).all() == [
                ("job_1", "a"), ("job_2", "b")]
            conn.execute(text("UPDATE jobs SET status = 'succeeded', finished_at = '2026-12-02' WHERE id = 'job_1'"))
            assert conn.execute(text("SELECT queued_count, succeeded_count FROM batches")).one() == (1, 1)
        assert _drift(url) == []
    finally:
        engine.dispose()


def test_sqlite_jobs_and_counters_survive_migration_0010(tmp_path: Path) -> None:
    _rows_survive_the_lighter_jobs_table(f"sqlite:///{tmp_path / 'step1x.db'}")


@pytest.mark.integration
def test_postgres_jobs_and_counters_survive_migration_0010(postgres_service: ChildService) -> None:
    _rows_survive_the_lighter_jobs_table(postgres_service.create_database(f"migrate_{uuid.uuid4().hex[:8]}"))
