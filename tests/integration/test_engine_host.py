"""Engines in a process of their own (`workers.engine_host`, STEP1X_ENGINE_PROCESS): the same
outputs and outcomes as in the worker process, the task thread free while the forward pass runs,
interactive work first, cancels, and a host that dies replaced without losing the micro-batch.
Real PostgreSQL, Redis and SeaweedFS; real tiny-SD forward passes in a real child process."""

import os
import threading

import numpy as np
import pytest
from sqlalchemy import select

from core.db import session_scope
from core.storage import Storage
from core.tables import File, Job
from models.engine import Canceled, ImageRequest
from models.profiles import Registry
from tests.integration.helpers import api_client, mask_png, png, upload
from workers.batch import Interrupted, MicroBatch
from workers.engine_host import BULK, INTERACTIVE, HostDied, HostedRegistry
from workers.pipeline import Pipeline

pytestmark = pytest.mark.integration


@pytest.fixture
def hosted(settings):
    registry = HostedRegistry(settings)
    yield registry
    registry.close()


def generate(count, steps=4, seed=0):
    """One job's requests: `count` tiny-SD images of 64 px."""
    return [ImageRequest(kind="generate", prompt="a mug", width=64, height=64, steps=steps, seed=seed + i,
                         label=f"job{seed}") for i in range(count)]


def mixed_batch(settings, client, image, mask, empty):
    items = [
        {"custom_id": "fill", "kind": "inpaint", "mode": "fill", "image": image, "mask": mask, "cache": False},
        {"custom_id": "empty", "kind": "inpaint", "mode": "fill", "image": image, "mask": empty},
        {"custom_id": "up", "kind": "upscale", "image": image, "model": "lanczos-x4", "cache": False},
        {"custom_id": "gen", "kind": "generate", "prompt": "a mug", "width": 64, "height": 64, "steps": 2,
         "num_images": 2, "seed": 7, "cache": False},
    ]
    response = client.post("/v1/batches", json={"items": items})
    assert response.status_code == 202, response.text
    with session_scope(settings.database_url) as session:
        return {j.custom_id: j.id for j in session.scalars(select(Job).where(Job.batch_id == response.json()["id"]))}


def finished(settings, ids):
    with session_scope(settings.database_url) as session:
        return {j.custom_id: j for j in session.scalars(select(Job).where(Job.id.in_(ids)))}


def test_a_hosted_micro_batch_ends_as_it_does_in_process(settings, hosted):
    """Every kind of outcome (outputs, a refusal by the engine's checks and its words, several
    models in one micro-batch) is the same, output bytes included; the forward passes ran in
    the host, so `start` left them to wait for and `upload` collected them."""
    client = api_client(settings)
    image, mask, empty = upload(client, png((96, 64))), upload(client, mask_png()), upload(client, mask_png(empty=True))
    with session_scope(settings.database_url) as session:  # as if uploaded before coverage was measured
        session.execute(File.__table__.update().where(File.id == empty).values(mask_coverage=None))
    storage = Storage(settings)
    ended = {}
    for name, engines in (("in process", Registry(settings).get), ("hosted", hosted.get)):
        ids = mixed_batch(settings, client, image, mask, empty)
        staged = MicroBatch(settings, storage, engines, worker=f"{name}@host").start(list(ids.values()))
        assert staged is not None
        # Hosted, the forward passes still run when start returns: the images asked of the engine
        # are known, not yet which the engine's checks refuse (the empty mask).
        assert bool(staged._pending) == (name == "hosted")
        assert staged.images == (5 if name == "hosted" else 4)
        staged.complete()  # waits for the forward passes
        assert staged.images == 4  # fill, up and gen's two
        staged.upload()
        staged.finish()
        ended[name] = finished(settings, ids.values())
    local, remote = ended["in process"], ended["hosted"]
    assert {k: j.status for k, j in remote.items()} == {"fill": "succeeded", "empty": "failed", "up": "succeeded",
                                                        "gen": "succeeded"}
    assert remote["empty"].error == local["empty"].error and "mask is empty" in remote["empty"].error
    assert remote["empty"].error_code == local["empty"].error_code == "invalid_input"
    for name in ("fill", "up", "gen"):
        assert remote[name].result["model_hash"] == local[name].result["model_hash"]
        assert remote[name].timings["run"] > 0 and remote[name].usage_device == "cpu"
        assert [storage.get(key) for key in remote[name].output_keys] == \
               [storage.get(key) for key in local[name].output_keys]


