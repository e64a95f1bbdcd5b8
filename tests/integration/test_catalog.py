"""The catalog terms of a batch against real PostgreSQL, Redis and SeaweedFS: completion windows
(expired jobs), output retention and DELETE, usage, timestamps, output formats and downloads."""

from __future__ import annotations

import io
import json
from datetime import timedelta

import httpx
import pytest
from PIL import Image
from sqlalchemy import select, update

from core.db import session_scope
from core.retention import sweep
from core.storage import Storage, input_key
from core.tables import Batch, Job, utcnow
from tests.integration.helpers import api_client, png, upload
from tests.integration.test_worker import jobs_of, submit, worker  # noqa: F401 (fixture)
from workers.reconcile import reconcile

pytestmark = pytest.mark.integration


def upscales(client, count: int, **extra) -> list[dict]:
    image = upload(client, png((32, 24)))
    return [{"custom_id": f"up-{i}", "kind": "upscale", "image": image, "model": "lanczos-x4", "seed": i, **extra}
            for i in range(count)]


def run_all(settings, worker, batch_id) -> None:  # noqa: F811
    worker.run([j.id for j in jobs_of(settings, batch_id).values()])


def test_jobs_still_queued_when_the_window_closes_expire_and_the_batch_keeps_partial_results(settings, worker):  # noqa: F811
    client = api_client(settings)
    response = client.post("/v1/batches", json={"items": upscales(client, 3), "completion_window": "2h"})
    assert response.status_code == 202, response.text
    batch = response.json()
    assert batch["completion_window"] == "2h" and batch["expires_at"] > batch["created_at"]
    jobs = jobs_of(settings, batch["id"])
    worker.run([jobs["up-0"].id])
    assert sweep(settings)["expired"] == 0  # still inside its window
    with session_scope(settings.database_url) as session:
        session.execute(update(Batch).where(Batch.id == batch["id"]).values(expires_at=utcnow() - timedelta(seconds=1)))
    reconcile(settings)  # the periodic pass runs the sweep
    assert {j.status for j in jobs_of(settings, batch["id"]).values()} == {"succeeded", "expired"}
    assert worker.run([jobs["up-1"].id, jobs["up-2"].id]) == []  # an expired job is never claimed
    done = client.get(f"/v1/batches/{batch['id']}").json()
    assert (done["status"], done["counts"]["succeeded"], done["counts"]["expired"], done["counts"]["failed"]) == \
        ("expired", 1, 2, 0)
    assert done["progress"] == 1.0 and done["finished_at"] and done["started_at"]
    lines = {line["custom_id"]: line for line in map(json.loads, client.get(
        f"/v1/batches/{batch['id']}/results").text.splitlines())}
    assert "url" in lines["up-0"] and lines["up-1"]["status"] == "expired"
    assert "completion window (2h)" in lines["up-1"]["error"]
    assert (lines["up-1"]["error_code"], lines["up-1"]["retryable"]) == ("expired", False)
    assert "error_code" not in lines["up-0"]


@pytest.mark.parametrize(("field", "value", "message"), [
    ("completion_window", "30s", "out of range"), ("completion_window", "2 weeks", "not a duration"),
    ("output_ttl", "31d", "out of range"), ("output_ttl", 60, "out of range"), ("output_ttl", True, "boolean"),
])
def test_bad_terms_are_refused_naming_the_field(settings, field, value, message):
    client = api_client(settings)
    response = client.post("/v1/batches", json={"items": upscales(client, 1), field: value})
    assert response.status_code == 422
    [error] = response.json()["errors"]
    assert error["field"] == field and message in error["message"]
    assert client.get("/v1/batches/nothing").status_code == 404


