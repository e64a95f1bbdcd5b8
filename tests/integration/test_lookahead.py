"""The worker's lookahead (`workers.lookahead`): while a micro-batch runs, the inputs of the message
the worker would take next are read ahead, in the order the worker reads its queues, at most one
micro-batch ahead, and adopted by the next micro-batch instead of read again. Real Redis (messages
sent by the API), PostgreSQL and SeaweedFS."""

import io
import time

import numpy as np
import pytest
import redis
from PIL import Image
from sqlalchemy import select

from core.db import session_scope
from core.dispatch import worker_queues
from core.storage import Storage, input_key
from core.tables import Job
from models.profiles import Registry
from tests.integration.helpers import api_client, mask_png, png, upload
from workers.batch import MicroBatch
from workers.launcher import start_workers, stop_all
from workers.lookahead import Lookahead

pytestmark = pytest.mark.integration


class CountingStorage(Storage):
    """The real S3 client; notes every key read."""

    def __init__(self, settings):
        super().__init__(settings)
        self.reads: list[str] = []

    def get(self, key):
        self.reads.append(key)
        return super().get(key)


def fill_jobs(client, seeds, path="/v1/batches"):
    """Inpaint (fill) jobs, each with its own image and mask; {file id: png bytes} of their images too."""
    files = {}
    items = []
    for seed in seeds:
        data = png((40, 32), seed=seed)
        image, mask = upload(client, data), upload(client, mask_png((40, 32)))
        files[image] = data
        items.append({"custom_id": f"fill{seed}", "kind": "inpaint", "mode": "fill", "image": image, "mask": mask})
    if path == "/v1/jobs":
        [item] = items
        response = client.post(path, json=item)
    else:
        response = client.post(path, json={"items": items})
    assert response.status_code in (201, 202), response.text
    return files


def keys_of(settings, job_ids):
    with session_scope(settings.database_url) as session:
        jobs = session.scalars(select(Job).where(Job.id.in_(job_ids)))
        return {input_key(job.tenant_id, job.spec[name]) for job in jobs for name in ("image", "mask")}


def wait_held(lookahead, keys, timeout=30):
    deadline = time.monotonic() + timeout
    while not all(lookahead.holds(key) for key in keys):
        assert time.monotonic() < deadline, "the lookahead never read them"
        time.sleep(0.01)


def test_it_reads_the_inputs_of_the_message_the_worker_takes_next(settings):
    client = api_client(settings)
    fill_jobs(client, [1, 2])  # bulk, sent first
    files = fill_jobs(client, [3], path="/v1/jobs")  # interactive: the worker takes it first
    lookahead = Lookahead(settings, Storage(settings), worker_queues(settings.models))

    queue, next_ids = lookahead.peek()
    assert queue.startswith("interactive.")
    lookahead.ahead([])
    wait_held(lookahead, keys_of(settings, next_ids))

    [(image_id, data)] = files.items()
    [tenant] = {key.split("/")[1] for key in keys_of(settings, next_ids)}
    adopted = lookahead.adopt(input_key(tenant, image_id))
    assert adopted is not None
    assert np.array_equal(np.asarray(adopted), np.asarray(Image.open(io.BytesIO(data))))
    assert not lookahead.holds(input_key(tenant, image_id))  # handed over, not kept twice


def test_a_micro_batch_adopts_what_was_read_ahead_and_reads_nothing_again(settings):
    client = api_client(settings)
    fill_jobs(client, [1, 2, 3])
    storage = CountingStorage(settings)
    lookahead = Lookahead(settings, storage, worker_queues(settings.models))
    _, job_ids = lookahead.peek()
    keys = keys_of(settings, job_ids)
    lookahead.ahead([])
    wait_held(lookahead, keys)
    read_ahead = list(storage.reads)

    worker = MicroBatch(settings, storage, Registry(settings).get, worker="test@host", lookahead=lookahead)
    outcomes = worker.run(job_ids)

    assert {o.status for o in outcomes} == {"succeeded"} and len(outcomes) == 3
    assert sorted(read_ahead) == sorted(keys)
    assert not set(storage.reads[len(read_ahead):]) & keys  # the micro-batch read none of them again


def test_it_holds_one_micro_batch_ahead_at_most(settings):
    client = api_client(settings)
    fill_jobs(client, [1, 2])
    fill_jobs(client, [3, 4])
    lookahead = Lookahead(settings, Storage(settings), worker_queues(settings.models))
    queue, first = lookahead.peek()
    lookahead.ahead([])
    wait_held(lookahead, keys_of(settings, first))

    redis.Redis.from_url(settings.redis_url).rpop(queue)  # another worker took that message
    _, second = lookahead.peek()
    lookahead.ahead([])
    wait_held(lookahead, keys_of(settings, second))

    only_first = keys_of(settings, first) - keys_of(settings, second)  # their images (the masks are one file)
    assert only_first and not any(lookahead.holds(key) for key in only_first)


def test_an_input_gone_before_its_read_ahead_fails_its_job_alone_as_without_lookahead(settings):
    client = api_client(settings)
    fill_jobs(client, [1, 2])
    storage = Storage(settings)
    lookahead = Lookahead(settings, storage, worker_queues(settings.models))
    _, job_ids = lookahead.peek()
    with session_scope(settings.database_url) as session:
        jobs = {job.custom_id: job for job in session.scalars(select(Job).where(Job.id.in_(job_ids)))}
        gone = jobs["fill2"]
        storage.delete(input_key(gone.tenant_id, gone.spec["image"]))
    lookahead.ahead([])
    wait_held(lookahead, keys_of(settings, [jobs["fill1"].id]))

    outcomes = {o.job.custom_id: o for o in MicroBatch(settings, storage, Registry(settings).get,
                                                        worker="test@host", lookahead=lookahead).run(job_ids)}

    assert outcomes["fill1"].status == "succeeded"
    assert outcomes["fill2"].status == "failed" and outcomes["fill2"].code == "invalid_input"
    assert gone.spec["image"] in (outcomes["fill2"].error or "")


def test_a_worker_reads_ahead_in_the_order_it_reads_its_queues(settings, tmp_path):
    client = api_client(settings)
    fill_jobs(client, [1])
    workers = start_workers([], tmp_path, "INFO", env={"STEP1X_PREFETCH_INPUTS": "true"}, models=["classical-fill"])
    log = tmp_path / "worker-cpu.log"
    try:
        deadline = time.monotonic() + 60
        while "reading inputs ahead" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline, log.read_text()[-3000:] if log.exists() else "no worker log"
            time.sleep(0.2)
    finally:
        stop_all(workers)
    assert f"the next message of {', '.join(worker_queues(['classical-fill']))}" in log.read_text()
