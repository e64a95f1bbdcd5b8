"""The worker's micro-batch path (claim -> run -> store -> finish) and the reconciler, in-process,
against real PostgreSQL, Redis and SeaweedFS."""

import io
import json
import threading
import time
from concurrent.futures import Future
from dataclasses import replace
from datetime import timedelta

import httpx
import pytest
import redis
from PIL import Image
from sqlalchemy import select, update

from core import thumbs
from core.db import session_scope
from core.status import ErrorCode, JobStatus
from core.storage import ObjectError, Storage, input_key
from core.tables import Batch, File, Job, utcnow
from core.thumbs import input_thumb_key, thumb_key
from models.profiles import Registry
from tests.integration.helpers import api_client, mask_png, png, upload
from workers.batch import Heartbeat, Interrupted, MicroBatch, Outcome, claim, finish, release
from workers.progress import Watch
from workers.reconcile import reconcile

pytestmark = pytest.mark.integration


@pytest.fixture
def worker(settings):
    storage = Storage(settings)
    return MicroBatch(settings, storage, Registry(settings).get, worker="test@host")


def one_upscale(settings, client):
    """A batch of one Lanczos upscale: (batch id, job id)."""
    batch_id = submit(client, [{"custom_id": "up", "kind": "upscale", "image": upload(client, png()),
                                "model": "lanczos-x4"}])
    [job_id] = [j.id for j in jobs_of(settings, batch_id).values()]
    return batch_id, job_id


def expire_lease(settings, job_id):
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(lease_until=utcnow() - timedelta(seconds=1)))


def jobs_of(settings, batch_id):
    with session_scope(settings.database_url) as session:
        return {j.custom_id: j for j in session.scalars(select(Job).where(Job.batch_id == batch_id))}


def submit(client, items):
    response = client.post("/v1/batches", json={"items": items})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def test_a_micro_batch_runs_stores_and_finishes(settings, worker):
    client = api_client(settings)
    image, mask, empty = upload(client, png((96, 64))), upload(client, mask_png()), upload(client, mask_png(empty=True))
    with session_scope(settings.database_url) as session:  # as if uploaded before coverage was measured,
        session.execute(update(File).where(File.id == empty).values(mask_coverage=None))  # so submit lets it by
    batch_id = submit(client, [
        {"custom_id": "fill", "kind": "inpaint", "mode": "fill", "image": image, "mask": mask},
        {"custom_id": "empty", "kind": "inpaint", "mode": "fill", "image": image, "mask": empty},
        {"custom_id": "up", "kind": "upscale", "image": image, "model": "lanczos-x4"},
        {"custom_id": "gen", "kind": "generate", "prompt": "a mug", "width": 96, "height": 72, "steps": 2,
         "num_images": 2},
    ])
    ids = [j.id for j in jobs_of(settings, batch_id).values()]
    outcomes = worker.run(ids)
    assert len(outcomes) == 4
    jobs = jobs_of(settings, batch_id)
    assert {k: j.status for k, j in jobs.items()} == {"fill": "succeeded", "empty": "failed", "up": "succeeded",
                                                      "gen": "succeeded"}
    assert "mask is empty" in jobs["empty"].error
    assert (jobs["empty"].error_code, jobs["empty"].retryable) == ("invalid_input", False)
    assert jobs["up"].progress == 1.0 and jobs["up"].error_code is None
    storage = Storage(settings)
    sizes = {"fill": (96, 64), "up": (384, 256), "gen": (96, 72)}
    for name, size in sizes.items():
        for key in jobs[name].output_keys:
            assert key.startswith(f"outputs/{jobs[name].tenant_id}/{batch_id}/{jobs[name].id}")
            decoded = Image.open(io.BytesIO(storage.get(key)))
            assert (decoded.format, decoded.size) == ("PNG", size)
    assert len(jobs["gen"].output_keys) == 2
    assert jobs["gen"].result["seeds"] == [jobs["gen"].seed, jobs["gen"].seed + 1]
    assert jobs["fill"].timings["run"] >= 0 and jobs["fill"].attempts == 1
    batch = client.get(f"/v1/batches/{batch_id}").json()
    assert batch["status"] == "completed" and batch["counts"]["succeeded"] == 3 and batch["progress"] == 1.0
    lines = client.get(f"/v1/batches/{batch_id}/results").text.splitlines()
    results = {r["custom_id"]: r for r in map(json.loads, lines)}
    assert results["empty"]["status"] == "failed" and "mask is empty" in results["empty"]["error"]
    fetched = httpx.get(results["up"]["url"])  # presigned URL, checked by the real S3 server
    assert fetched.status_code == 200
    assert Image.open(io.BytesIO(fetched.content)).size == (384, 256)


