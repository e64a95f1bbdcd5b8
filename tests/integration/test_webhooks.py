"""Webhooks end to end with real processes: the control process (a Celery worker with a thread pool
and its beat) delivers from the outbox in PostgreSQL to a receiver listening on loopback, which
checks every delivery with the `standardwebhooks` library (written by others, so it checks our
signing independently)."""

from __future__ import annotations

import ipaddress
import json
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import redis
from sqlalchemy import select, update
from standardwebhooks import Webhook

from core import outbound as core_outbound
from core.db import session_scope
from core.delivery import DISABLE_AFTER, deliver
from core.services import free_port
from core.settings import Settings
from core.storage import Storage
from core.tables import Job, WebhookDelivery, WebhookEndpoint, utcnow
from models.profiles import Registry
from tests.integration import receiver as fixtures
from tests.integration.helpers import api_client, png, upload
from tests.integration.receiver import Receiver, Seen, wait_for
from workers.batch import MicroBatch

pytestmark = pytest.mark.integration
outbound, control = fixtures.outbound, fixtures.control


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver("127.0.0.1", free_port()).start()
    yield server
    server.stop()


def verified(seen: Seen, secret: str) -> dict:
    payload: dict = Webhook(secret).verify(seen.body, seen.headers)
    return payload


def endpoint(client, url: str, events: list[str] | None = None) -> dict:
    response = client.post("/v1/webhooks", json={"url": url, **({"events": events} if events else {})})
    assert response.status_code == 201, response.text
    body: dict = response.json()
    assert body["secret"].startswith("whsec_")
    return body


def canceled_job(client, **callback: object) -> str:
    response = client.post("/v1/jobs", json={"kind": "generate", "prompt": "a mug", "steps": 1, "width": 64,
                                             "height": 64, **callback})
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "canceled"
    return job_id


def run_batch(settings: Settings, batch_id: str) -> None:
    with session_scope(settings.database_url) as session:
        ids = list(session.scalars(select(Job.id).where(Job.batch_id == batch_id)))
    MicroBatch(settings, Storage(settings), Registry(settings).get, worker="test@host").run(ids)


def test_batch_completed_reaches_endpoint_and_callback_signed(outbound, control, receiver):
    client = api_client(outbound)
    hook = endpoint(client, f"{receiver.url}/endpoint")
    tenant_secret = client.get("/v1/webhooks/secret").json()["secret"]
    per_item = endpoint(client, f"{receiver.url}/items", ["job.succeeded"])  # named: takes a batch's items
    image = upload(client, png((32, 24)))
    items = [{"custom_id": f"sku-{i}", "kind": "upscale", "image": image, "model": "lanczos-x4"} for i in range(3)]
    response = client.post("/v1/batches", json={"items": items, "webhook": f"{receiver.url}/callback"})
    assert response.status_code == 202, response.text
    batch_id = response.json()["id"]
    run_batch(outbound, batch_id)

    wait_for(lambda: len(receiver.seen) >= 5, what="batch.completed at the endpoint and the callback, 3 items")
    by_path = {seen.path: seen for seen in receiver.seen}
    item_events = [verified(s, per_item["secret"]) for s in receiver.seen if s.path == "/items"]
    assert sorted(e["data"]["custom_id"] for e in item_events) == ["sku-0", "sku-1", "sku-2"]
    for item in item_events:
        assert (item["type"], item["data"]["batch_id"], item["data"]["sequence"]) == ("job.succeeded", batch_id, 1)
        [output] = item["data"]["outputs"]
        assert output["key"].endswith(".png") and output["url"].startswith(outbound.s3_endpoint_url)
    for path, secret in (("/endpoint", hook["secret"]), ("/callback", tenant_secret)):
        payload = verified(by_path[path], secret)
        assert payload["type"] == "batch.completed"
        data = payload["data"]
        assert (data["id"], data["status"], data["total"]) == (batch_id, "completed", 3)
        assert data["counts"]["succeeded"] == 3 and data["sequence"] >= 1
        assert data["results_url"] == f"http://api.example/v1/batches/{batch_id}/results"
        assert len(by_path[path].body) < 20_000
    with pytest.raises(Exception, match="signature"):  # the wrong secret does not verify
        Webhook(tenant_secret).verify(by_path["/endpoint"].body, by_path["/endpoint"].headers)
    # "*" leaves out a batch's per-item events: three items, no job.* calls.
    assert not [s for s in receiver.seen if s.path != "/items" and json.loads(s.body)["type"].startswith("job.")]
    log = client.get(f"/v1/webhooks/{hook['id']}/deliveries").json()["data"]
    assert [(d["type"], d["status"], d["attempts"][0]["status_code"]) for d in log] == \
        [("batch.completed", "succeeded", 204)]


