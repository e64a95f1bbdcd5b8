"""Faults injected into a running stack (API, CPU worker and control process in processes; real
PostgreSQL, Redis and SeaweedFS), each followed by the same invariants (`check_invariants`).

Settings are time-scaled (tests/stack.py FAST): heartbeats every 0.5 s, a worker silent for 8 s is
dead, the reconciler runs every second, infrastructure retries back off from 0.5 s to 2 s. Leases
are 60 s, longer than every fault here, so no recovery below waits for a lease to expire.
"""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import redis
from sqlalchemy import select

from core.db import session_scope
from core.status import JobStatus
from core.tables import IdempotencyKey, Job
from tests.fault.conftest import (
    all_terminal,
    check_invariants,
    claimed_since,
    frozen,
    generation,
    jobs,
    now,
    report,
    running_count,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.fault]


def slow_batch_running(stack, prefix: str, count: int = 16, steps: int = 150) -> tuple[dict, set[str]]:
    """A batch of slower generations, returned once the worker is in its forward pass (progress
    recorded, not finished), with the ids in its hands. A full micro-batch at the most steps: its
    pass lasts about 2 s on one torch thread, time for a fault to land in it (four images lasted about
    half a second in all)."""
    batch = stack.client.create_batch(generation(count, steps, prefix))

    def in_pass() -> bool:
        return any(job.status == JobStatus.RUNNING and job.progress > 0 and job.batch_id == batch["id"]
                   for job in jobs(stack.settings))

    wait_until(in_pass, 90, "the forward pass", stack)
    return batch, {job.id for job in jobs(stack.settings) if job.status == JobStatus.RUNNING}


def test_workers_killed_mid_batch(stack):
    """First the pool process dies (SIGKILL) and Celery redelivers its message; then the whole worker
    dies, a lost machine: its unacked message stays in Redis for the visibility timeout (an hour),
    the silent heartbeat is what tells, and the jobs run again on the replacement within 60 s."""
    batch, held = slow_batch_running(stack, "a")
    killed_at = now()
    stack.kill_pool_child()
    child = wait_until(lambda: claimed_since(stack.settings, killed_at, held), 60, "the re-run", stack)
    stack.client.wait_batch(batch["id"], timeout=180)
    report("pool process killed mid-batch", f"its jobs running again {child:.1f} s after the kill")

    batch, also_held = slow_batch_running(stack, "b")
    killed_at = now()
    stack.kill_worker()
    stack.start_worker()
    whole = wait_until(lambda: claimed_since(stack.settings, killed_at, also_held), 60, "the re-run", stack)
    stack.client.wait_batch(batch["id"], timeout=180)
    report("worker killed whole", f"its jobs running again {whole:.1f} s after the kill "
                                  "(replacement start included)")

    rows = check_invariants(stack.settings, max_claims=2, max_attempts=2)
    assert {job.attempts for job in rows if job.id in held | also_held} == {2}  # each killed run counts, once
    assert {job.attempts for job in rows if job.id not in held | also_held} <= {1}


def test_redis_restarted_empty_then_flushed_with_a_backlog(stack, restart_redis, redis_service):
    batch = stack.client.create_batch(generation(64, 10))  # four micro-batches: a backlog behind the first
    wait_until(lambda: running_count(stack.settings) > 0, 90, "the batch to start", stack)
    with restart_redis():
        time.sleep(1)
    back = now()
    restarted = wait_until(lambda: claimed_since(stack.settings, back), 60, "work after the restart", stack)
    wait_until(lambda: running_count(stack.settings) > 0, 60, "a micro-batch running", stack)
    redis.Redis.from_url(redis_service.url).flushall()
    flushed = now()
    after_flush = wait_until(lambda: claimed_since(stack.settings, flushed) or all_terminal(stack.settings),
                             60, "work after the flush", stack)
    stack.client.wait_batch(batch["id"], timeout=180)
    check_invariants(stack.settings, max_claims=2, max_attempts=2)
    report("redis restarted without persistence, then FLUSHALL", f"work flowing again {restarted:.1f} s after "
           f"the restart and {after_flush:.1f} s after the flush")