def test_a_micro_batch_reads_its_inputs_together_and_a_missing_one_fails_its_job_alone(settings, worker):
    client = api_client(settings)
    images = [upload(client, png((32, 24), seed=i)) for i in range(4)]
    batch_id = submit(client, [{"custom_id": f"up{i}", "kind": "upscale", "image": image, "model": "lanczos-x4"}
                               for i, image in enumerate(images)])
    jobs = jobs_of(settings, batch_id)
    storage = Storage(settings)
    storage.delete(input_key(jobs["up3"].tenant_id, images[3]))  # its bytes are gone since it was accepted
    readers: list[str] = []
    real_get = worker.storage.get

    def get(key: str) -> bytes:  # the real S3 read, noting which thread made it
        readers.append(threading.current_thread().name)
        return real_get(key)

    worker.storage.get = get
    worker.run([j.id for j in jobs.values()])
    jobs = jobs_of(settings, batch_id)
    assert {k: j.status for k, j in jobs.items()} == {"up0": "succeeded", "up1": "succeeded", "up2": "succeeded",
                                                      "up3": "failed"}
    assert jobs["up3"].error_code == "invalid_input" and images[3] in jobs["up3"].error
    # Read together on the input threads; only the missing one was asked for again by its job.
    assert sum(name.startswith("inputs") for name in readers) == 4 and len(readers) == 5
    for name in ("up0", "up1", "up2"):
        [key] = jobs[name].output_keys
        assert Image.open(io.BytesIO(storage.get(key))).size == (128, 96)


def test_a_redelivered_message_does_not_run_jobs_twice(settings, worker):
    batch_id, job_id = one_upscale(settings, api_client(settings))
    with session_scope(settings.database_url) as session:
        assert [c.id for c in claim(session, [job_id], "first", settings)] == [job_id]
        assert claim(session, [job_id], "first", settings)[0].attempts == 2  # its own dead attempt
    assert worker.run([job_id]) == []  # held by another worker under a live lease: skipped
    expire_lease(settings, job_id)
    [outcome] = worker.run([job_id])  # lease expired: the worker died; taken over
    assert outcome.status == "succeeded"
    job = jobs_of(settings, batch_id)["up"]
    assert (job.status, job.attempts, job.worker) == ("succeeded", 3, "test@host")
    assert worker.run([job_id]) == []  # finished jobs are never claimed again


def test_a_stale_attempt_cannot_overwrite_a_newer_one(settings, worker):
    batch_id, job_id = one_upscale(settings, api_client(settings))
    with session_scope(settings.database_url) as session:
        [stale] = claim(session, [job_id], "old", settings)
    expire_lease(settings, job_id)
    worker.run([job_id])
    finish(settings, [Outcome(stale, status=JobStatus.FAILED, error="late and wrong")])
    job = jobs_of(settings, batch_id)["up"]
    assert (job.status, job.error) == ("succeeded", None)


