"""The dashboard and its API additions against real PostgreSQL, Redis and S3 (no browser here; the
browser tests in tests/e2e drive the same pages live)."""

from __future__ import annotations

import io
import re

import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select, update

from api.app import create_app
from core.db import session_scope
from core.delivery import deliver
from core.dispatch import lane_queues
from core.keys import create_key
from core.pauses import held
from core.services import free_port
from core.settings import Settings
from core.storage import Storage
from core.tables import Job, WebhookDelivery, utcnow
from core.thumbs import thumb_key
from models.profiles import Registry
from tests.integration import receiver as fixtures
from tests.integration.helpers import api_client, png, upload
from tests.integration.receiver import Receiver, Seen
from workers.batch import MicroBatch

pytestmark = pytest.mark.integration
outbound = fixtures.outbound


def _items(n: int, prefix: str = "sku") -> list[dict]:
    return [{"custom_id": f"{prefix}-{i}", "kind": "generate", "prompt": f"p{i}", "width": 64, "height": 64,
             "steps": 2, "seed": i} for i in range(n)]


def _batch(client: TestClient, n: int = 3, prefix: str = "sku", **metadata: str) -> str:
    response = client.post("/v1/batches", json={"items": _items(n, prefix), "metadata": metadata})
    assert response.status_code == 202, response.text
    batch_id: str = response.json()["id"]
    return batch_id


def browser(settings: Settings, tenant: str, operator: bool = False) -> tuple[TestClient, str]:
    """A dashboard client logged in with a new key of `tenant`, and its CSRF token."""
    with session_scope(settings.database_url) as session:
        key = create_key(session, tenant, operator=operator)
    client = TestClient(create_app(settings, migrate=False))
    response = client.post("/dashboard/login", data={"key": key})
    assert response.status_code == 200, response.text
    match = re.search(r'name="csrf" value="([^"]+)"', response.text)
    assert match
    return client, match.group(1)


def _fail_all(settings: Settings, batch_id: str, error: str = "engine broke") -> None:
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.batch_id == batch_id)
                        .values(status="failed", attempts=3, error=error, finished_at=utcnow()))