def test_interactive_micro_batches_run_before_bulk_ones_waiting(hosted):
    engine = hosted.get("tiny-sd")
    never_stop = lambda done, total: True  # noqa: E731
    first = engine.submit([generate(8, steps=40)], never_stop, interactive=False)  # keeps the host busy
    order: list[str] = []
    waits = {name: engine.submit([generate(1, seed=seed)], never_stop, interactive=name == "interactive")
             for name, seed in (("bulk", 1), ("interactive", 2))}
    threads = [threading.Thread(target=lambda n=name, w=wait: (w.result(), order.append(n)))
               for name, wait in waits.items()]
    for thread in threads:
        thread.start()
    assert len(first.result().results[0]) == 8
    for thread in threads:
        thread.join(60)
    assert order == ["interactive", "bulk"]  # sent second, run first


def test_a_cancel_stops_a_hosted_run(settings, hosted):
    settings.progress_interval = 0.0
    engine = hosted.get("tiny-sd")
    seen: list[int] = []

    def progress(done, total):
        seen.append(done)
        return done < 2

    with pytest.raises(Canceled, match=r"stopped after \d+ of 50 steps"):
        engine.submit([generate(2, steps=50)], progress, interactive=True).result()
    # The cancel travels while the host goes on: it stops a step or so after the callback said so.
    # (a step arriving while the one before is still with the callback is dropped)
    assert seen[0] == 1 and len(seen) < 10
    after = engine.submit([generate(1)], lambda d, t: True, interactive=True).result()
    assert len(after.results[0]) == 1  # the host goes on


def test_a_step_being_recorded_holds_up_no_other_answer_and_ends_before_its_own(settings, hosted):
    """The progress callback writes to the database: while one is slow, the engine process's status
    and the next call's answer still arrive, the run's later steps are dropped rather than queued,
    and the run's own answer waits for it (no progress write outlives the answer, after which its
    jobs are finished on the same rows)."""
    settings.progress_interval = 0.0
    engine = hosted.get("tiny-sd")
    entered, release, answered = threading.Event(), threading.Event(), threading.Event()
    steps: list[int] = []

    def slow(done, total):
        steps.append(done)
        entered.set()
        release.wait(120)
        return True

    first = engine.submit([generate(1, steps=6)], slow, interactive=False)
    first.add_done_callback(answered.set)
    try:
        assert entered.wait(60)
        second = engine.submit([generate(1, seed=5)], lambda done, total: True, interactive=False)
        waiter = threading.Thread(target=second.result)
        waiter.start()
        waiter.join(60)
        assert not waiter.is_alive() and hosted.status() is not None
        # The host answered the first call before it ran the second: that answer is in, held.
        assert not answered.is_set()
    finally:
        release.set()
    assert answered.wait(60) and len(first.result().results[0]) == 1
    assert steps == [steps[0]]


def test_a_host_that_dies_mid_run_is_replaced_and_the_micro_batch_runs_again(settings, hosted):
    settings.progress_interval = 0.0
    engine = hosted.get("tiny-sd")
    jobs = [generate(2, steps=30, seed=0), generate(2, steps=30, seed=10)]
    victim = hosted.host().process

    def kill_once(done, total):
        if done == 1 and victim.poll() is None:
            victim.kill()
        return True

    again = engine.submit(jobs, kill_once, interactive=False).result()
    assert victim.poll() is not None and hosted.host().process.pid != victim.pid
    reference = Registry(settings).get("tiny-sd").run([request for job in jobs for request in job])
    made = [result for job in again.results for result in job]
    assert [np.asarray(r.image).tolist() for r in made] == [np.asarray(r.image).tolist() for r in reference]