@pytest.mark.parametrize("one_statement", [True, False])
def test_finishing_records_every_kind_of_outcome_the_same_either_way(settings, one_statement):
    """PostgreSQL finishes a micro-batch with one UPDATE reading a JSON document, SQLite with an UPDATE per job
    (`workers.batch.record`): on the same database both must record the same rows and counters."""
    client = api_client(settings)
    image = upload(client, png())
    batch_id = submit(client, [{"custom_id": c, "kind": "upscale", "image": image, "model": "lanczos-x4"}
                               for c in ("ok", "bad", "canceled", "stale")])
    jobs = jobs_of(settings, batch_id)
    with session_scope(settings.database_url) as session:
        claimed = {c.custom_id: c for c in claim(session, [j.id for j in jobs.values()], "w@host", settings)}
    with session_scope(settings.database_url) as session:  # canceled meanwhile: stays canceled
        session.execute(update(Job).where(Job.id == claimed["canceled"].id).values(status=JobStatus.CANCELED))
    ok = Outcome(claimed["ok"], output_keys=["outputs/a.png", "outputs/b.png"], timings={"run": 0.25},
                 result={"seeds": [7], "cached": False}, fingerprint="f" * 64)
    ok.usage.megapixels, ok.usage.steps, ok.usage.compute_seconds, ok.usage.device = 0.5, 0, 0.25, "cpu"
    bad = Outcome(claimed["bad"], timings={"run": 0.1})
    bad.fail(ErrorCode.INVALID_INPUT, "image: cannot decode input")
    stale = Outcome(replace(claimed["stale"], claims=claimed["stale"].claims - 1))  # an older attempt

    finish(settings, [ok, bad, Outcome(claimed["canceled"]), stale], one_statement)

    jobs = jobs_of(settings, batch_id)
    assert (jobs["ok"].status, jobs["ok"].output_keys, jobs["ok"].result, jobs["ok"].timings) == (
        "succeeded", ["outputs/a.png", "outputs/b.png"], {"seeds": [7], "cached": False}, {"run": 0.25})
    assert (jobs["ok"].fingerprint, jobs["ok"].usage_megapixels, jobs["ok"].usage_device) == ("f" * 64, 0.5, "cpu")
    assert (jobs["ok"].progress, jobs["ok"].lease_until, jobs["ok"].error) == (1.0, None, None)
    assert (jobs["bad"].status, jobs["bad"].error_code, jobs["bad"].retryable, jobs["bad"].output_keys) == (
        "failed", "invalid_input", False, None)
    assert jobs["bad"].error == "image: cannot decode input" and jobs["bad"].progress == 0.0
    assert jobs["canceled"].status == "canceled" and jobs["canceled"].finished_at is None
    assert jobs["stale"].status == "running"  # fenced on the claim
    with session_scope(settings.database_url) as session:
        batch = session.get(Batch, batch_id)
        assert batch is not None
        assert (batch.succeeded_count, batch.failed_count, batch.canceled_count, batch.running_count) == (1, 1, 1, 1)


def test_identical_jobs_reuse_the_stored_output(settings, worker):
    client = api_client(settings)
    image = upload(client, png())
    item = {"kind": "upscale", "image": image, "model": "lanczos-x4", "seed": 1}
    first = submit(client, [{"custom_id": "a", **item}])
    worker.run([j.id for j in jobs_of(settings, first).values()])
    second = submit(client, [{"custom_id": "b", **item}, {"custom_id": "c", **item, "cache": False}])
    worker.run([j.id for j in jobs_of(settings, second).values()])
    jobs = jobs_of(settings, second)
    assert jobs["b"].result["cached"] is True and jobs["c"].result["cached"] is False
    storage = Storage(settings)
    original = storage.get(jobs_of(settings, first)["a"].output_keys[0])
    assert storage.get(jobs["b"].output_keys[0]) == original
    assert jobs["b"].output_keys[0] != jobs_of(settings, first)["a"].output_keys[0]


def test_reconciler_requeues_lost_jobs_and_gives_up_after_max_attempts(settings, worker):
    client = api_client(settings)
    image = upload(client, png())
    batch_id = submit(client, [{"custom_id": c, "kind": "upscale", "image": image, "model": "lanczos-x4",
                                "cache": False} for c in ("lost", "doomed")])
    jobs = jobs_of(settings, batch_id)
    broker = redis.Redis.from_url(settings.redis_url)
    broker.flushdb()  # the broker lost every message
    past = utcnow() - timedelta(seconds=1)
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.id == jobs["lost"].id).values(status="running", attempts=1,
                                                                             lease_until=past))
        session.execute(update(Job).where(Job.id == jobs["doomed"].id).values(
            status="running", attempts=settings.max_attempts, lease_until=past))
    report = reconcile(settings)
    assert report == {"requeued": 1, "failed": 1, "redispatched": 0}  # requeued jobs are sent at once
    assert broker.llen("bulk.lanczos-x4") == 1
    jobs = jobs_of(settings, batch_id)
    assert jobs["lost"].status == "queued"
    assert jobs["doomed"].status == "failed" and "gave up after" in jobs["doomed"].error
    assert jobs["doomed"].error_code == "worker_lost"
    worker.run([jobs["lost"].id])
    assert client.get(f"/v1/batches/{batch_id}").json()["status"] == "completed"
    assert reconcile(settings) == {"requeued": 0, "failed": 0, "redispatched": 0}