@pytest.mark.parametrize("stack", [{"S3_MAX_ATTEMPTS": "2"}], indirect=True)
def test_storage_and_database_outages(stack, stop_s3, stop_postgres):
    """S3 stays down until a micro-batch was interrupted as often as a job has attempts (three
    interrupted runs used to use them up and fail it); then PostgreSQL stays down from inside a
    forward pass until that run has failed to record its end and to hand its jobs back: the retry
    takes that run over. Every job succeeds, charged one attempt."""
    settings = stack.settings
    warm = stack.client.create_batch(generation(4, 2, "w"))  # the model loaded, before anything is down
    stack.client.wait_batch(warm["id"], timeout=180)
    down = time.monotonic()
    with stop_s3():
        # Sent while S3 is down: however fast the forward passes, every micro-batch meets the outage
        # when it stores (the worker stores a micro-batch while the next one runs).
        batch = stack.client.create_batch(generation(48, 2, "s"))
        # Down until a run was interrupted as often as a job has attempts, however fast this machine is
        # (the database is up: each interrupted run is handed back, and its claim counted).
        wait_until(lambda: max(job.claims for job in jobs(settings)) > settings.max_attempts, 120,
                   "enough interruptions", stack)
    outage, back = time.monotonic() - down, now()
    s3 = wait_until(lambda: claimed_since(settings, back) or all_terminal(settings), 60, "work after S3", stack)
    stack.client.wait_batch(batch["id"], timeout=180)
    s3_runs = max(job.claims for job in jobs(settings))
    assert s3_runs - 1 >= settings.max_attempts, "the outage interrupted too little to prove anything"
    report(f"S3 down {outage:.0f} s", f"work flowing again {s3:.1f} s after S3 was back; a micro-batch "
           f"interrupted {s3_runs - 1} times, every job charged 1 attempt")

    batch, held = slow_batch_running(stack, "p")
    down = time.monotonic()
    with stop_postgres():
        # Down until the forward pass has ended and failed to record its end or hand its jobs back.
        wait_until(lambda: "could not hand back" in stack.log("cpu", 10**7), 120, "the failed hand-back", stack)
    outage, back = time.monotonic() - down, now()
    pg = wait_until(lambda: claimed_since(settings, back, held), 60, "the interrupted run taken over", stack)
    stack.client.wait_batch(batch["id"], timeout=180)
    assert {job.claims for job in jobs(settings) if job.id in held} == {2}  # taken over once, uncharged
    report(f"PostgreSQL down {outage:.0f} s", f"the micro-batch it interrupted taken over {pg:.1f} s after it "
           "was back, uncharged")

    check_invariants(settings, max_claims=20, max_attempts=1)


@pytest.mark.parametrize("stack", [{"NEVER_SENT_AFTER": "600"}], indirect=True)
def test_the_api_killed_at_the_commit_and_the_submission_replayed(stack, redis_service):
    """The API dies after storing a batch, while it sends the batch's messages (Redis hangs at that
    moment). The reconciler would wait 10 minutes for such jobs here: the replay sends them."""
    items = generation(40, 1)
    key = "catalog-2026-11-28"
    settings = stack.settings
    with frozen(redis_service):
        attempt = threading.Thread(target=submit_until_killed, args=(stack, items, key))
        attempt.start()

        def committed() -> bool:
            with session_scope(settings.database_url) as session:
                return session.scalar(select(IdempotencyKey.resource_id)) is not None

        wait_until(committed, 60, "the submission's commit", stack)
        stack.kill_api()
    attempt.join(30)
    assert all(job.dispatched_at is None for job in jobs(settings))  # stored, never sent
    stack.start_api()
    replayed_at = time.monotonic()
    batch = stack.client.create_batch(items, idempotency_key=key)
    with session_scope(settings.database_url) as session:
        assert session.scalar(select(IdempotencyKey.resource_id)) == batch["id"]
        assert session.scalar(select(Job.id).where(Job.dispatched_at.is_(None))) is None
    stack.client.wait_batch(batch["id"], timeout=180)
    recovered = time.monotonic() - replayed_at
    check_invariants(settings, max_claims=1, max_attempts=1)
    report("API killed at the commit, replayed", f"all 40 jobs done {recovered:.1f} s after the replay")


def submit_until_killed(stack, items, key) -> None:
    with contextlib.suppress(Exception):  # the API is killed under this request: its connection breaks
        stack.client.create_batch(items, idempotency_key=key)