def test_every_caller_of_a_dead_host_gets_an_exception_of_its_own(settings, hosted):
    """One HostDied raised in several threads would gather all their tracebacks."""
    hosted.get("tiny-sd")
    host = hosted.host()
    waiting = [host.call("run", BULK, "tiny-sd", [generate(1, steps=200, seed=seed)], settings.progress_interval)
               for seed in (0, 1)]
    host.process.kill()
    errors = []
    for future in waiting:
        with pytest.raises(HostDied, match="the engine process exited") as caught:
            future.result(timeout=60)
        errors.append(caught.value)
    with pytest.raises(HostDied, match="the engine process exited") as later:
        host.call("status", INTERACTIVE)
    errors.append(later.value)
    assert len({id(error) for error in errors}) == 3


def test_an_interactive_micro_batch_is_stored_as_soon_as_its_forward_pass_ends(settings, hosted):
    """Handed over after two bulk ones, it runs in the engine process before the one still waiting
    there, and the store pipeline takes it when it is done instead of after both bulk ones."""
    client = api_client(settings)

    def bulk(prefix, steps, count):
        items = [{"custom_id": f"{prefix}{i}", "kind": "generate", "prompt": "a mug", "width": 64, "height": 64,
                  "steps": steps, "seed": i, "cache": False} for i in range(count)]
        response = client.post("/v1/batches", json={"items": items})
        assert response.status_code == 202, response.text
        with session_scope(settings.database_url) as session:
            return list(session.scalars(select(Job.id).where(Job.batch_id == response.json()["id"])))

    first, second = bulk("a", 150, 16), bulk("b", 4, 8)  # the first keeps the engine process busy
    single = client.post("/v1/jobs", json={"kind": "generate", "prompt": "a cup", "width": 64, "height": 64,
                                           "steps": 4, "seed": 1})
    assert single.status_code == 202, single.text
    worker = MicroBatch(settings, Storage(settings), hosted.get, worker="test@host")
    pipeline = Pipeline(depth=3)
    stored: list[str] = []
    for name, ids in (("first", first), ("second", second), ("single", [single.json()["id"]])):
        staged = worker.start(ids)
        assert staged is not None
        pipeline.put(staged, lambda outcomes, n=name: stored.append(n), pytest.fail)
    pipeline.drain()
    assert stored == ["first", "single", "second"]
    assert {job.status for job in finished(settings, first + second + [single.json()["id"]]).values()} == {
        "succeeded"}


def test_an_engine_process_that_cannot_start_hands_the_jobs_back_uncharged(settings, hosted, monkeypatch):
    """Its death is the machine's trouble, not the items': the micro-batch is interrupted (queued
    again, the attempt refunded) instead of bisected into failed jobs."""
    client = api_client(settings)
    response = client.post("/v1/batches", json={"items": [
        {"custom_id": f"g{i}", "kind": "generate", "prompt": "a mug", "width": 64, "height": 64, "steps": 2}
        for i in range(2)]})
    assert response.status_code == 202, response.text
    with session_scope(settings.database_url) as session:
        ids = list(session.scalars(select(Job.id).where(Job.batch_id == response.json()["id"])))
    monkeypatch.setenv("STEP1X_MAX_ATTEMPTS", "not a number")  # the engine process's settings fail
    with pytest.raises(Interrupted):
        MicroBatch(settings, Storage(settings), hosted.get, worker="test@host").start(ids)
    assert {(job.status, job.attempts) for job in finished(settings, ids).values()} == {("queued", 0)}


def test_the_engine_process_runs_torch_on_the_cpu_threads_asked_for(settings, monkeypatch):
    """STEP1X_CPU_THREADS: a forward pass on two threads leaves torch's CPU thread pools larger in
    the engine process than on one (the default on two cores); every other thread is the same."""
    counts = {}
    for threads in (1, 2):
        monkeypatch.setenv("STEP1X_CPU_THREADS", str(threads))  # the engine process reads its environment
        hosted = HostedRegistry(settings)
        try:
            hosted.get("tiny-sd").submit([generate(2)], lambda done, total: True, interactive=False).result()
            counts[threads] = len(os.listdir(f"/proc/{hosted.host().process.pid}/task"))
        finally:
            hosted.close()
    assert counts[2] > counts[1], counts
