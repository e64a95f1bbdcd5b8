"""Retry accounting, dead-worker recovery, cancel of running work, progress, replayed submissions
and the reconciler's visibility, in-process against real PostgreSQL, Redis and SeaweedFS."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import redis
from sqlalchemy import select, update

from core.db import session_scope
from core.storage import Storage
from core.tables import Batch, Job, ReconcilerRun, WorkerRow, utcnow
from models.profiles import Registry
from tests.integration.helpers import api_client, png, upload
from workers import telemetry
from workers.batch import MicroBatch, Outcome, claim, finish
from workers.engine_host import HostedRegistry
from workers.reconcile import reconcile
from workers.registry import Presence, rss_bytes

pytestmark = pytest.mark.integration


def batch_of(client, items, **headers):
    response = client.post("/v1/batches", json={"items": items}, headers=headers)
    assert response.status_code in (200, 202), response.text
    return response.json()["id"]


def job_ids(settings, batch_id):
    with session_scope(settings.database_url) as session:
        return list(session.scalars(select(Job.id).where(Job.batch_id == batch_id).order_by(Job.custom_id)))


def job(settings, job_id):
    with session_scope(settings.database_url) as session:
        return session.get(Job, job_id)


def upscales(settings, client, count=1):
    image = upload(client, png())
    batch_id = batch_of(client, [{"custom_id": f"u{i}", "kind": "upscale", "image": image, "model": "lanczos-x4",
                                  "cache": False} for i in range(count)])
    return batch_id, job_ids(settings, batch_id)


def seeing_for_long(settings):
    """The reconciler has run without a gap for an hour: it may judge heartbeats."""
    with session_scope(settings.database_url) as session:
        session.merge(ReconcilerRun(name="reconciler", ran_at=utcnow(),
                                  report={"seeing_since": (utcnow() - timedelta(hours=1)).isoformat()}))


def worker_row(settings, name, heartbeat_age, current=None):
    with session_scope(settings.database_url) as session:
        session.add(WorkerRow(name=name, host="h", pid=1, device="cpu", queues=[], profiles=[], current=current,
                              heartbeat_at=utcnow() - timedelta(seconds=heartbeat_age)))


def test_a_run_cut_short_before_its_hand_back_is_taken_over_without_a_charge(settings):
    _, [job_id] = upscales(settings, api_client(settings))
    with session_scope(settings.database_url) as session:
        [first] = claim(session, [job_id], "w1", settings)
        assert claim(session, [job_id], "w2", settings) == []  # a duplicate message: skipped, nothing charged
        [second] = claim(session, [job_id], "w2", settings, interrupted={job_id: first.claims})
    assert (second.attempts, second.claims) == (1, 2)
    assert job(settings, job_id).attempts == 1
    finish(settings, [Outcome(first, error="late")])  # the interrupted run cannot finish over the new one
    assert job(settings, job_id).status == "running"


def test_the_reconciler_recovers_a_dead_workers_jobs_before_their_lease_ends(settings):
    _, [dead_job, abandoned_job, busy_job, replaced_job] = upscales(settings, api_client(settings), 4)
    worker_row(settings, "dead@h", heartbeat_age=settings.worker_dead_after + 5)
    worker_row(settings, "live@h", heartbeat_age=0, current={"job_ids": [busy_job]})
    with session_scope(settings.database_url) as session:
        claim(session, [dead_job], "dead@h", settings)
        claim(session, [abandoned_job, busy_job], "live@h", settings)
        claim(session, [replaced_job], "restarted@h", settings)
        session.execute(update(Job).where(Job.id.in_([abandoned_job, busy_job]))
                        .values(lease_until=utcnow() - timedelta(seconds=1)))
    worker_row(settings, "restarted@h", heartbeat_age=0)  # a new process under the same name since the claim
    redis.Redis.from_url(settings.redis_url).flushdb()
    # Its first pass cannot tell a dead worker from one it has not heard yet.
    assert reconcile(settings)["requeued"] == 0
    seeing_for_long(settings)
    assert reconcile(settings)["requeued"] == 3
    # The dead worker's job is charged (the item may have killed it); the live worker's abandoned run
    # (its hand-back was lost to infrastructure trouble) is not; the job in the live worker's hands stays.
    for lost in (dead_job, replaced_job):
        assert (job(settings, lost).status, job(settings, lost).attempts) == ("queued", 1)
    assert (job(settings, abandoned_job).status, job(settings, abandoned_job).attempts) == ("queued", 0)
    assert job(settings, busy_job).status == "running"
    assert redis.Redis.from_url(settings.redis_url).llen("bulk.lanczos-x4") >= 1  # sent again at once


@pytest.mark.parametrize("engine_process", [False, True])
def test_the_heartbeat_records_the_worker_and_its_shutdown(settings, engine_process):
    """With the engine process the device is that process's, asked of it (this one never touches
    the GPU), and its memory is added to the worker's."""
    fast = settings.model_copy(update={"heartbeat_interval": 0.1, "engine_process": engine_process})
    presence = Presence(fast, "cpu@test", ["interactive", "bulk"])
    presence.profiles = lambda: ["lanczos-x4"]
    engines = HostedRegistry(fast)
    if engine_process:
        engines.host()
        presence.engine_status = engines.status
        assert engines.status() is not None  # waits for the engine process to be up
    presence.start()
    held = presence.hold(["job_a", "job_b"], "lanczos-x4")
    deadline = time.monotonic() + 10
    while True:  # a beat (every 0.1 s) that has seen the hold
        with session_scope(settings.database_url) as session:
            row = session.get(WorkerRow, "cpu@test")
            if row is not None and row.current is not None:
                break
        assert time.monotonic() < deadline, "no beat recorded the micro-batch in hand"
        time.sleep(0.05)
    with session_scope(settings.database_url) as session:
        row = session.get(WorkerRow, "cpu@test")
        assert (row.device, row.queues, row.profiles) == ("cpu", ["interactive", "bulk"], ["lanczos-x4"])
        assert row.current["job_ids"] == ["job_a", "job_b"] and row.current["model"] == "lanczos-x4"
        assert row.rss_bytes > 10_000_000 and row.stopped_at is None
        assert (utcnow() - row.heartbeat_at).total_seconds() < 2
        if engine_process:
            status = engines.status()
            assert status is not None and status["device"] == "cpu" and status["rss_bytes"] > 10_000_000
            assert row.rss_bytes > status["rss_bytes"]  # both processes
    # This process's gauges and memory samples (workers.telemetry) carry the last beat's figures:
    # with an engine process, both processes' memory, not this one's alone.
    rss, gpu = telemetry.worker_memory(presence)
    assert rss > 10_000_000 and gpu == 0.0
    if engine_process:
        assert rss > (rss_bytes() or 0) and rss > status["rss_bytes"]
    presence.let_go(held)
    presence.images_done = 7
    presence.stop()
    engines.close()
    with session_scope(settings.database_url) as session:
        row = session.get(WorkerRow, "cpu@test")
        assert (row.current, row.images_done) == (None, 7) and row.stopped_at is not None