def test_reconciler_leaves_jobs_whose_messages_are_waiting(settings):
    client = api_client(settings)
    batch_id = submit(client, [{"custom_id": "a", "kind": "upscale", "image": upload(client, png()),
                                "model": "lanczos-x4"}])
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.batch_id == batch_id).values(dispatched_at=utcnow() - timedelta(days=1)))
    assert reconcile(settings)["redispatched"] == 0  # its message is still in the queue
    redis.Redis.from_url(settings.redis_url).delete("bulk.lanczos-x4")
    assert reconcile(settings)["redispatched"] == 1
    # A job whose dispatch never completed (neither it nor its batch stamped) is sent even while the
    # lane is busy.
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.batch_id == batch_id).values(
            dispatched_at=None, created_at=utcnow() - timedelta(minutes=5)))
        session.execute(update(Batch).where(Batch.id == batch_id).values(dispatched_at=None))
    assert redis.Redis.from_url(settings.redis_url).llen("bulk.lanczos-x4") == 1
    assert reconcile(settings)["redispatched"] == 1


def test_a_model_that_cannot_load_fails_its_jobs_with_the_reason(settings, worker):
    # realesrgan-x4's weights are not pulled here, and the API is told not to check (as where it runs
    # apart from the workers' model directory)
    client = api_client(settings.model_copy(update={"check_weights_at_submit": False}))
    batch_id = submit(client, [{"custom_id": "up", "kind": "upscale", "image": upload(client, png()),
                                "model": "realesrgan-x4"}])
    [outcome] = worker.run([j.id for j in jobs_of(settings, batch_id).values()])
    job = jobs_of(settings, batch_id)["up"]
    assert (outcome.status, job.status, job.attempts) == ("failed", "failed", 1)
    assert "step1x models pull realesrgan-x4" in job.error
    assert (job.error_code, job.retryable) == ("model_unavailable", True)
    assert client.get(f"/v1/batches/{batch_id}").json()["status"] == "failed"


def test_infrastructure_trouble_never_uses_attempts_until_the_outage_budget(settings):
    _, job_id = one_upscale(settings, api_client(settings))
    for claim_number in range(1, 3 * settings.max_attempts + 1):  # far more hand-backs than attempts
        with session_scope(settings.database_url) as session:
            [held] = claim(session, [job_id], f"w{claim_number}", settings)
        release(settings, [held], "S3 unreachable")
        with session_scope(settings.database_url) as session:
            job = session.get(Job, job_id)
            assert (job.status, job.attempts, job.claims) == ("queued", 0, claim_number)
            assert job.outage_since is not None and job.error == "S3 unreachable"
    with session_scope(settings.database_url) as session:  # the trouble has now lasted past the budget
        session.execute(update(Job).where(Job.id == job_id).values(
            outage_since=utcnow() - timedelta(seconds=settings.outage_budget + 1)))
        [held] = claim(session, [job_id], "late", settings)
    release(settings, [held], "S3 unreachable")
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
    assert (job.status, job.error_code, job.retryable, job.attempts) == ("failed", "outage", True, 0)
    assert "outage budget" in job.error and "S3 unreachable" in job.error


def test_the_heartbeat_keeps_a_long_run_leased(settings):
    _, job_id = one_upscale(settings, api_client(settings))
    short = settings.model_copy(update={"lease_seconds": 1})
    with session_scope(settings.database_url) as session:
        [held] = claim(session, [job_id], "slow", short)
    with Heartbeat(short, [held]):
        time.sleep(2.5)  # more than twice the lease
        with session_scope(settings.database_url) as session:
            assert session.get(Job, job_id).lease_until > utcnow()
    with session_scope(settings.database_url) as session:
        assert claim(session, [job_id], "other", short) == []  # still leased to "slow"


def test_reconciler_stamps_batches_whose_last_job_ended_unnoticed(settings, worker):
    client = api_client(settings)
    batch_id, job_id = one_upscale(settings, client)
    worker.run([job_id])
    with session_scope(settings.database_url) as session:
        session.execute(update(Batch).where(Batch.id == batch_id).values(finished_at=None))
    assert client.get(f"/v1/batches/{batch_id}").json()["finished_at"] is None
    reconcile(settings)
    assert client.get(f"/v1/batches/{batch_id}").json()["finished_at"] is not None


def test_the_watch_records_progress_and_sees_a_cancel_every_time_it_is_asked(settings):
    """Steps reach the Watch already thinned (`throttled`, or by the engine process): it looks every
    time, so a cancel stops the run at the first step after it, not an interval later."""
    settings.progress_interval = 3600.0
    _, job_id = one_upscale(settings, api_client(settings))
    with session_scope(settings.database_url) as session:
        claimed = claim(session, [job_id], "test@host", settings)
    watch = Watch(settings, claimed)
    assert watch(1, 4)
    with session_scope(settings.database_url) as session:
        assert session.get(Job, job_id).progress == 0.25
        session.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.CANCELED))
    assert not watch(2, 4)


