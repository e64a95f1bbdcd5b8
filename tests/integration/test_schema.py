"""The migrations build exactly the schema the ORM declares, on PostgreSQL and on SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from core.db import upgrade
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