def slow_generation(settings, client, count):
    items = [{"custom_id": f"g{i}", "kind": "generate", "prompt": f"p{i}", "width": 64, "height": 64,
              "steps": 150, "seed": i} for i in range(count)]
    return batch_of(client, items)


def run_in_thread(settings, ids):
    fast = settings.model_copy(update={"progress_interval": 0.2})
    worker = MicroBatch(fast, Storage(settings), Registry(settings).get, worker="test@host")
    outcomes: list = []
    thread = threading.Thread(target=lambda: outcomes.extend(worker.run(ids)))
    thread.start()
    return thread, outcomes


def wait_progress(settings, job_id, timeout=120):
    deadline = time.monotonic() + timeout
    while (progress := job(settings, job_id).progress) == 0:
        assert time.monotonic() < deadline, "no progress recorded"
        time.sleep(0.05)
    return progress


def outputs_in_bucket(settings):
    listed = Storage(settings).client.list_objects_v2(Bucket=settings.s3_bucket, Prefix="outputs/")
    return [obj["Key"] for obj in listed.get("Contents", [])]


def test_cancel_stops_a_running_batch_at_the_next_step_and_uploads_nothing(settings):
    client = api_client(settings)
    batch_id = slow_generation(settings, client, 16)  # a full micro-batch: about 1 s warm on 2 cores
    ids = job_ids(settings, batch_id)
    thread, outcomes = run_in_thread(settings, ids)
    progress = wait_progress(settings, ids[0])
    assert 0 < progress < 1
    assert client.get(f"/v1/jobs/{ids[0]}").json()["progress"] == pytest.approx(job(settings, ids[0]).progress)
    # The batch's progress moves within its running jobs, before any of them ends.
    batch = client.get(f"/v1/batches/{batch_id}").json()
    assert batch["counts"]["running"] == 16 and 0 < batch["progress"] < 1
    assert client.post(f"/v1/batches/{batch_id}/cancel").status_code == 200
    thread.join(60)
    assert not thread.is_alive(), "the run did not stop after its cancel"
    # Every outcome canceled means the engine stopped mid-run (a finished run would have images).
    assert [o.status for o in outcomes] == ["canceled"] * 16
    assert outputs_in_bucket(settings) == []
    out = client.get(f"/v1/jobs/{ids[0]}").json()
    assert (out["status"], out["error_code"], out["retryable"], out["outputs"]) == ("canceled", "canceled", False, [])


