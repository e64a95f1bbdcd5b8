"""The dashboard and its API additions against real PostgreSQL, Redis and S3 (no browser here; the
browser tests in tests/e2e drive the same pages live)."""

from __future__ import annotations

import re

import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select, update

from api.app import create_app
from core.db import session_scope
from core.dispatch import lane_queues
from core.keys import create_key
from core.pauses import held
from core.settings import Settings
from core.tables import Job, utcnow
from tests.integration.helpers import api_client

pytestmark = pytest.mark.integration


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
    assert done.status_code == 303 and "canceled%204%20jobs" in done.headers["location"]
    assert acme.get(f"/v1/batches/{batch_id}").json()["status"] == "canceled"

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
