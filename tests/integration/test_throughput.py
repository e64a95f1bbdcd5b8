"""Catalog-scale submission, batch counters, backpressure and per-model queues, on real services."""

from __future__ import annotations

import base64
import json
import threading
import time

import pytest
import redis
from sqlalchemy import func, select, update

from core.db import session_scope
from core.tables import Batch, Calibration, Job
from step1x.client import Client
from tests.integration.helpers import api_client, png, upload
from workers.launcher import start_workers, stop_all
from workers.reconcile import reconcile

pytestmark = pytest.mark.integration


def stored(settings) -> tuple[int, int]:
    with session_scope(settings.database_url) as session:
        return (int(session.scalar(select(func.count()).select_from(Job)) or 0),
                int(session.scalar(select(func.count()).select_from(Batch)) or 0))


def messages(settings) -> dict[str, list[list[str]]]:
    """Job ids of every waiting message, by queue."""
    broker = redis.Redis.from_url(settings.redis_url)
    found: dict[str, list[list[str]]] = {}
    for queue in broker.keys("*"):
        if broker.type(queue) != b"list":
            continue
        for raw in broker.lrange(queue, 0, -1):
            body = json.loads(base64.b64decode(json.loads(raw)["body"]))
            found.setdefault(queue.decode(), []).append(body[0][0])
    return found


def manifest(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def generate(i: int) -> dict:
    return {"custom_id": f"sku-{i}", "kind": "generate", "prompt": f"product {i}", "width": 64, "height": 64}


def test_a_bad_last_line_rejects_a_streamed_manifest_whole(settings, monkeypatch):
    monkeypatch.setattr("api.routes.batches.CHUNK", 10)  # many chunks stored before the bad line arrives
    client = api_client(settings)
    body = manifest([generate(i) for i in range(45)]) + b'{"custom_id": "last", "kind": "generate"}\n'

    def chunks():  # sent in pieces, cut mid-line, as a network would
        for start in range(0, len(body), 700):
            yield body[start:start + 700]

    response = client.post("/v1/batches/manifest", content=chunks(),
                           headers={"Content-Type": "application/x-ndjson"})
    assert response.status_code == 422, response.text
    assert [(e["item"], e["field"]) for e in response.json()["errors"]] == [("last", "prompt")]
    assert stored(settings) == (0, 0)
    assert messages(settings) == {}
    # A duplicate custom_id across chunks is caught too, and the same manifest without its bad line passes.
    response = client.post("/v1/batches/manifest", content=manifest([generate(i) for i in range(45)] + [generate(3)]))
    assert response.status_code == 422 and response.json()["errors"][0]["item"] == "sku-3"
    response = client.post("/v1/batches/manifest", content=body.rsplit(b"{", 1)[0])
    assert response.status_code == 202, response.text
    batch = response.json()
    assert batch["total"] == 45 and batch["counts"]["queued"] == 45
    sent = messages(settings)
    assert sorted(sent) == ["bulk.tiny-sd"]  # 45 jobs of 64x64, 16 per pass: 3 micro-batches
    assert sorted(len(ids) for ids in sent["bulk.tiny-sd"]) == [13, 16, 16]
    with session_scope(settings.database_url) as session:
        row = session.get(Batch, batch["id"])
        assert row is not None and row.dispatched_at is not None  # one stamp for the catalog
        assert session.scalar(select(func.count()).where(Job.dispatched_at.is_not(None))) == 0
    assert reconcile(settings)["redispatched"] == 0  # the batch stamp marks its jobs sent


def test_a_full_queue_answers_429_stores_nothing_and_the_client_waits(settings):
    capped = settings.model_copy(update={"max_queued_per_tenant": 5, "backpressure_retry_after": 1})
    client = api_client(capped)
    first = client.post("/v1/batches", json={"items": [generate(i) for i in range(4)]})
    assert first.status_code == 202
    single = {k: v for k, v in generate(0).items() if k != "custom_id"}
    refused = [client.post("/v1/batches", json={"items": [generate(i) for i in range(2)]}),
               client.post("/v1/batches/manifest", content=manifest([generate(i) for i in range(2)]))]
    assert client.post("/v1/jobs", json=single).status_code == 202  # exactly at the cap
    refused.append(client.post("/v1/jobs", json=single))
    for response in refused:
        assert response.status_code == 429, response.text
        assert response.headers["Retry-After"] == "1" and "cap of 5" in response.json()["detail"]
    assert stored(settings) == (5, 1)
    # The client waits out the 429s and gets through once the backlog drains (here: a cancel).
    step1x = Client("http://testserver", "unused", busy_wait=30)
    step1x.http = client  # the same calls, through the in-process app
    drained = threading.Timer(1.5, lambda: client.post(f"/v1/batches/{first.json()['id']}/cancel"))
    drained.start()
    started = time.monotonic()
    batch = step1x.create_batch([generate(i) for i in range(3)])
    assert batch["total"] == 3 and time.monotonic() - started >= 1.0
    drained.join()


def test_micro_batches_go_to_the_queue_of_their_model(settings, tmp_path):
    client = api_client(settings)
    image = upload(client, png((16, 16)))
    items = [{"custom_id": "gen", "kind": "generate", "prompt": "a mug", "width": 64, "height": 64},
             {"custom_id": "up", "kind": "upscale", "image": image, "model": "lanczos-x4"}]
    batch_id = client.post("/v1/batches", json={"items": items}).json()["id"]
    with session_scope(settings.database_url) as session:
        by_name = {c: i for c, i in session.execute(select(Job.custom_id, Job.id).where(Job.batch_id == batch_id))}
    assert messages(settings) == {"bulk.tiny-sd": [[by_name["gen"]]], "bulk.lanczos-x4": [[by_name["up"]]]}
    # A worker serving only lanczos-x4 takes its job and leaves the other model's message alone.
    workers = start_workers([], tmp_path, models=["lanczos-x4"])
    try:
        deadline = time.monotonic() + 60
        while client.get(f"/v1/jobs/{by_name['up']}").json()["status"] != "succeeded":
            assert time.monotonic() < deadline, (tmp_path / "worker-cpu.log").read_text()[-3000:]
            time.sleep(0.2)
    finally:
        stop_all(workers)
    assert client.get(f"/v1/jobs/{by_name['gen']}").json()["status"] == "queued"
    assert messages(settings) == {"bulk.tiny-sd": [[by_name["gen"]]]}


def test_calibration_is_stored_and_the_planner_cuts_by_it(settings):
    from core.intake import calibrated_budgets
    from workers.calibrate import calibrate_models

    [row] = calibrate_models(settings, ["lanczos-x4"], "test@host")
    assert row.batch_size >= 1 and row.images_per_s > 0 and row.trials[0]["batch_size"] == 1
    with session_scope(settings.database_url) as session:
        assert calibrated_budgets(session) == {"lanczos-x4": row.pixel_budget}
        # A device that measured two 16x16 upscales per pass: the planner follows it.
        session.execute(update(Calibration).values(pixel_budget=2 * 16 * 16 * 16))
    client = api_client(settings)
    image = upload(client, png((16, 16)))
    items = [{"custom_id": f"u{i}", "kind": "upscale", "image": image, "model": "lanczos-x4"} for i in range(5)]
    assert client.post("/v1/batches", json={"items": items}).status_code == 202
    assert sorted(len(ids) for ids in messages(settings)["bulk.lanczos-x4"]) == [1, 2, 2]