def test_list_batches_filters_and_pages_by_cursor(settings):
    acme = api_client(settings, "acme")
    other = api_client(settings, "other")
    spring = _batch(acme, 2, "spring-shoe", season="spring")
    fall = _batch(acme, 2, "fall-coat", season="fall")
    third = _batch(acme, 1, "hat")
    theirs = _batch(other, 1, "spring-shoe", season="spring")

    first = acme.get("/v1/batches", params={"limit": 2}).json()
    assert [b["id"] for b in first["data"]] == [third, fall]  # newest first
    assert first["data"][0]["counts"]["queued"] == 1 and first["data"][0]["progress"] == 0.0
    second = acme.get("/v1/batches", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [b["id"] for b in second["data"]] == [spring] and second["next_cursor"] is None

    by_metadata = acme.get("/v1/batches", params={"q": "fall"}).json()["data"]
    by_custom_id = acme.get("/v1/batches", params={"q": "spring-sh"}).json()["data"]
    assert [b["id"] for b in by_metadata] == [fall]
    assert [b["id"] for b in by_custom_id] == [spring]  # never the other tenant's batch
    assert theirs not in {b["id"] for b in acme.get("/v1/batches").json()["data"]}

    _fail_all(settings, third)
    with session_scope(settings.database_url) as session:
        from core.jobs import complete_batches

        complete_batches(session, [third])
    active = {b["id"] for b in acme.get("/v1/batches", params={"status": "active"}).json()["data"]}
    finished = acme.get("/v1/batches", params={"status": "finished"}).json()["data"]
    assert active == {spring, fall}
    assert [(b["id"], b["status"], b["counts"]["failed"]) for b in finished] == [(third, "failed", 1)]
    assert acme.get("/v1/batches", params={"cursor": "garbage!"}).status_code == 422


def test_retry_requeues_failed_jobs_with_the_same_ids(settings):
    client = api_client(settings)
    batch_id = _batch(client, 3)
    before = {j["id"] for j in client.get(f"/v1/batches/{batch_id}/jobs").json()["data"]}
    _fail_all(settings, batch_id)
    broker = redis.Redis.from_url(settings.redis_url)
    broker.delete(*lane_queues("bulk", settings))

    response = client.post(f"/v1/batches/{batch_id}/retry")
    assert response.status_code == 200, response.text
    assert response.json()["retried"] == 3
    assert response.json()["batch"]["counts"]["queued"] == 3
    jobs = client.get(f"/v1/batches/{batch_id}/jobs").json()["data"]
    assert {j["id"] for j in jobs} == before
    assert {(j["status"], j["attempts"], j["error"]) for j in jobs} == {("queued", 0, None)}
    assert sum(broker.llen(q) for q in lane_queues("bulk", settings)) >= 1  # dispatched again
    assert client.post(f"/v1/batches/{batch_id}/retry").json()["retried"] == 0
    assert api_client(settings, "other").post(f"/v1/batches/{batch_id}/retry").status_code == 404


def test_a_tenant_never_reaches_another_tenants_batch(settings):
    acme = api_client(settings, "acme")
    batch_id = _batch(acme, 2, season="secret-season")
    job_id = acme.get(f"/v1/batches/{batch_id}/jobs").json()["data"][0]["id"]
    intruder, csrf = browser(settings, "other")

    assert batch_id not in intruder.get("/dashboard/batches").text
    assert "secret-season" not in intruder.get("/dashboard/batches", params={"q": "secret"}).text
    assert batch_id not in intruder.get("/dashboard/batches", params={"tenant": "acme"}).text
    assert intruder.get(f"/dashboard/batches/{batch_id}").status_code == 404
    assert intruder.get(f"/dashboard/jobs/{job_id}").status_code == 404
    assert intruder.get(f"/dashboard/batches/{batch_id}", headers={"Accept": "text/event-stream"}).status_code == 404
    assert intruder.get("/dashboard/confirm", params={"action": "cancel-batch", "target": batch_id}).status_code == 404
    refused = intruder.post("/dashboard/actions/cancel-batch", data={"target": batch_id, "csrf": csrf})
    assert refused.status_code == 404
    overview = intruder.get("/dashboard").text
    assert re.search(r'data-queue="bulk"', overview) is None  # acme's queued jobs are not counted here
    # Operator-only actions and pages refuse a tenant key.
    assert intruder.get("/dashboard/workers").status_code == 403
    assert intruder.post("/dashboard/actions/pause", data={"target": "lane:bulk", "csrf": csrf}).status_code == 403
    assert acme.get(f"/v1/batches/{batch_id}").json()["counts"]["queued"] == 2

    operator, _ = browser(settings, "ops", operator=True)
    page = operator.get(f"/dashboard/batches/{batch_id}")
    assert page.status_code == 200 and "secret-season" in page.text
    assert 'data-queue="bulk"' in operator.get("/dashboard").text


def test_actions_need_the_csrf_token_and_say_what_they_touch(settings):
    acme = api_client(settings, "acme")
    batch_id = _batch(acme, 4)
    client, csrf = browser(settings, "acme")
    confirm = client.get("/dashboard/confirm", params={"action": "cancel-batch", "target": batch_id})
    assert confirm.status_code == 200 and "4 queued and 0 running jobs" in confirm.text

    for token in ("", "forged"):
        refused = client.post("/dashboard/actions/cancel-batch", data={"target": batch_id, "csrf": token})
        assert refused.status_code == 403
    assert acme.get(f"/v1/batches/{batch_id}").json()["counts"]["queued"] == 4

    done = client.post("/dashboard/actions/cancel-batch", data={"target": batch_id, "csrf": csrf},
                       follow_redirects=False)
    assert done.status_code == 303 and "notice" not in done.headers["location"]
    assert acme.get(f"/v1/batches/{batch_id}").json()["status"] == "canceled"
    # What it did shows once, on the page it leads to; text in a link's query never does.
    assert "canceled 4 jobs" in client.get(done.headers["location"]).text
    assert "canceled 4 jobs" not in client.get(done.headers["location"]).text
    forged = client.get("/dashboard", params={"notice": "Session expired: log in again at evil.example"})
    assert "evil.example" not in forged.text

    assert client.post("/dashboard/logout", data={"csrf": csrf}).status_code == 200  # back on the login page
    assert client.get("/dashboard", follow_redirects=False).status_code == 303


def test_pausing_a_model_holds_its_micro_batches(settings):
    acme = api_client(settings, "acme")
    batch_id = _batch(acme, 2)
    ids = [j["id"] for j in acme.get(f"/v1/batches/{batch_id}/jobs").json()["data"]]
    operator, csrf = browser(settings, "ops", operator=True)
    confirm = operator.get("/dashboard/confirm", params={"action": "pause", "target": "model:tiny-sd"})
    assert "its 2 queued jobs" in confirm.text
    assert operator.post("/dashboard/actions/pause", data={"target": "model:tiny-sd", "csrf": csrf}).status_code == 200
    with session_scope(settings.database_url) as session:
        assert held(session, ids)
    assert 'step1x_queue_paused{name="tiny-sd",scope="model"} 1.0' in operator.get("/metrics").text
    operator.post("/dashboard/actions/resume", data={"target": "model:tiny-sd", "csrf": csrf})
    with session_scope(settings.database_url) as session:
        assert not held(session, ids)


def test_metrics_agree_with_the_database(settings):
    acme = api_client(settings, "acme")
    _batch(acme, 5)
    failed = _batch(acme, 2, "bad")
    _fail_all(settings, failed)
    acme.post("/v1/jobs", json={"kind": "generate", "prompt": "now", "width": 64, "height": 64, "steps": 2})
    families = {f.name: f for f in text_string_to_metric_families(acme.get("/metrics").text)}
    jobs = {(s.labels["status"], s.labels["model"]): s.value for s in families["step1x_jobs"].samples}
    depth = {s.labels["lane"]: s.value for s in families["step1x_queue_depth"].samples}
    oldest = {s.labels["lane"]: s.value for s in families["step1x_queue_oldest_age_seconds"].samples}
    with session_scope(settings.database_url) as session:
        expected = {(status, model): n for status, model, n in session.execute(
            select(Job.status, Job.model, func.count()).group_by(Job.status, Job.model))}
        queued = dict(session.execute(select(Job.lane, func.count()).where(Job.status == "queued")
                                      .group_by(Job.lane)).tuples().all())
    assert jobs == expected == {("queued", "tiny-sd"): 6, ("failed", "tiny-sd"): 2}
    assert depth == {"bulk": queued["bulk"], "interactive": queued["interactive"]} == {"bulk": 5, "interactive": 1}
    assert 0 <= oldest["bulk"] < 120


def _row(html: str, attribute: str, value: str) -> str:
    """The table row `<tr {attribute}="{value}">` of a page, up to its closing tag."""
    match = re.search(rf'<tr {attribute}="{re.escape(value)}">(.*?)</tr>\s*(?:<tr {attribute}=|</tbody>)', html, re.S)
    assert match, f"no row {attribute}={value}"
    return match.group(1)


def _webhook_fixture(settings: Settings) -> tuple[TestClient, dict[str, str], dict[str, list[str]], Receiver]:
    """Three endpoints of tenant acme at a loopback receiver (one answers 200, one 410, one 500), two
    canceled jobs, and each delivery attempted once by the real sender."""
    def answer(seen: Seen) -> tuple[int, dict[str, str], bytes]:
        return {"/ok": (200, {}, b'{"thanks": "<b>received</b>"}'), "/gone": (410, {}, b"gone for good")}.get(
            seen.path, (500, {}, b"receiver broke"))

    receiver = Receiver("127.0.0.1", free_port(), answer).start()
    acme = api_client(settings, "acme")
    hooks = {}
    for name in ("ok", "gone", "flaky"):
        response = acme.post("/v1/webhooks", json={"url": f"{receiver.url}/{name}", "events": ["job.canceled"]})
        assert response.status_code == 201, response.text
        hooks[name] = response.json()["id"]
    for _ in range(2):
        job_id = acme.post("/v1/jobs", json={"kind": "generate", "prompt": "a mug", "width": 64, "height": 64,
                                             "steps": 1}).json()["id"]
        assert acme.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "canceled"
    ids: dict[str, list[str]] = {}
    with session_scope(settings.database_url) as session:
        for name, endpoint_id in hooks.items():
            ids[name] = list(session.scalars(select(WebhookDelivery.id)
                                             .where(WebhookDelivery.endpoint_id == endpoint_id)
                                             .order_by(WebhookDelivery.created_at)))
    for name in ("ok", "gone", "flaky"):
        for delivery_id in ids[name]:
            deliver(settings, delivery_id, burst=1)
    return acme, hooks, ids, receiver


def test_webhook_pages_show_the_attempt_log_to_its_tenant_only(outbound, monkeypatch):
    _, hooks, ids, receiver = _webhook_fixture(outbound)
    try:
        client, csrf = browser(outbound, "acme")
        listing = client.get("/dashboard/webhooks").text
        for name, counts in {"ok": (0, 2, 0), "gone": (0, 0, 2), "flaky": (2, 0, 0)}.items():
            row = _row(listing, "data-endpoint", hooks[name])
            found = tuple(int(re.search(rf'data-count="{s}">(\d+)<', row).group(1))  # type: ignore[union-attr]
                          for s in ("pending", "succeeded", "failed"))
            assert found == counts, (name, found)
        assert "disabled" in _row(listing, "data-endpoint", hooks["gone"]) and "410 Gone" in listing
        assert "never" in _row(listing, "data-endpoint", hooks["flaky"])  # no success yet
        assert "ago" in _row(listing, "data-endpoint", hooks["ok"])

        log = client.get(f"/dashboard/webhooks/{hooks['ok']}").text
        first = _row(log, "data-delivery", ids["ok"][0])
        assert "job.canceled" in first and "/dashboard/jobs/job_" in first and " ms<" in first
        assert ">200<" in first
        # The receiver's answer is shown as text, never as markup.
        assert "&lt;b&gt;received&lt;/b&gt;" in first and "<b>received</b>" not in log
        flaky = client.get(f"/dashboard/webhooks/{hooks['flaky']}").text
        assert ">500<" in flaky and "receiver broke" in flaky and "next attempt in" in flaky
        gone = client.get(f"/dashboard/webhooks/{hooks['gone']}", params={"status": "failed"}).text
        assert "gone for good" in gone and "endpoint disabled" in gone  # the second was never sent
        assert client.get(f"/dashboard/webhooks/{hooks['ok']}", params={"status": "lost"}).status_code == 422

        # The log pages newest first by cursor.
        monkeypatch.setattr("api.dashboard.deliveries.LOG_PAGE", 1)
        newest = client.get(f"/dashboard/webhooks/{hooks['ok']}").text
        assert ids["ok"][1] in newest and ids["ok"][0] not in newest
        cursor = re.search(r'cursor=([^"&]+)">older deliveries', newest).group(1)  # type: ignore[union-attr]
        older = client.get(f"/dashboard/webhooks/{hooks['ok']}", params={"cursor": cursor}).text
        assert ids["ok"][0] in older and ids["ok"][1] not in older
        cursor = re.search(r'cursor=([^"&]+)">older deliveries', older).group(1)  # type: ignore[union-attr]
        oldest = client.get(f"/dashboard/webhooks/{hooks['ok']}", params={"cursor": cursor}).text
        assert "no deliveries" in oldest and "older deliveries" not in oldest
        monkeypatch.undo()

        # Another tenant sees none of it, through any page, stream or action.
        intruder, intruder_csrf = browser(outbound, "other")
        assert hooks["ok"] not in intruder.get("/dashboard/webhooks", params={"tenant": "acme"}).text
        assert intruder.get(f"/dashboard/webhooks/{hooks['ok']}").status_code == 404
        assert intruder.get(f"/dashboard/webhooks/{hooks['ok']}",
                            headers={"Accept": "text/event-stream"}).status_code == 404
        assert intruder.get("/dashboard/confirm", params={"action": "redeliver",
                                                           "target": ids["ok"][0]}).status_code == 404
        assert intruder.post("/dashboard/actions/redeliver",
                             data={"target": ids["ok"][0], "csrf": intruder_csrf}).status_code == 404
        operator, _ = browser(outbound, "ops", operator=True)
        everyone = operator.get("/dashboard/webhooks").text
        assert all(endpoint_id in everyone for endpoint_id in hooks.values()) and ">acme<" in everyone

        # Redeliver: confirmed first, refused without the CSRF token, then due again under the same id.
        confirm = client.get("/dashboard/confirm", params={"action": "redeliver", "target": ids["ok"][0]})
        assert confirm.status_code == 200 and "same webhook-id" in confirm.text and "1 attempts" in confirm.text
        disabled = client.get("/dashboard/confirm", params={"action": "redeliver", "target": ids["gone"][0]})
        assert "The endpoint is disabled" in disabled.text
        assert client.post("/dashboard/actions/redeliver", data={"target": ids["ok"][0]}).status_code == 403
        with session_scope(outbound.database_url) as session:
            assert session.get(WebhookDelivery, ids["ok"][0]).status == "succeeded"  # type: ignore[union-attr]
        broker = redis.Redis.from_url(outbound.redis_url)
        broker.delete("control")
        done = client.post("/dashboard/actions/redeliver", data={"target": ids["ok"][0], "csrf": csrf},
                           follow_redirects=False)
        assert done.status_code == 303 and done.headers["location"] == f"/dashboard/webhooks/{hooks['ok']}"
        assert broker.llen("control") == 1  # handed to the control process, as the API's redeliver does
        seen = len(receiver.seen)
        assert deliver(outbound, ids["ok"][0], burst=1) == "succeeded"
        assert len(receiver.seen) == seen + 1 and receiver.seen[-1].headers["webhook-id"] == ids["ok"][0]
        again = _row(client.get(f"/dashboard/webhooks/{hooks['ok']}").text, "data-delivery", ids["ok"][0])
        assert again.count("data-attempt=") == 2
    finally:
        receiver.stop()


def test_metrics_count_webhook_deliveries_as_the_database_does(outbound):
    acme, _, _, receiver = _webhook_fixture(outbound)
    receiver.stop()
    families = {f.name: f for f in text_string_to_metric_families(acme.get("/metrics").text)}
    deliveries = {s.labels["status"]: s.value for s in families["step1x_webhook_deliveries"].samples}
    endpoints = {s.labels["state"]: s.value for s in families["step1x_webhook_endpoints"].samples}
    [overdue] = families["step1x_webhook_due_age_seconds"].samples
    with session_scope(outbound.database_url) as session:
        expected = dict(session.execute(select(WebhookDelivery.status, func.count())
                                        .group_by(WebhookDelivery.status)).tuples().all())
    assert deliveries == expected == {"pending": 2, "succeeded": 2, "failed": 2}
    assert endpoints == {"enabled": 2, "disabled": 1}
    assert 0 <= overdue.value < 600  # the 500s' retries fall due within milliseconds; no sender runs here


def test_job_page_shows_every_stage_timing(settings):
    acme = api_client(settings, "acme")
    image = upload(acme, png((48, 32)))
    items = [{"custom_id": f"up-{i}", "kind": "upscale", "image": image, "model": "lanczos-x4",
              "output_format": "jpeg" if i else "png"} for i in range(2)]
    batch_id = acme.post("/v1/batches", json={"items": items}).json()["id"]
    with session_scope(settings.database_url) as session:
        jobs = list(session.scalars(select(Job.id).where(Job.batch_id == batch_id)))
    MicroBatch(settings, Storage(settings), Registry(settings).get, worker="test@host").run(jobs)
    client, _ = browser(settings, "acme")
    for job_id in jobs:
        with session_scope(settings.database_url) as session:
            row = session.get(Job, job_id)
            assert row is not None and row.timings is not None
            timings = row.timings
        assert set(timings) == {"queued", "claim", "load", "run", "encode", "upload"}
        assert all(seconds >= 0 for seconds in timings.values()) and timings["encode"] > 0 and timings["upload"] > 0
        page = client.get(f"/dashboard/jobs/{job_id}").text
        for stage in timings:
            assert re.search(rf'data-stage="{stage}"[^>]*><th>[^<]+</th><td class="num">\d+\.\d{{3}} s<', page), stage
        assert "queue wait" in page and "total running" in page


def test_pages_show_thumbnails_and_small_outputs_as_they_are(settings):
    """A 320 px output gets a 256 px WebP thumbnail and pages show that; a 64 px output is smaller
    than any thumbnail, so none is written (no second copy, no second PUT) and pages show it."""
    acme = api_client(settings, "acme")
    items = [{"custom_id": name, "kind": "upscale", "image": upload(acme, png((side, side))), "model": "lanczos-x4"}
             for name, side in (("large", 80), ("small", 16))]
    batch_id = acme.post("/v1/batches", json={"items": items}).json()["id"]
    with session_scope(settings.database_url) as session:
        jobs = {job.custom_id: job.id for job in session.scalars(select(Job).where(Job.batch_id == batch_id))}
    MicroBatch(settings, Storage(settings), Registry(settings).get, worker="test@host").run(list(jobs.values()))
    storage, client = Storage(settings), browser(settings, "acme")[0]
    sheet = client.get(f"/dashboard/batches/{batch_id}").text
    outputs = {}
    for name, has_thumbnail in (("large", True), ("small", False)):
        with session_scope(settings.database_url) as session:
            row = session.get(Job, jobs[name])
            assert row is not None and row.output_keys and row.result is not None
            output = outputs[name] = row.output_keys[0]
            result = row.result
        assert result["thumbnails"] is has_thumbnail
        assert storage.exists(thumb_key(output)) is has_thumbnail
        shown = thumb_key(output) if has_thumbnail else output
        assert shown in client.get(f"/dashboard/jobs/{jobs[name]}").text and shown in sheet
    with Image.open(io.BytesIO(storage.get(thumb_key(outputs["large"])))) as thumbnail:
        assert (thumbnail.format, thumbnail.size) == ("WEBP", (256, 256))