def test_receiver_down_then_up_gets_every_event_once_per_webhook_id(outbound, control, receiver):
    client = api_client(outbound)
    receiver.stop()  # down: connections are refused
    hook = endpoint(client, receiver.url, ["job.canceled"])
    jobs = [canceled_job(client) for _ in range(4)]

    def failed_twice() -> bool:
        log = client.get(f"/v1/webhooks/{hook['id']}/deliveries").json()["data"]
        return len(log) == 4 and all(len(d["attempts"]) >= 2 for d in log)

    wait_for(failed_twice, what="two failed attempts each while the receiver is down")
    receiver.start()
    # Generous: on a loaded machine the retries may have reached the schedule's 18 s step (scaled).
    wait_for(lambda: len({s.headers["webhook-id"] for s in receiver.seen}) == 4, timeout=90,
             what="every event after the outage")
    by_id: dict[str, set[str]] = {}
    for seen in receiver.seen:
        by_id.setdefault(seen.headers["webhook-id"], set()).add(verified(seen, hook["secret"])["data"]["id"])
    # One webhook-id per event, and every copy of one webhook-id is the same event.
    assert sorted(job for ids in by_id.values() for job in ids) == sorted(jobs)
    succeeded = f"/v1/webhooks/{hook['id']}/deliveries?status=succeeded"
    wait_for(lambda: len(client.get(succeeded).json()["data"]) == 4, what="the successes recorded")
    log = client.get(succeeded).json()["data"]
    assert sorted(d["id"] for d in log) == sorted(by_id)
    assert all(d["attempts"][0]["error"] and d["attempts"][-1]["status_code"] == 204 for d in log)


def test_rotation_signs_with_both_secrets(outbound, control, receiver):
    client = api_client(outbound)
    hook = endpoint(client, receiver.url)
    rotated = client.post(f"/v1/webhooks/{hook['id']}/rotate").json()
    assert rotated["secret"] != hook["secret"]
    canceled_job(client)
    [seen] = wait_for(lambda: receiver.seen, what="a delivery")  # type: ignore[misc]
    assert len(seen.headers["webhook-signature"].split(" ")) == 2
    assert verified(seen, hook["secret"]) == verified(seen, rotated["secret"])


def test_410_disables_the_endpoint(outbound, control, receiver):
    client = api_client(outbound)
    receiver.answer = lambda _: (410, {}, b"gone for good")
    hook = endpoint(client, receiver.url)
    canceled_job(client)
    wait_for(lambda: not client.get(f"/v1/webhooks/{hook['id']}").json()["enabled"], what="the endpoint disabled")
    assert "410" in client.get(f"/v1/webhooks/{hook['id']}").json()["disabled_reason"]
    [delivery] = client.get(f"/v1/webhooks/{hook['id']}/deliveries").json()["data"]
    assert delivery["status"] == "failed" and delivery["attempts"][0]["response"] == "gone for good"


