"""The HTTP API against real PostgreSQL, Redis and SeaweedFS."""

import base64
import hashlib
import io
import json
import struct
import time

import pytest
import redis
from PIL import Image
from sqlalchemy import func, select

from core.db import session_scope
from core.dispatch import lane_queues
from core.tables import Job
from tests.integration.helpers import api_client, mask_png, png, upload

pytestmark = pytest.mark.integration


def job_count(settings) -> int:
    with session_scope(settings.database_url) as session:
        return int(session.scalar(select(func.count()).select_from(Job)) or 0)


def queue_length(settings, lane: str) -> int:
    broker = redis.Redis.from_url(settings.redis_url)
    return sum(int(broker.llen(queue)) for queue in lane_queues(lane, settings))


def test_files_are_content_addressed_and_validated(settings):
    client = api_client(settings)
    data = png((80, 40))
    first = client.post("/v1/files", files={"file": ("a.png", data)}).json()
    assert first["id"] == hashlib.sha256(data).hexdigest()
    assert (first["width"], first["height"], first["content_type"]) == (80, 40, "image/png")
    assert client.post("/v1/files", files={"file": ("b.png", data)}).json()["id"] == first["id"]
    bad = client.post("/v1/files", files={"file": ("x.png", b"not an image at all")})
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["field"] == "file"
    assert "not a readable PNG, JPEG or WebP" in bad.json()["errors"][0]["message"]


def test_requests_need_a_valid_key(settings):
    client = api_client(settings)
    assert client.get("/v1/jobs/job_x", headers={"Authorization": ""}).status_code == 401
    assert client.get("/v1/jobs/job_x", headers={"Authorization": "Bearer sk_wrong"}).status_code == 401
    assert client.get("/v1/jobs/job_x").status_code == 404


def test_a_job_is_stored_and_dispatched_at_once(settings):
    client = api_client(settings)
    response = client.post("/v1/jobs", json={"kind": "generate", "prompt": "a red mug", "width": 64,
                                             "height": 64, "seed": 3})
    assert response.status_code == 202, response.text
    job = response.json()
    assert (job["status"], job["seed"], job["model"], job["batch_id"]) == ("queued", 3, "tiny-sd", None)
    assert job["timings"]["queued_at"].endswith("Z")
    assert queue_length(settings, "interactive") == 1
    assert client.get(f"/v1/jobs/{job['id']}").json()["id"] == job["id"]
    canceled = client.post(f"/v1/jobs/{job['id']}/cancel").json()
    assert canceled["status"] == "canceled"


def test_a_bad_batch_is_rejected_whole_listing_every_item(settings):
    client = api_client(settings)
    image, small_mask = upload(client, png((96, 64))), upload(client, mask_png((50, 50)))
    items = [
        {"custom_id": "good", "kind": "upscale", "image": image, "model": "lanczos-x4"},
        {"custom_id": "size", "kind": "inpaint", "mode": "fill", "image": image, "mask": small_mask},
        {"custom_id": "mode", "kind": "inpaint", "mode": "blur", "image": image, "mask": small_mask},
        {"custom_id": "steps", "kind": "generate", "prompt": "x", "steps": 500},
        {"custom_id": "nofile", "kind": "upscale", "image": "0" * 64, "model": "lanczos-x4"},
    ]
    response = client.post("/v1/batches", json={"items": items})
    assert response.status_code == 422
    errors = {(e["item"], e["field"]): e["message"] for e in response.json()["errors"]}
    assert set(errors) == {("size", "mask"), ("mode", "mode"), ("steps", "steps"), ("nofile", "image")}
    assert "mask is 50x50 but image is 96x64" in errors[("size", "mask")]
    assert "does not exist" in errors[("nofile", "image")]
    assert job_count(settings) == 0


def test_idempotency_key_returns_the_same_batch(settings):
    client = api_client(settings)
    body = {"items": [{"custom_id": f"g{i}", "kind": "generate", "prompt": "x", "width": 64, "height": 64}
                      for i in range(3)], "metadata": {"catalog": "spring"}}
    first = client.post("/v1/batches", json=body, headers={"Idempotency-Key": "k1"})
    again = client.post("/v1/batches", json=body, headers={"Idempotency-Key": "k1"})
    assert (first.status_code, again.status_code) == (202, 200)
    assert first.json()["id"] == again.json()["id"]
    assert job_count(settings) == 3
    other = client.post("/v1/batches", json={**body, "metadata": {}}, headers={"Idempotency-Key": "k1"})
    assert other.status_code == 409
    assert job_count(settings) == 3


def test_tenants_cannot_see_each_other(settings):
    alice, bob = api_client(settings, "alice"), api_client(settings, "bob")
    image = upload(alice, png())
    batch = alice.post("/v1/batches", json={"items": [
        {"custom_id": "u", "kind": "upscale", "image": image, "model": "lanczos-x4"}]}).json()
    job_id = alice.get(f"/v1/batches/{batch['id']}/jobs").json()["data"][0]["id"]
    for path in (f"/v1/batches/{batch['id']}", f"/v1/batches/{batch['id']}/jobs",
                 f"/v1/batches/{batch['id']}/results", f"/v1/jobs/{job_id}", f"/v1/files/{image}"):
        assert bob.get(path).status_code == 404, path
    assert bob.post(f"/v1/batches/{batch['id']}/cancel").status_code == 404
    assert bob.post(f"/v1/jobs/{job_id}/cancel").status_code == 404
    # bob's batch cannot use alice's file either
    response = bob.post("/v1/batches", json={"items": [{"custom_id": "u", "kind": "upscale", "image": image}]})
    assert response.status_code == 422
    assert alice.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"