def test_canceling_a_finished_batch_keeps_its_status(settings, worker):
    client = api_client(settings)
    batch_id, job_id = one_upscale(settings, client)
    worker.run([job_id])
    after = client.post(f"/v1/batches/{batch_id}/cancel").json()
    assert (after["status"], after["counts"]["succeeded"]) == ("completed", 1)


class RecordingStorage(Storage):
    """Records the keys `put_many` is given, in order (`given`), and those it stored (`stored`), and
    any `put`. `refuse`: a key prefix whose objects fail as they are made, while the transfers of
    the others go on, as a refused PUT ends the call."""

    def __init__(self, settings, refuse=None):
        super().__init__(settings)
        self.puts, self.given, self.stored, self.refuse = [], [], [], refuse

    def put(self, key, data, content_type="application/octet-stream"):
        self.puts.append(key)
        super().put(key, data, content_type)

    def put_many(self, objects, stored=None):
        objects = list(objects)
        given = [None] * len(objects)

        def relay(i, made, out):
            try:
                key, data, content_type = made.result()
            except BaseException as exc:
                out.set_exception(exc)
                return
            given[i] = key
            if self.refuse and key.startswith(self.refuse):
                out.set_exception(ObjectError(f"PUT {key!r}: HTTP 403"))
            else:
                out.set_result((key, data, content_type))

        relayed = []
        for i, item in enumerate(objects):  # futures of (key, data, content type), as the worker hands them over
            out = Future()
            item.add_done_callback(lambda made, i=i, out=out: relay(i, made, out))
            relayed.append(out)

        def recorded(key, seconds):
            self.stored.append(key)
            if stored is not None:
                stored(key, seconds)

        try:
            super().put_many(relayed, recorded)
        finally:
            self.given = given


def test_thumbnails_are_stored_with_the_outputs_and_no_job_finishes_without_them(settings):
    """Outputs past 256 px get a thumbnail, and their input one, once per process: all of a micro-batch's
    objects go out in one `put_many`, outputs first. A thumbnail that cannot be stored interrupts the
    micro-batch like an output: its jobs go back to the queue unfinished."""
    thumbs._written_inputs.clear()  # as in a fresh process
    client = api_client(settings)
    image = upload(client, png((80, 80)))  # 320 px outputs
    batch_id = submit(client, [{"custom_id": f"t{i}", "kind": "upscale", "image": image, "model": "lanczos-x4",
                                "seed": i, "cache": False} for i in range(3)])
    jobs = jobs_of(settings, batch_id)
    tenant = jobs["t0"].tenant_id
    refusing = RecordingStorage(settings, refuse="thumbs/")
    with pytest.raises(Interrupted, match="403"):
        MicroBatch(settings, refusing, Registry(settings).get, worker="w1@host").run([j.id for j in jobs.values()])
    assert {(j.status, j.finished_at, j.attempts) for j in jobs_of(settings, batch_id).values()} == {
        ("queued", None, 0)}
    assert not any(key.startswith("thumbs/") for key in refusing.stored)
    assert input_thumb_key(tenant, image) not in thumbs._written_inputs  # made again next time

    storage = RecordingStorage(settings)
    stored_raw = settings.model_copy(update={"png_compress_level": 0})  # STEP1X_PNG_COMPRESS_LEVEL reaches zlib
    MicroBatch(stored_raw, storage, Registry(settings).get, worker="w2@host").run([j.id for j in jobs.values()])
    done = jobs_of(settings, batch_id)
    outputs = sorted(key for job in done.values() for key in job.output_keys)
    assert {j.status for j in done.values()} == {"succeeded"} and len(outputs) == 3
    assert storage.puts == []
    assert sorted(storage.given[:3]) == outputs
    assert sorted(storage.given[3:]) == sorted([*(thumb_key(k) for k in outputs), input_thumb_key(tenant, image)])
    assert sorted(storage.stored) == sorted(storage.given)
    for key in storage.given:
        assert storage.exists(key)
    assert len(storage.get(outputs[0])) > 320 * 320 * 3

    again = submit(client, [{"custom_id": "more", "kind": "upscale", "image": image, "model": "lanczos-x4",
                             "cache": False}])
    [job] = jobs_of(settings, again).values()
    MicroBatch(settings, storage, Registry(settings).get, worker="w2@host").run([job.id])
    [output] = jobs_of(settings, again)["more"].output_keys
    assert storage.given == [output, thumb_key(output)]  # the input's thumbnail is not made again
