"""The worker's store pipeline (`workers.pipeline`): a micro-batch's outputs are stored while the
next one runs, in order, within bounds, and no job is finished before its outputs exist. Real
PostgreSQL and SeaweedFS; storage is held at a gate to stand for a slow upload."""

import threading
import time
from concurrent.futures import Future
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from core.db import session_scope
from core.storage import Storage
from core.tables import Job, utcnow
from models.profiles import Registry
from tests.integration.helpers import api_client, png, upload
from workers.batch import MicroBatch
from workers.pipeline import Pipeline
from workers.reconcile import reconcile

pytestmark = pytest.mark.integration


class Crash(BaseException):
    """Stands for the process dying: nothing below catches it, as nothing survives a SIGKILL."""


class GatedStorage(Storage):
    """Uploads wait at a gate; `crash` makes the next upload kill the storing thread."""

    def __init__(self, settings):
        super().__init__(settings)
        self.gate = threading.Event()
        self.waiting = threading.Event()
        self.crash = False

    def put(self, key, data, content_type="application/octet-stream"):
        self._pass(key)
        super().put(key, data, content_type)

    def put_many(self, objects, stored=None):
        def gated():
            for item in objects:  # (key, data, content type), or a future of one
                made = item.result() if isinstance(item, Future) else item
                self._pass(made[0])
                yield made

        super().put_many(gated(), stored)

    def _pass(self, key):
        self.waiting.set()
        assert self.gate.wait(60), "the gate was never opened"
        if self.crash:
            raise Crash(key)


def batch_of(settings, prefix, count):
    client = api_client(settings)
    image = upload(client, png((32, 24)))
    items = [{"custom_id": f"{prefix}{i}", "kind": "upscale", "image": image, "model": "lanczos-x4", "cache": False}
             for i in range(count)]
    response = client.post("/v1/batches", json={"items": items})
    assert response.status_code == 202, response.text
    with session_scope(settings.database_url) as session:
        return list(session.scalars(select(Job.id).where(Job.batch_id == response.json()["id"])
                                    .order_by(Job.custom_id)))


def jobs(settings, ids):
    with session_scope(settings.database_url) as session:
        return {job.id: job for job in session.scalars(select(Job).where(Job.id.in_(ids)))}


def drained(pipeline, seconds=30):
    """Whether `drain` returned within `seconds`."""
    waiter = threading.Thread(target=pipeline.drain, daemon=True)
    waiter.start()
    waiter.join(seconds)
    return not waiter.is_alive()


def test_outputs_are_stored_in_order_within_bounds_and_finished_after(settings):
    storage = GatedStorage(settings)
    worker = MicroBatch(settings, storage, Registry(settings).get, worker="test@host")
    pipeline = Pipeline(depth=1)
    first, second = batch_of(settings, "a", 3), batch_of(settings, "b", 2)
    finished: list[list[str]] = []

    staged = worker.start(first)
    assert staged is not None and staged.images == 3
    pipeline.put(staged, lambda outcomes: finished.append([o.job.id for o in outcomes]), pytest.fail)
    assert storage.waiting.wait(30)
    # The forward pass is over and the uploads are under way: every job still runs, none is finished.
    assert {(job.status, job.finished_at) for job in jobs(settings, first).values()} == {("running", None)}

    # The next micro-batch runs its forward pass meanwhile; with the pipeline full, handing it over
    # waits for the first to be stored (back-pressure).
    handed_over = threading.Event()
    after = worker.start(second)
    assert after is not None

    def hand_over():
        pipeline.put(after, lambda outcomes: finished.append([o.job.id for o in outcomes]), pytest.fail)
        handed_over.set()

    threading.Thread(target=hand_over, daemon=True).start()
    assert not handed_over.wait(0.5), "a full pipeline took another micro-batch"
    storage.gate.set()
    assert handed_over.wait(30)
    pipeline.drain()

    assert finished == [first, second]  # stored one after the other, in the order their passes ended
    done = jobs(settings, first + second)
    assert {job.status for job in done.values()} == {"succeeded"}
    plain = Storage(settings)
    for job in done.values():
        assert job.output_keys and all(plain.exists(key) for key in job.output_keys)
    assert max(done[i].finished_at for i in first) <= min(done[i].finished_at for i in second)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the "crash"
def test_a_crash_mid_upload_loses_nothing_and_duplicates_nothing(settings):
    storage = GatedStorage(settings)
    worker = MicroBatch(settings, storage, Registry(settings).get, worker="gone@host")
    ids = batch_of(settings, "c", 2)
    staged = worker.start(ids)
    assert staged is not None
    storage.crash = True
    storage.gate.set()
    pipeline = Pipeline(depth=1)
    pipeline.put(staged, pytest.fail, pytest.fail)
    pipeline.drain()  # the storing thread died at its first upload, like a killed process

    held = jobs(settings, ids)
    assert {(job.status, job.finished_at, job.output_keys) for job in held.values()} == {("running", None, None)}
    # The process is gone, so nobody renews the leases: once they run out, the reconciler sends the
    # jobs again, and a healthy worker runs them to the end.
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.id.in_(ids)).values(lease_until=utcnow() - timedelta(seconds=1)))
    assert reconcile(settings)["requeued"] == 2
    MicroBatch(settings, Storage(settings), Registry(settings).get, worker="new@host").run(ids)

    done = jobs(settings, ids)
    assert {(job.status, job.attempts) for job in done.values()} == {("succeeded", 2)}
    plain = Storage(settings)
    tenant, batch = done[ids[0]].tenant_id, done[ids[0]].batch_id
    stored = plain.client.list_objects_v2(Bucket=plain.bucket, Prefix=f"outputs/{tenant}/{batch}/")
    outputs = sorted(obj["Key"] for obj in stored.get("Contents", []) if not obj["Key"].endswith(".webp"))
    assert outputs == sorted(key for job in done.values() for key in job.output_keys)  # one object per output