def test_manifest_upload_paging_and_cancel(settings):
    client = api_client(settings)
    lines = [json.dumps({"custom_id": f"item-{i:02d}", "kind": "generate", "prompt": f"p{i}", "width": 64,
                         "height": 64}) for i in range(25)]
    manifest = "# a comment\n" + "\n".join(lines) + "\n\n"
    response = client.post("/v1/batches/manifest", content=manifest,
                           headers={"Content-Type": "application/x-ndjson"}, params={"metadata": '{"a": 1}'})
    assert response.status_code == 202, response.text
    batch = response.json()
    assert (batch["total"], batch["counts"]["queued"], batch["metadata"]) == (25, 25, {"a": 1})
    seen, cursor = [], None
    while True:
        page = client.get(f"/v1/batches/{batch['id']}/jobs", params={"limit": 10, "cursor": cursor}).json()
        seen += [job["custom_id"] for job in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == [f"item-{i:02d}" for i in range(25)]
    assert queue_length(settings, "bulk") == 2  # 25 jobs of 64x64, 16 per forward pass
    canceled = client.post(f"/v1/batches/{batch['id']}/cancel").json()
    assert canceled["status"] == "canceled" and canceled["counts"]["canceled"] == 25
    assert canceled["finished_at"] is not None
    assert client.get(f"/v1/batches/{batch['id']}/jobs", params={"status": "queued"}).json()["data"] == []
    broken = client.post("/v1/batches/manifest", headers={"Content-Type": "application/x-ndjson"},
                         content='# header\n{"custom_id": "a", "kind": "generate"\n[1]\n{"kind": "upscale"}\n')
    assert broken.status_code == 422
    found = [(e["item"], e["field"]) for e in broken.json()["errors"]]
    assert found == [("line 2", "item"), ("line 3", "item"), ("line 4", "custom_id")]


def test_readiness_checks_every_service(settings):
    client = api_client(settings)
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "redis": "ok", "s3": "ok", "reconciler": "ok"}
    broken = api_client(settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"}))
    response = broken.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["redis"].startswith("redis at redis://127.0.0.1:1/0 is unreachable")


def test_malformed_requests_get_422s_naming_the_field(settings):
    client = api_client(settings)
    bomb = io.BytesIO()
    Image.new("L", (1, 1)).save(bomb, format="PNG")
    header = bytearray(bomb.getvalue())
    header[16:24] = struct.pack(">II", 20000, 20000)  # IHDR claims 20000x20000 pixels
    response = client.post("/v1/files", files={"file": ("bomb.png", bytes(header))})
    assert response.status_code == 422 and response.json()["errors"][0]["field"] == "file"
    manifest = '{"custom_id": "a", "kind": "generate", "prompt": "x"}\n'
    for params, content, field in ((({"metadata": "[1]"}), manifest.encode(), "metadata"),
                                   ({}, b'{"custom_id": "\xff", "kind": "generate"}\n', "body")):
        response = client.post("/v1/batches/manifest", content=content, params=params,
                               headers={"Content-Type": "application/x-ndjson"})
        assert response.status_code == 422, response.text
        assert response.json()["errors"][0]["field"] == field
    # FastAPI's own validation answers in the same shape
    response = client.get(f"/v1/batches/bat_{'0' * 32}/jobs", params={"limit": 5000})
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "query.limit"
    assert job_count(settings) == 0


def test_openapi_declares_bearer_auth_and_error_bodies(settings):
    schema = api_client(settings).get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    create = schema["paths"]["/v1/batches"]["post"]
    assert {"401", "404", "409", "413", "422", "429", "503"} <= set(create["responses"])
    for path in ("/v1/jobs", "/v1/batches", "/v1/batches/manifest"):  # an idempotent replay answers 200
        assert "replay" in schema["paths"][path]["post"]["responses"]["200"]["description"]
    assert schema["components"]["schemas"]["BatchIn"]["properties"]["items"]["minItems"] == 1
    assert create["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorOut")
    spec = schema["components"]["schemas"]["JobSpec"]
    assert sorted(spec["discriminator"]["mapping"]) == ["generate", "inpaint", "upscale"]
    assert "prompt" in schema["components"]["schemas"]["GenerateSpec"]["properties"]
    body = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/JobSpec"}


def test_single_jobs_submitted_together_share_one_micro_batch(settings):
    from fastapi.testclient import TestClient

    from api.app import create_app

    slow = settings.model_copy(update={"coalesce_ms": 1000})
    key = api_client(settings).headers["Authorization"]
    with TestClient(create_app(slow, migrate=False), headers={"Authorization": key}) as client:  # runs lifespan
        ids = [client.post("/v1/jobs", json={"kind": "generate", "prompt": f"mug {i}", "width": 64,
                                             "height": 64}).json()["id"] for i in range(4)]
        deadline = time.monotonic() + 5
        while queue_length(settings, "interactive") == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    message = json.loads(redis.Redis.from_url(settings.redis_url).lpop("interactive.tiny-sd"))
    assert sorted(json.loads(base64.b64decode(message["body"]))[0][0]) == sorted(ids)
    assert queue_length(settings, "interactive") == 0