def test_outputs_past_their_ttl_are_deleted_and_a_deleted_batch_is_gone(settings, worker):  # noqa: F811
    client, storage = api_client(settings), Storage(settings)
    short = client.post("/v1/batches", json={"items": upscales(client, 2), "output_ttl": "1h"}).json()["id"]
    kept = client.post("/v1/batches", json={"items": upscales(client, 1)}).json()["id"]
    assert client.delete(f"/v1/batches/{short}").status_code == 409  # still running: cancel first
    run_all(settings, worker, short)
    run_all(settings, worker, kept)
    keys = [key for job in jobs_of(settings, short).values() for key in job.output_keys]
    assert all(storage.exists(key) for key in keys)
    with session_scope(settings.database_url) as session:
        session.execute(update(Batch).where(Batch.id.in_([short, kept]))
                        .values(finished_at=utcnow() - timedelta(hours=2)))
    assert sweep(settings)["outputs_deleted"] == 1
    assert not any(storage.exists(key) for key in keys)
    gone = client.get(f"/v1/batches/{short}").json()
    assert gone["outputs_deleted_at"] and gone["output_ttl"] == "1h"
    assert all(job["outputs"] == [] for job in client.get(f"/v1/batches/{short}/jobs").json()["data"])
    assert sweep(settings)["outputs_deleted"] == 0  # recorded: not swept again

    kept_keys = [key for job in jobs_of(settings, kept).values() for key in job.output_keys]
    assert client.get(f"/v1/batches/{kept}").json()["outputs_deleted_at"] is None  # 7d default
    assert client.delete(f"/v1/batches/{kept}").status_code == 204
    assert client.get(f"/v1/batches/{kept}").status_code == 404
    assert not any(storage.exists(key) for key in kept_keys) and jobs_of(settings, kept) == {}
    assert api_client(settings, "other").delete(f"/v1/batches/{short}").status_code == 404


def test_single_jobs_outputs_past_their_ttl_are_deleted_once(settings, worker):  # noqa: F811
    client, storage = api_client(settings), Storage(settings)
    images = [upload(client, png((32, 24), seed=i)) for i in range(2)]  # their own: one is deleted below
    items = [{"kind": "upscale", "model": "lanczos-x4", "image": image} for image in images]
    ids = [client.post("/v1/jobs", json=item).json()["id"] for item in items]
    with session_scope(settings.database_url) as session:
        [gone] = session.scalars(select(Job).where(Job.id == ids[1]))
        storage.delete(input_key(gone.tenant_id, gone.spec["image"]))  # this one fails: no outputs
    worker.run(ids)
    with session_scope(settings.database_url) as session:
        done = {job.id: job for job in session.scalars(select(Job).where(Job.id.in_(ids)))}
        session.execute(update(Job).where(Job.id.in_(ids)).values(finished_at=utcnow() - timedelta(days=8)))
    assert (done[ids[0]].status, done[ids[1]].status) == ("succeeded", "failed")
    [key] = done[ids[0]].output_keys

    assert sweep(settings)["outputs_deleted"] == 1
    assert not storage.exists(key)
    # Cleared (and never holding outputs) is not swept again: each sweep takes a limited number,
    # and jobs swept again forever would keep the rest from ever being reached.
    assert sweep(settings)["outputs_deleted"] == 0


def test_usage_is_recorded_per_job_and_totalled_per_batch(settings, worker):  # noqa: F811
    client = api_client(settings)
    items = [{"custom_id": "gen", "kind": "generate", "prompt": "a mug", "width": 64, "height": 64, "steps": 2,
              "num_images": 2, "seed": 1}, *upscales(client, 2)]
    batch_id = submit(client, items)
    ids = {custom_id: job.id for custom_id, job in jobs_of(settings, batch_id).items()}
    worker.run([ids["gen"], ids["up-0"]])
    worker.run([ids["up-1"]])  # the identical-job cache reads finished jobs
    jobs = {j["custom_id"]: j for j in client.get(f"/v1/batches/{batch_id}/jobs").json()["data"]}
    gen, up, again = jobs["gen"]["usage"], jobs["up-0"]["usage"], jobs["up-1"]["usage"]
    assert (gen["megapixels"], gen["steps"], gen["device"]) == (2 * 64 * 64 / 1e6, 4, "cpu")
    assert gen["compute_seconds"] > 0
    # Upscales ignore the seed, so the second, seeded differently, reuses the first's output: no cost.
    assert (up["megapixels"], up["steps"]) == (128 * 96 / 1e6, 0)
    assert jobs["up-1"]["result"]["cached"] and again == {"megapixels": 0.0, "steps": 0, "compute_seconds": 0.0,
                                                          "device": None}
    total = client.get(f"/v1/batches/{batch_id}").json()["usage"]
    assert total["megapixels"] == pytest.approx(gen["megapixels"] + up["megapixels"])
    assert total["steps"] == 4
    assert total["compute_seconds_by_device"]["cpu"] == pytest.approx(gen["compute_seconds"] + up["compute_seconds"],
                                                                      abs=1e-3)
    line = next(line for line in client.get(f"/v1/batches/{batch_id}/results").text.splitlines() if '"gen"' in line)
    assert '"usage": {"megapixels": 0.008192, "steps": 4' in line