def test_canceling_one_job_of_a_running_micro_batch_keeps_the_others(settings):
    client = api_client(settings)
    # Eight images each at the most steps: a pass of about 2 s, so the cancel lands in it.
    items = [{"custom_id": f"g{i}", "kind": "generate", "prompt": f"p{i}", "width": 64, "height": 64,
              "steps": 150, "num_images": 8, "seed": i} for i in range(2)]
    ids = job_ids(settings, batch_of(client, items))
    thread, outcomes = run_in_thread(settings, ids)
    wait_progress(settings, ids[0])
    assert client.post(f"/v1/jobs/{ids[1]}/cancel").status_code == 200
    thread.join(120)
    assert {o.job.id: o.status for o in outcomes} == {ids[0]: "succeeded", ids[1]: "canceled"}
    assert job(settings, ids[1]).status == "canceled"
    keys = outputs_in_bucket(settings)
    assert len(keys) == 8 and all(ids[0] in key for key in keys)  # nothing of the canceled job was uploaded


def test_a_replayed_submission_dispatches_what_its_first_try_left_unsent(settings):
    client = api_client(settings)
    image = upload(client, png())
    items = [{"custom_id": "a", "kind": "upscale", "image": image, "model": "lanczos-x4"}]
    batch_id = batch_of(client, items, **{"Idempotency-Key": "k1"})
    broker = redis.Redis.from_url(settings.redis_url)
    # As if the API had died between the commit and the dispatch.
    broker.flushdb()
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.batch_id == batch_id).values(dispatched_at=None))
        session.execute(update(Batch).where(Batch.id == batch_id).values(dispatched_at=None))
    assert batch_of(client, items, **{"Idempotency-Key": "k1"}) == batch_id
    assert broker.llen("bulk.lanczos-x4") == 1
    assert all(job(settings, j).dispatched_at is not None for j in job_ids(settings, batch_id))


def test_readyz_reports_a_missing_or_stale_reconciler(settings):
    client = api_client(settings)
    assert client.get("/readyz").json()["checks"]["reconciler"] == "ok"  # a stack just started: its grace
    client.app.state.first_readiness_probe = time.monotonic() - 3600  # an hour on, still never ran
    response = client.get("/readyz")
    assert response.status_code == 503 and "never ran" in response.json()["checks"]["reconciler"]
    reconcile(settings)
    assert client.get("/readyz").json()["checks"]["reconciler"] == "ok"
    with session_scope(settings.database_url) as session:
        session.execute(update(ReconcilerRun).values(ran_at=utcnow() - timedelta(minutes=10)))
    response = client.get("/readyz")
    assert response.status_code == 503 and "last ran 600 s ago" in response.json()["checks"]["reconciler"]
