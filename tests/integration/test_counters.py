"""Batch counters equal a COUNT(*) of the batch's jobs per status after every kind of status change.

The counters are kept by triggers on `jobs` (core.progress), so each step below goes through the
code path that really makes the change (worker, reconciler, cancel, operator retry, expiry, cache,
DELETE) and then compares the batch row with the job rows.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, delete, func, insert, select, update
from sqlalchemy.orm import Session

from core import progress
from core.db import session_scope, upgrade
from core.jobs import cancel_batch, cancel_job
from core.operate import retry_failed
from core.retention import delete_batch, expire_overdue
from core.settings import Settings
from core.status import JobStatus
from core.storage import Storage
from core.tables import Batch, Job, Tenant, utcnow
from core.usage import batch_usage
from models.profiles import Registry
from tests.integration.helpers import api_client, png, upload
from workers.batch import MicroBatch, Outcome, claim, finish, release
from workers.reconcile import reconcile


def summed_usage(session: Session, batch_id: str) -> dict[str, Any]:
    """A batch's usage summed over its job rows, per device: what the kept totals must equal."""
    rows = session.execute(
        select(Job.usage_device, func.sum(Job.usage_megapixels), func.sum(Job.usage_steps),
               func.sum(Job.usage_compute_seconds))
        .where(Job.batch_id == batch_id, Job.usage_megapixels.is_not(None)).group_by(Job.usage_device)).all()
    by_device = {device: round(float(seconds or 0), 4) for device, _, _, seconds in rows if device}
    return {"megapixels": round(sum(float(mp or 0) for _, mp, _, _ in rows), 6),
            "steps": sum(int(steps or 0) for _, _, steps, _ in rows),
            "compute_seconds": round(sum(by_device.values()), 4), "compute_seconds_by_device": by_device}


def assert_true(settings: Settings, batch_id: str) -> dict[str, int]:
    """The consistency check: the batch row's counters == its jobs counted by status, and its usage
    totals == its jobs' usage summed."""
    with session_scope(settings.database_url) as session:
        counters, counted = progress.read(session, batch_id), progress.recount(session, batch_id)
        kept, summed = batch_usage(session, batch_id), summed_usage(session, batch_id)
    assert counters == counted
    split = "compute_seconds_by_device"
    assert kept.pop(split) == pytest.approx(summed.pop(split)) and kept == pytest.approx(summed)
    return {status: n for status, n in counters.items() if n}


def ids_of(settings: Settings, batch_id: str) -> list[str]:
    with session_scope(settings.database_url) as session:
        return list(session.scalars(select(Job.id).where(Job.batch_id == batch_id).order_by(Job.custom_id)))


def lapse(settings: Settings, job_id: str) -> None:
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(lease_until=utcnow() - timedelta(seconds=1)))