def test_output_formats_content_types_and_download_names(settings, worker, tmp_path):  # noqa: F811
    client = api_client(settings)
    rgba = Image.new("RGBA", (16, 12), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 8, 12))  # left half fully transparent
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    image = upload(client, buffer.getvalue())
    odd = 'sku "7"/été'  # a quote, a slash and non-ASCII letters: none may break the header
    items = [
        {"custom_id": "jpeg", "kind": "upscale", "image": image, "model": "lanczos-x4", "output_format": "jpeg",
         "quality": 80, "background": "#00ff00"},
        {"custom_id": "webp", "kind": "upscale", "image": image, "model": "lanczos-x4", "output_format": "webp"},
        {"custom_id": odd, "kind": "upscale", "image": image, "model": "lanczos-x4"},
    ]
    batch_id = submit(client, items)
    run_all(settings, worker, batch_id)
    jobs = {j["custom_id"]: j for j in client.get(f"/v1/batches/{batch_id}/jobs").json()["data"]}
    expected = {"jpeg": ("image/jpeg", "JPEG"), "webp": ("image/webp", "WEBP"), odd: ("image/png", "PNG")}
    for custom_id, (content_type, fmt) in expected.items():
        [output] = jobs[custom_id]["outputs"]
        response = httpx.get(output["url"])
        assert response.status_code == 200
        assert response.headers["content-type"] == content_type
        assert Image.open(io.BytesIO(response.content)).format == fmt
        disposition = response.headers["content-disposition"]
        assert disposition.isascii()
    assert "filename*=UTF-8''sku%20%227%22_%C3%A9t%C3%A9.png" in httpx.get(
        jobs[odd]["outputs"][0]["url"]).headers["content-disposition"]
    jpeg = Image.open(io.BytesIO(httpx.get(jobs["jpeg"]["outputs"][0]["url"]).content)).convert("RGB")
    left, right = jpeg.getpixel((4, 24)), jpeg.getpixel((56, 24))
    assert left[1] > 200 and left[0] < 60  # transparency flattened onto the green background
    assert right[0] > 200 and right[1] < 60
    from step1x.client import Client

    with Client("http://testserver", "unused") as sdk:
        # The result lines come from the API in process; the files from their presigned URLs.
        sdk.results = lambda _: [json.loads(line) for line in  # type: ignore[method-assign]
                                 client.get(f"/v1/batches/{batch_id}/results").text.splitlines()]
        names = sorted(p.name for p in sdk.download_results(batch_id, tmp_path / "out"))
    assert names == ["jpeg.jpg", "sku__7___t_.png", "webp.webp"]
    bad = client.post("/v1/batches", json={"items": [{**items[2], "custom_id": "q", "quality": 50}]})
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "quality"


def test_a_local_path_sent_to_the_manifest_endpoint_says_how_to_upload(settings):
    client = api_client(settings)
    body = '{"custom_id": "a", "kind": "upscale", "image": "photos/a.jpg"}\n'
    response = client.post("/v1/batches/manifest", content=body, headers={"Content-Type": "application/x-ndjson"})
    assert response.status_code == 422
    [error] = response.json()["errors"]
    assert (error["item"], error["field"]) == ("a", "image")
    assert "POST /v1/files" in error["message"] and "step1x submit" in error["message"]


def test_cancel_and_claim_stamp_the_batch_times(settings, worker):  # noqa: F811
    client = api_client(settings)
    batch_id = submit(client, upscales(client, 2))
    fresh = client.get(f"/v1/batches/{batch_id}").json()
    assert fresh["started_at"] is None and fresh["canceled_at"] is None
    worker.run([jobs_of(settings, batch_id)["up-0"].id])
    canceled = client.post(f"/v1/batches/{batch_id}/cancel").json()
    assert canceled["created_at"] <= canceled["started_at"] <= canceled["canceled_at"] <= canceled["finished_at"]
    job = client.get(f"/v1/batches/{batch_id}/jobs", params={"status": "succeeded"}).json()["data"][0]
    assert job["created_at"] <= job["started_at"] <= job["finished_at"]