def test_the_pipeline_knows_which_jobs_still_wait_to_be_stored(settings):
    """A message naming them again meanwhile must not claim them a second time under the same worker
    name (the task drops them), so the pipeline answers which of a message's jobs it holds."""
    storage = GatedStorage(settings)
    worker = MicroBatch(settings, storage, Registry(settings).get, worker="test@host")
    ids = batch_of(settings, "d", 2)
    staged = worker.start(ids)
    assert staged is not None
    pipeline = Pipeline(depth=1)
    pipeline.put(staged, lambda outcomes: None, pytest.fail)
    assert pipeline.holding([*ids, "job_other"]) == set(ids)
    storage.gate.set()
    pipeline.drain()
    assert pipeline.holding(ids) == set()


def test_finishing_a_micro_batch_does_not_hold_up_the_next_ones_uploads(settings):
    """Two stages: while micro-batch N's finishing transaction waits (here on row locks another
    transaction holds), N+1's outputs are uploaded; N is still finished before N+1."""
    worker = MicroBatch(settings, Storage(settings), Registry(settings).get, worker="test@host")
    pipeline = Pipeline(depth=2)
    first, second = batch_of(settings, "e", 2), batch_of(settings, "f", 2)
    finished: list[list[str]] = []
    plain = Storage(settings)
    with session_scope(settings.database_url) as blocker:
        staged = worker.start(first)
        assert staged is not None
        blocker.execute(select(Job.id).where(Job.id.in_(first)).with_for_update()).all()
        pipeline.put(staged, lambda outcomes: finished.append([o.job.id for o in outcomes]), pytest.fail)
        after = worker.start(second)
        assert after is not None
        keys = [key for outcome in after.outcomes for key in outcome.output_keys]
        pipeline.put(after, lambda outcomes: finished.append([o.job.id for o in outcomes]), pytest.fail)
        deadline = time.monotonic() + 30
        while not all(plain.exists(key) for key in keys):
            assert time.monotonic() < deadline, "the next micro-batch's uploads waited for the finishing"
            time.sleep(0.05)
        assert finished == []  # the first one's finishing still waits on the locks
        assert {job.status for job in jobs(settings, first + second).values()} == {"running"}
    pipeline.drain()
    assert finished == [first, second]
    assert {job.status for job in jobs(settings, first + second).values()} == {"succeeded"}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the "crash"
def test_a_crash_while_finishing_leaves_what_follows_to_the_reconciler(settings):
    """The finishing thread dies (as with its process): the micro-batch behind it is uploaded but
    not finished, its heartbeat stops so the leases lapse, and nothing waits for it forever."""
    worker = MicroBatch(settings, Storage(settings), Registry(settings).get, worker="gone@host")
    pipeline = Pipeline(depth=2)
    first, second = batch_of(settings, "g", 2), batch_of(settings, "h", 2)
    staged = worker.start(first)
    assert staged is not None

    def crash() -> list:
        staged.abandon()  # what the real finish does first: its heartbeat stops
        raise Crash("finishing")

    staged.finish = crash  # type: ignore[method-assign]
    pipeline.put(staged, pytest.fail, pytest.fail)
    after = worker.start(second)
    assert after is not None
    pipeline.put(after, pytest.fail, pytest.fail)
    assert drained(pipeline), "a micro-batch waits forever on the dead stage"

    assert pipeline.holding(first + second) == set()
    assert not after._heartbeat._thread.is_alive()  # its leases lapse
    held = jobs(settings, first + second)
    assert {(job.status, job.finished_at) for job in held.values()} == {("running", None)}
    # A micro-batch handed over after the crash is left the same way at once.
    later = worker.start(batch_of(settings, "i", 1))
    assert later is not None
    pipeline.put(later, pytest.fail, pytest.fail)
    assert drained(pipeline)
    assert not later._heartbeat._thread.is_alive()


def test_jobs_are_never_finished_before_their_uploads(settings):
    worker = MicroBatch(settings, Storage(settings), Registry(settings).get, worker="test@host")
    ids = batch_of(settings, "j", 1)
    staged = worker.start(ids)
    assert staged is not None
    with pytest.raises(RuntimeError, match="not uploaded"):
        staged.finish()
    assert {(job.status, job.finished_at) for job in jobs(settings, ids).values()} == {("running", None)}
    assert not staged._heartbeat._thread.is_alive()  # the leases lapse: the reconciler runs them again