def test_retry_after_is_honoured_and_redelivery_keeps_the_webhook_id(outbound, control, receiver):
    client = api_client(outbound)
    answers = iter([(429, {"Retry-After": "2"}, b"slow down")])
    receiver.answer = lambda _: next(answers, (200, {}, b"ok"))
    hook = endpoint(client, receiver.url)
    canceled_job(client)
    wait_for(lambda: len(receiver.seen) == 2, what="the retry")
    first, second = receiver.seen
    # The schedule alone (scaled 1000x down) would retry within milliseconds.
    assert second.at - first.at >= 1.9
    assert first.headers["webhook-id"] == second.headers["webhook-id"]

    [delivery] = client.get(f"/v1/webhooks/{hook['id']}/deliveries").json()["data"]
    again = client.post(f"/v1/webhooks/{hook['id']}/deliveries/{delivery['id']}/redeliver")
    assert again.status_code == 200, again.text
    wait_for(lambda: len(receiver.seen) == 3, what="the redelivery")
    assert receiver.seen[2].headers["webhook-id"] == delivery["id"]
    verified(receiver.seen[2], hook["secret"])

    receiver.answer = lambda _: (500, {}, b"")
    since = datetime.now(UTC).isoformat()
    canceled_job(client)
    wait_for(lambda: len(receiver.seen) >= 5, what="failing attempts")
    client.patch(f"/v1/webhooks/{hook['id']}", json={"enabled": False})  # its next attempt fails at once
    wait_for(lambda: client.get(f"/v1/webhooks/{hook['id']}/deliveries?status=failed").json()["data"],
             what="the delivery to fail once the endpoint is off")
    receiver.answer = lambda _: (200, {}, b"")
    client.patch(f"/v1/webhooks/{hook['id']}", json={"enabled": True})
    recovered = client.post(f"/v1/webhooks/{hook['id']}/recover", json={"since": since}).json()
    assert recovered == {"redelivering": 1}
    wait_for(lambda: client.get(f"/v1/webhooks/{hook['id']}/deliveries?status=failed").json()["data"] == [],
             what="the recovered delivery")


def test_an_address_off_the_allow_list_is_refused_before_any_connection(outbound):
    other = Receiver("127.0.0.2", free_port()).start()  # loopback, but not on STEP1X_OUTBOUND_ALLOW
    try:
        client = api_client(outbound)
        response = client.post("/v1/webhooks", json={"url": other.url})
        assert response.status_code == 422
        [error] = response.json()["errors"]
        assert error["field"] == "url" and "127.0.0.2" in error["message"] and "loopback" in error["message"]
        response = client.post("/v1/jobs", json={"kind": "generate", "prompt": "x", "webhook": other.url})
        assert (response.status_code, response.json()["errors"][0]["field"]) == (422, "webhook")
        items = [{"custom_id": "a", "kind": "upscale", "model": "lanczos-x4", "image": f"{other.url}/photo.png"}]
        response = client.post("/v1/batches", json={"items": items})
        assert response.status_code == 422
        assert response.json()["errors"][0] | {"message": ""} == {"item": "a", "field": "image", "message": ""}
        for url in ("http://169.254.169.254/latest", "http://[::ffff:127.0.0.1]/", "http://10.0.0.1/",
                    "http://100.64.0.1/", "http://[fd00::1]/", "http://0.0.0.0/", "ftp://127.0.0.1/"):
            assert client.post("/v1/webhooks", json={"url": url}).status_code == 422, url
        with socket.create_connection(("127.0.0.2", other.port)):  # the listener works: it was simply never called
            pass
        wait_for(lambda: other.connections == 1, what="the probe connection")
        assert other.seen == []
    finally:
        other.stop()


def test_a_slow_receiver_does_not_hold_up_the_others(outbound, control, receiver):
    client = api_client(outbound)
    slow = Receiver("127.0.0.1", free_port(), lambda _: (time.sleep(3), (200, {}, b""))[1]).start()
    try:
        endpoint(client, slow.url, ["job.canceled"])
        endpoint(client, receiver.url, ["job.canceled"])
        for _ in range(12):
            canceled_job(client)
        wait_for(lambda: len(receiver.seen) == 12, what="all 12 at the fast receiver")
        # The slow one has had at most 4 attempts on the wire at a time, so it is far behind.
        assert len(slow.seen) <= 8
    finally:
        slow.stop()


def test_a_message_lost_with_redis_only_delays_the_delivery(outbound, receiver, request):
    client = api_client(outbound)
    hook = endpoint(client, receiver.url, ["job.canceled"])
    job_id = canceled_job(client)  # no control process yet: its message waits in Redis...
    redis.Redis.from_url(outbound.redis_url).flushdb()  # ...and is lost
    request.getfixturevalue("control")
    [seen] = wait_for(lambda: receiver.seen, what="the due pass to find the delivery")  # type: ignore[misc]
    assert verified(seen, hook["secret"])["data"]["id"] == job_id


