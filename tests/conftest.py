"""Real PostgreSQL, Redis and SeaweedFS S3 for the tests, started through `core.services`.

Each service starts once per session, and only when a test asks for it, so unit tests need none.
A service that cannot start fails the tests that need it: a skip would pass CI with nothing tested.
`settings` gives each test its own database (cloned from a migrated template), an empty Redis
database and a fresh bucket.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from core.services import ChildService, start_postgres, start_redis, start_seaweedfs
from core.settings import Settings, get_settings

S3_ACCESS_KEY = "step1x-test"
S3_SECRET_KEY = "step1x-test-secret"
TEMPLATE_DATABASE = "step1x_template"

_test_numbers = itertools.count()


@contextmanager
def _private_workdir() -> Iterator[Path]:
    # Not under pytest's basetemp: every pytest session start makes /tmp/pytest-of-<user> 0700 again,
    # which locks the postgres user out of a data dir below it while initdb or the server starts.
    path = Path(tempfile.mkdtemp(prefix="step1x-services-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def services_dir() -> Iterator[Path]:
    with _private_workdir() as path:
        yield path


@pytest.fixture
def service_workdir() -> Iterator[Path]:
    """A folder of its own for a test that starts (and stops) services itself."""
    with _private_workdir() as path:
        yield path


@pytest.fixture(scope="session")
def redis_service(services_dir: Path) -> Iterator[ChildService]:
    with start_redis(services_dir) as service:
        yield service


@pytest.fixture(scope="session")
def postgres_service(services_dir: Path) -> Iterator[ChildService]:
    with start_postgres(services_dir) as service:
        yield service


@pytest.fixture(scope="session")
def s3_service(services_dir: Path) -> Iterator[ChildService]:
    with start_seaweedfs(services_dir, S3_ACCESS_KEY, S3_SECRET_KEY) as service:
        yield service


@pytest.fixture(scope="session")
def postgres_admin(postgres_service: ChildService) -> Iterator[Engine]:
    """Autocommit connections to the `postgres` database: CREATE/DROP DATABASE refuse transactions."""
    engine = create_engine(postgres_service.url, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def database_template(postgres_service: ChildService, postgres_admin: Engine) -> str:
    """A database migrated once per session; each test clones it, which is far faster than migrating."""
    from core.db import upgrade

    with postgres_admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {TEMPLATE_DATABASE}"))
    upgrade(make_url(postgres_service.url).set(database=TEMPLATE_DATABASE).render_as_string(False))
    with postgres_admin.connect() as conn:
        # CREATE DATABASE ... TEMPLATE fails while anyone (a pooled engine of the migration) is connected.
        conn.execute(text(f"ALTER DATABASE {TEMPLATE_DATABASE} WITH ALLOW_CONNECTIONS false"))
        conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = :name"), {"name": TEMPLATE_DATABASE})
    return TEMPLATE_DATABASE


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, postgres_service: ChildService,
             postgres_admin: Engine, database_template: str, redis_service: ChildService,
             s3_service: ChildService) -> Iterator[Settings]:
    number = next(_test_numbers)
    database = f"test_{number}"
    with postgres_admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {database} TEMPLATE {database_template}"))
    redis.Redis.from_url(redis_service.url).flushdb()

    # A developer's own STEP1X_* variables must not leak into the tests.
    for name in [name for name in os.environ if name.startswith("STEP1X_")]:
        monkeypatch.delenv(name)
    environment = {
        "DATABASE_URL": make_url(postgres_service.url).set(database=database).render_as_string(False),
        "REDIS_URL": redis_service.url,
        "S3_ENDPOINT_URL": s3_service.url,
        "S3_ACCESS_KEY": S3_ACCESS_KEY,
        "S3_SECRET_KEY": S3_SECRET_KEY,
        "S3_BUCKET": f"test-{number}",
        "DATA_DIR": str(tmp_path / "data"),
    }
    for name, value in environment.items():
        monkeypatch.setenv(f"STEP1X_{name}", value)
    get_settings.cache_clear()
    current = get_settings()
    # Imported here, like core.db above: unit tests must still collect while these modules change.
    from core.storage import Storage

    storage = Storage(current)
    storage.ensure_bucket()

    yield current

    get_settings.cache_clear()
    # SeaweedFS gives every bucket its own volume, and its volume slots are few (free disk / 1 GB,
    # 77 here): buckets left behind would exhaust them within one test run.
    storage.client.delete_bucket(Bucket=current.s3_bucket)
    with postgres_admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE {database} WITH (FORCE)"))
