"""Fixtures of the fault suite: the stack in processes on time-scaled settings, faults injected
into the real services the session started (stopped and started again in place, on their ports),
the invariants every scenario must end with, and the recovery times, printed at the end of the run."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from core.db import session_scope
from core.services import ChildService, start_postgres, start_redis, start_seaweedfs
from core.settings import Settings
from core.status import TERMINAL, JobStatus
from core.storage import Storage
from core.tables import Batch, Job, utcnow
from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY
from tests.stack import Stack
from workers.reconcile import reconcile

RECOVERY: dict[str, str] = {}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if RECOVERY:
        terminalreporter.section("fault suite: recovery times")
        for scenario, line in RECOVERY.items():
            terminalreporter.write_line(f"{scenario}: {line}")


def report(scenario: str, line: str) -> None:
    RECOVERY[scenario] = line
    print(f"{scenario}: {line}")


@pytest.fixture(scope="session")
def shared_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One models folder for every scenario: the tiny pipelines are built once, not per stack."""
    return tmp_path_factory.mktemp("fault-models")


@pytest.fixture
def stack(settings: Settings, tmp_path: Path, shared_models: Path, request: pytest.FixtureRequest
          ) -> Iterator[Stack]:
    overrides = getattr(request, "param", {})
    running = Stack(settings, tmp_path, MODELS_DIR=str(shared_models), **overrides).start()
    try:
        yield running
    finally:
        running.stop()


@contextmanager
def stopped(service: ChildService, start: Callable[[], ChildService]) -> Iterator[None]:
    """The service is down inside the block and back, on the same port and data, after it. The
    session fixture keeps stopping whichever process serves at the end."""
    service.stop()
    try:
        yield
    finally:
        service.process = start().process


@pytest.fixture
def restart_redis(redis_service: ChildService, services_dir: Path) -> Callable[[], Iterator[None]]:
    return lambda: stopped(redis_service, lambda: start_redis(services_dir, redis_service.port))


@pytest.fixture
def stop_postgres(postgres_service: ChildService, services_dir: Path, postgres_admin: Engine
                  ) -> Callable[[], Iterator[None]]:
    def start() -> ChildService:
        started = start_postgres(services_dir, postgres_service.port)
        postgres_admin.dispose()  # its pooled connections died with the server
        return started

    return lambda: stopped(postgres_service, start)


@pytest.fixture
def stop_s3(s3_service: ChildService, services_dir: Path) -> Callable[[], Iterator[None]]:
    return lambda: stopped(s3_service, lambda: start_seaweedfs(services_dir, S3_ACCESS_KEY, S3_SECRET_KEY,
                                                               s3_service.port))


@contextmanager
def frozen(service: ChildService) -> Iterator[None]:
    """The service hangs (SIGSTOP) inside the block: connections open, nothing answers."""
    os.kill(service.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(service.process.pid, signal.SIGCONT)


def generation(count: int, steps: int, prefix: str = "g") -> list[dict]:
    # The prefix is in the prompt too: a batch identical to an earlier one would come from the job cache.
    return [{"custom_id": f"{prefix}{i}", "kind": "generate", "prompt": f"product {prefix}{i}", "width": 64,
             "height": 64, "steps": steps, "seed": i} for i in range(count)]


def jobs(settings: Settings) -> list[Job]:
    with session_scope(settings.database_url) as session:
        return list(session.scalars(select(Job)))


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, stack: Stack | None = None) -> float:
    """Seconds it took for `predicate` to hold."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            logs = f"\nworker log:\n{stack.log('cpu')}\ncontrol log:\n{stack.log('control')}" if stack else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{logs}")
        time.sleep(0.1)
    return time.monotonic() - started


def running_count(settings: Settings) -> int:
    return sum(job.status == JobStatus.RUNNING for job in jobs(settings))


def all_terminal(settings: Settings) -> bool:
    return all(job.status in TERMINAL for job in jobs(settings))


def claimed_since(settings: Settings, moment: datetime, ids: set[str] | None = None) -> bool:
    """Work flows again: a job (of `ids`, when given) was claimed after `moment`."""
    return any(job.started_at and job.started_at > moment and (ids is None or job.id in ids)
               for job in jobs(settings))


def check_invariants(settings: Settings, max_claims: int, max_attempts: int = 1) -> list[Job]:
    """What every scenario ends with: every accepted job terminal (and, with no bad item in these
    catalogs, succeeded); exactly one output object per output of a succeeded job and no other;
    no job run or charged more often than the fault explains; batch counts equal job rows; every
    batch stamped finished once, after its last job, and never again."""
    rows = jobs(settings)
    assert rows, "no job was accepted"
    assert {job.status for job in rows} == {JobStatus.SUCCEEDED}, \
        [(job.custom_id, job.status, job.error) for job in rows if job.status != JobStatus.SUCCEEDED]
    keys = [key for job in rows for key in job.output_keys or []]
    assert all(job.output_keys for job in rows)
    listed = Storage(settings).client.list_objects_v2(Bucket=settings.s3_bucket, Prefix="outputs/")
    assert sorted(obj["Key"] for obj in listed.get("Contents", [])) == sorted(keys) and len(set(keys)) == len(keys)
    assert max(job.claims for job in rows) <= max_claims, sorted(job.claims for job in rows)
    assert max(job.attempts for job in rows) <= max_attempts, sorted(job.attempts for job in rows)
    with session_scope(settings.database_url) as session:
        batches = list(session.scalars(select(Batch)))
        for batch in batches:
            count, last = session.execute(select(func.count(), func.max(Job.finished_at))
                                          .where(Job.batch_id == batch.id)).one()
            assert count == batch.total
            assert batch.finished_at is not None and batch.finished_at >= last
    stamps = {batch.id: batch.finished_at for batch in batches}
    reconcile(settings)  # another repair pass finds nothing to redo and stamps nothing again
    with session_scope(settings.database_url) as session:
        assert {b.id: b.finished_at for b in session.scalars(select(Batch))} == stamps
    return rows


def now() -> datetime:
    return utcnow()