def test_an_endpoint_failing_for_days_is_disabled_saying_why(outbound, receiver):
    receiver.answer = lambda _: (500, {}, b"")
    client = api_client(outbound)
    hook = endpoint(client, receiver.url)
    days = DISABLE_AFTER * outbound.outbound_retry_scale  # 5 days, scaled like the schedule
    with session_scope(outbound.database_url) as session:
        session.execute(update(WebhookEndpoint).where(WebhookEndpoint.id == hook["id"])
                        .values(failing_since=utcnow() - days - timedelta(seconds=1)))
    canceled_job(client)
    with session_scope(outbound.database_url) as session:
        [delivery_id] = session.scalars(select(WebhookDelivery.id).where(WebhookDelivery.endpoint_id == hook["id"]))
    assert deliver(outbound, delivery_id) == "pending"  # this attempt failed, and was the last straw
    body = client.get(f"/v1/webhooks/{hook['id']}").json()
    assert not body["enabled"] and "without a success" in body["disabled_reason"] and "HTTP 500" in \
        body["disabled_reason"]


def test_every_connection_is_checked_again(outbound, receiver):
    """Allowed when registered, refused when sent: the allow-list no longer admits the receiver, so
    the attempt fails at the connection's own check and the receiver never sees a connection."""
    client = api_client(outbound)
    hook = endpoint(client, receiver.url, ["job.canceled"])
    canceled_job(client)
    with session_scope(outbound.database_url) as session:
        [delivery_id] = session.scalars(select(WebhookDelivery.id).where(WebhookDelivery.endpoint_id == hook["id"]))
    narrowed = outbound.model_copy(update={"outbound_allow": "127.0.0.3/32"})
    assert deliver(narrowed, delivery_id) == "pending"  # failed, to be retried on schedule
    [logged] = client.get(f"/v1/webhooks/{hook['id']}/deliveries").json()["data"]
    error = logged["attempts"][0]["error"]
    assert logged["attempts"][0]["status_code"] is None and "127.0.0.1" in error and "loopback" in error
    assert receiver.connections == 0 and receiver.seen == []


def test_the_connection_goes_to_the_address_that_was_checked(outbound, receiver, monkeypatch):
    """The host is resolved once per connection, by the check, and the socket is opened to the
    address it approved: a second lookup (the DNS rebinding gap) would find nothing for this name.
    The resolver is the one stand-in here; the connections are real."""
    answers = {"shop.test": ipaddress.ip_address("127.0.0.1"), "rebound.test": ipaddress.ip_address("127.0.0.2")}
    looked_up: list[str] = []

    def resolve(host: str, port: int) -> list:
        looked_up.append(host)
        return [answers[host]]

    monkeypatch.setattr(core_outbound, "resolve", resolve)
    other = Receiver("127.0.0.2", free_port()).start()  # what a rebound name would point at: not allowed
    try:
        with core_outbound.client(outbound, 5) as http:
            assert http.post(f"http://shop.test:{receiver.port}/hook", content=b"{}").status_code == 204
            with pytest.raises(core_outbound.Refused, match=r"127\.0\.0\.2.*loopback"):
                http.post(f"http://rebound.test:{other.port}/hook", content=b"{}")
        assert looked_up == ["shop.test", "rebound.test"]
        assert [s.headers["Host"] for s in receiver.seen] == [f"shop.test:{receiver.port}"]
        assert other.connections == 0
    finally:
        other.stop()


def test_the_attempt_log_pages_newest_first(outbound, receiver):
    """`GET /v1/webhooks/{id}/deliveries` walks (created_at, id) downwards with its cursor: every
    delivery once, newest first, across pages and with a status filter."""
    client = api_client(outbound, "acme")
    hook = endpoint(client, receiver.url, ["job.canceled"])
    for _ in range(5):
        canceled_job(client)
    with session_scope(outbound.database_url) as session:
        expected = list(session.scalars(select(WebhookDelivery.id).where(WebhookDelivery.endpoint_id == hook["id"])
                                        .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc())))
    assert len(expected) == 5
    seen, cursor = [], None
    while True:
        page = client.get(f"/v1/webhooks/{hook['id']}/deliveries", params={"limit": 2, "status": "pending",
                                                                         **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200, page.text
        seen += [row["id"] for row in page.json()["data"]]
        if (cursor := page.json()["next_cursor"]) is None:
            break
    assert seen == expected
    bad = client.get(f"/v1/webhooks/{hook['id']}/deliveries", params={"cursor": "nope"})
    assert bad.status_code == 422 and "cursor" in bad.text
