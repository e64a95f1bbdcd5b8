"""Inputs given by URL: accepted at once, fetched from a real server on loopback through the guarded
client before dispatch, stored like uploads; a bad URL fails only its own item."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from core import fetch
from core.db import session_scope
from core.services import free_port
from core.settings import Settings, get_settings
from core.storage import Storage
from core.tables import InputFetch, Job, WebhookEvent
from models.profiles import Registry
from step1x.client import Client
from tests.integration import receiver as fixtures
from tests.integration.helpers import api_client, mask_png, png
from tests.integration.receiver import Receiver, Seen, wait_for
from workers.batch import MicroBatch

pytestmark = pytest.mark.integration
outbound, control = fixtures.outbound, fixtures.control

PHOTO, MASK, SMALL_MASK = png((48, 32), seed=3), mask_png((48, 32)), mask_png((20, 20))


def serve(seen: Seen) -> tuple[int, dict[str, str], bytes]:
    path = seen.path
    if path == "/photo.png":
        return 200, {"content-type": "image/png"}, PHOTO
    if path == "/mask.png":
        return 200, {}, MASK
    if path == "/small-mask.png":
        return 200, {}, SMALL_MASK
    if path == "/big.png":
        return 200, {}, png((200, 150), seed=4)  # over the 20 kB limit these tests set
    if path == "/notes.txt":
        return 200, {"content-type": "image/png"}, b"these are not the pixels you are looking for"
    if path == "/moved.png":
        return 302, {"location": "/photo.png"}, b""
    if path == "/slow.png":
        time.sleep(2.5)  # past the 1 s fetch timeout
        return 200, {}, PHOTO
    return 404, {}, b"no such photo"


@pytest.fixture
def server(outbound: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    monkeypatch.setenv("STEP1X_MAX_UPLOAD_BYTES", "20000")
    monkeypatch.setenv("STEP1X_FETCH_TIMEOUT", "1")
    monkeypatch.setenv("STEP1X_FETCH_ATTEMPTS", "2")
    get_settings.cache_clear()
    photos = Receiver("127.0.0.1", free_port(), serve).start()
    yield photos
    photos.stop()


def jobs_of(settings: Settings, batch_id: str) -> dict[str, Job]:
    with session_scope(settings.database_url) as session:
        return {j.custom_id: j for j in session.scalars(select(Job).where(Job.batch_id == batch_id))}


def test_url_inputs_are_fetched_once_checked_and_bad_ones_fail_alone(server):
    settings = get_settings()
    client = api_client(settings)
    up = {"kind": "upscale", "model": "lanczos-x4"}
    items = [
        {"custom_id": "photo", **up, "image": f"{server.url}/photo.png"},
        {"custom_id": "same-photo", **up, "image": f"{server.url}/photo.png"},
        {"custom_id": "fill", "kind": "inpaint", "mode": "fill", "image": f"{server.url}/photo.png",
         "mask": f"{server.url}/mask.png"},
        {"custom_id": "sizes", "kind": "inpaint", "mode": "fill", "image": f"{server.url}/photo.png",
         "mask": f"{server.url}/small-mask.png"},
        {"custom_id": "missing", **up, "image": f"{server.url}/gone.png"},
        {"custom_id": "big", **up, "image": f"{server.url}/big.png"},
        {"custom_id": "text", **up, "image": f"{server.url}/notes.txt"},
        {"custom_id": "moved", **up, "image": f"{server.url}/moved.png"},
        {"custom_id": "slow", **up, "image": f"{server.url}/slow.png"},
    ]
    hook = client.post("/v1/webhooks", json={"url": f"{server.url}/hook", "events": ["job.failed", "job.succeeded"]})
    assert hook.status_code == 201, hook.text
    started = time.monotonic()
    response = client.post("/v1/batches", json={"items": items})
    assert response.status_code == 202, response.text
    assert time.monotonic() - started < 2 and server.seen == []  # accepted before anything is fetched
    batch_id = response.json()["id"]
    assert {j.group_key for j in jobs_of(settings, batch_id).values()} == {fetch.WAITING}

    fetch.run(settings, Storage(settings), batch_id)

    hits = [s.path for s in server.seen]
    assert hits.count("/photo.png") == 1  # three items name it; fetched once
    assert hits.count("/slow.png") == 2  # a timeout is retried, then gives up
    jobs = jobs_of(settings, batch_id)
    errors = {name: job.error for name, job in jobs.items() if job.status == "failed"}
    assert set(errors) == {"sizes", "missing", "big", "text", "moved", "slow"}
    assert errors["missing"] == f"image: {server.url}/gone.png answered HTTP 404"
    assert errors["big"].startswith(f"image: {server.url}/big.png is over the 20000-byte upload limit")
    assert errors["text"].startswith(f"image: {server.url}/notes.txt not a readable PNG, JPEG or WebP image")
    assert "HTTP 302" in errors["moved"] and "redirects are not followed" in errors["moved"]
    assert "timed out" in errors["slow"] and "2 attempts" in errors["slow"]
    assert "mask is 20x20 but image is 48x32" in errors["sizes"]
    # A download that failed may succeed once the server serves the photo; bytes that arrived but are
    # not a usable image will not.
    codes = {name: (job.error_code, job.retryable) for name, job in jobs.items() if job.status == "failed"}
    assert codes == {**{n: ("input_fetch_failed", True) for n in ("missing", "big", "moved", "slow")},
                     **{n: ("invalid_input", False) for n in ("text", "sizes")}}
    with session_scope(settings.database_url) as session:
        assert session.scalars(select(InputFetch)).all() == []
    ready = [jobs[name] for name in ("photo", "same-photo", "fill")]
    assert all(j.status == "queued" and j.dispatched_at is not None and j.group_key != fetch.WAITING for j in ready)
    assert ready[0].spec["image"] == ready[1].spec["image"] == ready[2].spec["image"]  # one stored file

    MicroBatch(settings, Storage(settings), Registry(settings).get, worker="test@host").run([j.id for j in ready])
    jobs = jobs_of(settings, batch_id)
    assert [jobs[n].status for n in ("photo", "same-photo", "fill")] == ["succeeded"] * 3
    batch = client.get(f"/v1/batches/{batch_id}").json()
    assert (batch["status"], batch["counts"]["succeeded"], batch["counts"]["failed"]) == ("completed", 3, 6)

    # The missing photo is published; an operator's retry sends the URL jobs back to the fetch stage.
    server.answer = lambda seen: (200, {}, PHOTO) if seen.path == "/gone.png" else serve(seen)
    assert client.post(f"/v1/batches/{batch_id}/retry").json()["retried"] == 6
    jobs = jobs_of(settings, batch_id)
    assert (jobs["sizes"].status, jobs["sizes"].error_code) == ("failed", "invalid_input")  # checked again at once
    fetch.run(settings, Storage(settings), batch_id)
    jobs = jobs_of(settings, batch_id)
    assert jobs["missing"].status == "queued" and jobs["missing"].dispatched_at is not None
    assert jobs["missing"].spec["image"] == ready[0].spec["image"]  # the same bytes: the same stored file
    assert {n for n, j in jobs.items() if j.status == "failed"} == {"sizes", "big", "text", "moved", "slow"}
    MicroBatch(settings, Storage(settings), Registry(settings).get, worker="test@host").run([jobs["missing"].id])
    assert client.get(f"/v1/batches/{batch_id}").json()["counts"]["succeeded"] == 4
    # Each ending of a retried job is announced, numbered in order.
    with session_scope(settings.database_url) as session:
        events = session.execute(select(WebhookEvent.resource_id, WebhookEvent.type, WebhookEvent.sequence)
                                 .order_by(WebhookEvent.sequence)).all()
    announced = {(r, t, n) for r, t, n in events}
    assert {(t, n) for r, t, n in announced if r == jobs["sizes"].id} == {("job.failed", 1), ("job.failed", 2)}
    assert {(t, n) for r, t, n in announced if r == jobs["missing"].id} == {("job.failed", 1), ("job.succeeded", 2)}
    assert {(t, n) for r, t, n in announced if r == jobs["photo"].id} == {("job.succeeded", 1)}


def test_the_control_process_fetches_and_dispatches_a_url_job(server, control, tmp_path: Path):
    settings = get_settings()
    client = api_client(settings)
    items = [{"custom_id": "a", "kind": "upscale", "model": "lanczos-x4", "image": f"{server.url}/photo.png"}]
    with Client("http://127.0.0.1:9", "unused") as cli:  # `step1x submit` uploads paths, passes URLs on
        manifest = "".join(json.dumps(item) + "\n" for item in items)
        assert [json.loads(line) for line in cli.resolve_files(manifest, tmp_path).splitlines()] == items
    batch = client.post("/v1/batches", json={"items": items}).json()
    [job] = jobs_of(settings, batch["id"]).values()
    assert job.spec["image"] == f"{server.url}/photo.png"

    def dispatched() -> bool:
        [job] = jobs_of(settings, batch["id"]).values()
        return job.dispatched_at is not None
    wait_for(dispatched, what="the fetch stage to dispatch the job")
    assert [s.path for s in server.seen] == ["/photo.png"]