@pytest.mark.integration
def test_counters_follow_every_transition(settings: Settings) -> None:
    client = api_client(settings)
    image = upload(client, png((16, 16)))
    items = [{"custom_id": f"u{i}", "kind": "upscale", "image": image, "model": "lanczos-x4"} for i in range(8)]
    batch_id = client.post("/v1/batches", json={"items": items}).json()["id"]
    ids = ids_of(settings, batch_id)
    assert assert_true(settings, batch_id) == {"queued": 8}

    with session_scope(settings.database_url) as session:
        claimed = claim(session, ids[:6], "w1@host", settings)
    assert assert_true(settings, batch_id) == {"queued": 2, "running": 6}
    done, broken, handed_back, lost, canceled_running, _ = claimed
    finish(settings, [Outcome(done), Outcome(broken, status=JobStatus.FAILED, error="bad")])
    release(settings, [handed_back], "S3 down")  # an outage hand-back: running -> queued, attempt refunded
    assert assert_true(settings, batch_id) == {"queued": 3, "running": 3, "succeeded": 1, "failed": 1}

    with session_scope(settings.database_url) as session:
        cancel_job(session, "acme", canceled_running.id)
        cancel_job(session, "acme", ids[6])  # still queued
    finish(settings, [Outcome(canceled_running)])  # its worker finishing late changes nothing
    assert assert_true(settings, batch_id) == {"queued": 2, "running": 2, "failed": 1, "succeeded": 1,
                                               "canceled": 2}

    lapse(settings, lost.id)  # its worker died: the reconciler takes the job back
    assert reconcile(settings)["requeued"] == 1
    assert assert_true(settings, batch_id) == {"queued": 3, "running": 1, "failed": 1, "succeeded": 1,
                                               "canceled": 2}

    assert retry_failed(settings, "acme", batch_id) == 1  # the operator's retry: failed -> queued
    assert assert_true(settings, batch_id) == {"queued": 4, "running": 1, "succeeded": 1, "canceled": 2}

    lapse(settings, claimed[5].id)
    worker = MicroBatch(settings, Storage(settings), Registry(settings).get, worker="w2@host")
    worker.run(ids)
    assert assert_true(settings, batch_id) == {"succeeded": 6, "canceled": 2}
    with session_scope(settings.database_url) as session:  # five drew 64x64 (the retried one's replaced its
        assert batch_usage(session, batch_id)["megapixels"] == pytest.approx(5 * 64 * 64 / 1e6)  # failed run's)
    # The same items again: every output comes from the identical-job cache, not the engine.
    again = client.post("/v1/batches", json={"items": items[:3]}).json()["id"]
    worker.run(ids_of(settings, again))
    assert assert_true(settings, again) == {"succeeded": 3}
    with session_scope(settings.database_url) as session:
        assert all(r["cached"] for r in session.scalars(select(Job.result).where(Job.batch_id == again)))
    body = client.get(f"/v1/batches/{batch_id}").json()
    assert body["status"] == "completed" and body["finished_at"] is not None
    assert {k: v for k, v in body["counts"].items() if v} == {"succeeded": 6, "canceled": 2}

    # Expiry and a batch cancel, on batches of their own; then DELETE leaves no batch row to drift.
    late = client.post("/v1/batches", json={"items": items[:3]}).json()["id"]
    stopped = client.post("/v1/batches", json={"items": items[:3]}).json()["id"]
    with session_scope(settings.database_url) as session:
        claim(session, ids_of(settings, late)[:1], "w3@host", settings)
        session.execute(update(Batch).where(Batch.id == late).values(expires_at=utcnow() - timedelta(seconds=1)))
    with session_scope(settings.database_url) as session:
        assert expire_overdue(session, utcnow()) == 2
    assert assert_true(settings, late) == {"running": 1, "expired": 2}
    with session_scope(settings.database_url) as session:
        assert cancel_batch(session, "acme", stopped) == 3
    assert assert_true(settings, stopped) == {"canceled": 3}
    delete_batch(settings, Storage(settings), "acme", stopped)
    with session_scope(settings.database_url) as session:
        assert session.get(Batch, stopped) is None
        assert progress.installed(session.connection()) == set(progress.TRIGGERS)


def test_counters_on_sqlite(tmp_path: Path) -> None:
    """The same triggers on the embedded database: inserts, status changes in bulk, deletes."""
    url = f"sqlite:///{tmp_path / 'step1x.db'}"
    upgrade(url)
    settings = Settings(database_url=url)
    with session_scope(url) as session:
        assert progress.installed(session.connection()) == set(progress.TRIGGERS)
        session.add(Tenant(id="acme"))
        session.flush()
        session.add(Batch(id="bat_1", tenant_id="acme", metadata_={}, total=5))
        session.flush()
        session.execute(insert(Job), [
            {"id": f"job_{i}", "tenant_id": "acme", "batch_id": "bat_1", "custom_id": f"c{i}", "kind": "generate",
             "model": "tiny-sd", "spec": {}, "seed": i, "lane": "bulk", "group_key": "k", "cost": 1,
             "status": "queued", "attempts": 0} for i in range(5)])
    assert assert_true(settings, "bat_1") == {"queued": 5}
    with session_scope(url) as session:
        session.execute(update(Job).where(Job.id.in_(["job_0", "job_1", "job_2"])).values(status="running"))
        session.execute(update(Job).where(Job.id == "job_0").values(status="succeeded"))
        session.execute(update(Job).where(Job.id == "job_1").values(status="failed", attempts=1))
        session.execute(update(Job).where(Job.id == "job_4").values(seed=99))  # no status change
        session.execute(delete(Job).where(Job.id == "job_3"))
    assert assert_true(settings, "bat_1") == {"queued": 1, "running": 1, "succeeded": 1, "failed": 1}
    with session_scope(url) as session:  # usage recorded, then replaced by a re-run on another device
        session.execute(update(Job).where(Job.id.in_(["job_0", "job_1"])).values(
            usage_megapixels=0.25, usage_steps=10, usage_compute_seconds=2.0, usage_device="cpu"))
        session.execute(update(Job).where(Job.id == "job_1").values(
            usage_megapixels=0.5, usage_steps=20, usage_compute_seconds=0.5, usage_device="cuda"))
        assert batch_usage(session, "bat_1") == {"megapixels": 0.75, "steps": 30, "compute_seconds": 2.5,
                                                 "compute_seconds_by_device": {"cpu": 2.0, "cuda": 0.5}}
    assert_true(settings, "bat_1")
    create_engine(url).dispose()
