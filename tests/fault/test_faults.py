"""Faults injected into a running stack (API, CPU worker and control process in processes; real
PostgreSQL, Redis and SeaweedFS), each followed by the same invariants (`check_invariants`).

Settings are time-scaled (tests/stack.py FAST): heartbeats every 0.5 s, a worker silent for 3 s is
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


def slow_batch_running(stack, count: int, steps: int = 20) -> tuple[dict, set[str]]:
    """A batch of slower generations, returned once the worker is in its forward pass (progress
    recorded), with the ids in its hands."""
    batch = stack.client.create_batch(generation(count, steps))
    wait_until(lambda: any(job.progress > 0 for job in jobs(stack.settings)), 90, "the forward pass", stack)
    return batch, {job.id for job in jobs(stack.settings) if job.status == JobStatus.RUNNING}


def first_done(stack) -> bool:
    return any(job.status == JobStatus.SUCCEEDED for job in jobs(stack.settings))


def test_a_pool_process_killed_mid_batch(stack):
    batch, held = slow_batch_running(stack, 4)
    killed_at = now()
    stack.kill_pool_child()
    recovered = wait_until(lambda: claimed_since(stack.settings, killed_at, held), 60, "the re-run", stack)
    stack.client.wait_batch(batch["id"], timeout=180)
    rows = check_invariants(stack.settings, max_claims=2, max_attempts=2)
    assert {job.attempts for job in rows if job.id in held} == {2}  # the killed run counts, once
    report("pool process killed mid-batch", f"its jobs running again {recovered:.1f} s after the kill")


def test_a_worker_killed_whole_and_replaced(stack):
    """A lost machine: the unacked message stays in Redis for the visibility timeout (an hour); the
    heartbeat is what tells, and the jobs run again on the replacement well within 60 s."""
    batch, held = slow_batch_running(stack, 4)
    killed_at = now()
    stack.kill_worker()
    stack.start_worker()
    recovered = wait_until(lambda: claimed_since(stack.settings, killed_at, held), 60, "the re-run", stack)
    stack.client.wait_batch(batch["id"], timeout=180)
    check_invariants(stack.settings, max_claims=2, max_attempts=2)
    assert recovered < 60
    report("worker killed whole", f"its jobs running again {recovered:.1f} s after the kill "
                                  "(replacement start included)")


def test_redis_restarted_empty_then_flushed_with_a_backlog(stack, restart_redis, redis_service):
    batch = stack.client.create_batch(generation(48, 1))  # three micro-batches: a backlog behind the first
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
def test_s3_down_for_more_interruptions_than_attempts(stack, stop_s3):
    """Three interrupted runs used to use up a job's three attempts and fail it: here the outage
    interrupts its micro-batch more often than that, and every job still succeeds, charged once."""
    batch = stack.client.create_batch(generation(48, 2))
    wait_until(lambda: first_done(stack), 90, "the first micro-batch", stack)  # the next is in hand now
    with stop_s3():
        time.sleep(12)
    back = now()
    recovered = wait_until(lambda: claimed_since(stack.settings, back) or all_terminal(stack.settings), 60,
                           "work after the outage", stack)
    stack.client.wait_batch(batch["id"], timeout=180)
    rows = check_invariants(stack.settings, max_claims=20, max_attempts=1)  # not one attempt charged
    interrupted = max(job.claims for job in rows) - 1
    assert interrupted >= stack.settings.max_attempts, "the outage interrupted too little to prove anything"
    report("S3 down 12 s", f"work flowing again {recovered:.1f} s after S3 was back; a micro-batch "
           f"interrupted {interrupted} times, every job charged 1 attempt")


def test_postgres_restarted_mid_batch(stack, stop_postgres):
    batch = stack.client.create_batch(generation(48, 2))
    wait_until(lambda: first_done(stack), 90, "the first micro-batch", stack)  # the next is in hand now
    with stop_postgres():
        time.sleep(6)  # longer than a micro-batch: the one in hand cannot record its end
    back = now()
    recovered = wait_until(lambda: claimed_since(stack.settings, back) or all_terminal(stack.settings), 60,
                           "work after the restart", stack)
    stack.client.wait_batch(batch["id"], timeout=180)
    rows = check_invariants(stack.settings, max_claims=12, max_attempts=1)
    assert max(job.claims for job in rows) >= 2, "the restart interrupted nothing"
    report("PostgreSQL down 6 s", f"work flowing again {recovered:.1f} s after it was back; "
           f"{max(job.claims for job in rows) - 1} interrupted runs at most, every job charged 1 attempt")


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
