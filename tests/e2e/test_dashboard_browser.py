"""The dashboard in a real browser (Debian's Chromium driven by Playwright) against a running stack:
the API served by uvicorn on loopback, a real Celery worker, PostgreSQL, Redis and S3."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from playwright.sync_api import Browser, Page, sync_playwright
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from api.app import create_app
from api.dashboard.views import SHEET
from core import dispatch, webhooks
from core.db import session_scope
from core.keys import create_key
from core.pauses import pause, resume
from core.services import free_port
from core.settings import Settings
from core.storage import Storage, input_key
from core.tables import Job, WebhookDelivery, WorkerRow
from tests.integration import receiver as fixtures
from tests.integration.helpers import mask_png, png
from tests.integration.receiver import Receiver, wait_for
from workers.launcher import start_workers, stop_all
from workers.pause import CHECK_SECONDS

pytestmark = pytest.mark.e2e
outbound, control = fixtures.outbound, fixtures.control

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@dataclass
class Stack:
    url: str
    settings: Settings
    keys: dict[str, str]

    def api(self, tenant: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.keys[tenant]}"}, timeout=30)


@pytest.fixture
def api_server(settings: Settings) -> Iterator[Stack]:
    """The API in a thread of this process, on a loopback port, with keys for two tenants and an operator."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings, migrate=False), host="127.0.0.1", port=port,
                                           log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    with session_scope(settings.database_url) as session:
        keys = {"acme": create_key(session, "acme"), "other": create_key(session, "other"),
                "ops": create_key(session, "ops", operator=True)}
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "API did not start"
        time.sleep(0.05)
    yield Stack(f"http://127.0.0.1:{port}", settings, keys)
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (make setup does)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, chromium_sandbox=False)
        yield chromium
        chromium.close()


def log_in(browser: Browser, stack: Stack, tenant: str) -> Page:
    page = browser.new_page(base_url=stack.url)
    page.goto("/dashboard/batches")
    assert "/dashboard/login" in page.url  # not logged in yet: sent to the login page, then back
    page.fill("input[name=key]", stack.keys[tenant])
    page.click("button[type=submit]")
    page.wait_for_url("**/dashboard/batches")
    return page


def progress(page: Page, batch_id: str) -> int:
    value = page.locator(f'progress[data-batch="{batch_id}"]').first.get_attribute("value")
    return int(value or 0)


def queued_in(settings: Settings, **where: str) -> int:
    with session_scope(settings.database_url) as session:
        query = select(func.count()).where(Job.status == "queued")
        for column, value in where.items():
            query = query.where(getattr(Job, column) == value)
        return int(session.scalar(query) or 0)


def test_operator_watches_a_batch_run_retries_and_cancels(api_server, browser, settings, tmp_path):
    stack = api_server
    metrics_port = free_port()
    env = {k: v for k, v in os.environ.items() if k.startswith("STEP1X_")}
    workers = start_workers([], tmp_path, env={**env, "STEP1X_WORKER_METRICS_PORT": str(metrics_port)})
    acme = stack.api("acme")
    try:
        # Paused: submissions are accepted and wait, so the overview's numbers hold still to compare.
        with session_scope(settings.database_url) as session:
            pause(session, "model", "tiny-sd", "ops")
        # Six micro-batches of 16 at the most steps a job may ask for. One pass takes about a second
        # on a 2-core CPU, about one live tick: with three passes the bar could show both of its steps
        # between two ticks and go from 0 to done. With six it shows 16 to 80 for about five ticks.
        size = 96
        items = [{"custom_id": f"sku-{i}", "kind": "generate", "prompt": f"p{i}", "width": 64, "height": 64,
                  "steps": 150, "seed": i} for i in range(size)]
        batch_id = acme.post("/v1/batches", json={"items": items}).json()["id"]

        page = log_in(browser, stack, "ops")
        page.goto("/dashboard")
        bulk = page.locator('table[data-scope="lane"] tr[data-queue="bulk"] [data-field="queued"]')
        model = page.locator('table[data-scope="model"] tr[data-queue="tiny-sd"] [data-field="queued"]')
        assert int(bulk.inner_text()) == queued_in(settings, lane="bulk") == size
        assert int(model.inner_text()) == queued_in(settings, model="tiny-sd") == size
        assert "paused" in page.locator('table[data-scope="model"] tr[data-queue="tiny-sd"]').inner_text()

        # The progress bar moves while the batch runs, with no reload: the page marker survives.
        page.goto("/dashboard/batches")
        page.wait_for_function("document.getElementById('live-state').textContent === 'live'")
        page.evaluate("window.__sameDocument = true")
        assert progress(page, batch_id) == 0
        with session_scope(settings.database_url) as session:
            resume(session, "model", "tiny-sd")
        seen = {0}
        deadline = time.monotonic() + 180
        while (shown := progress(page, batch_id)) < size:  # one read per look: two could straddle the end
            seen.add(shown)
            assert time.monotonic() < deadline, f"progress stuck at {sorted(seen)}"
            time.sleep(0.1)
        assert page.evaluate("window.__sameDocument") is True
        assert seen - {0}, "the bar went from 0 to done with no live update in between"

        # The batch page shows the contact sheet from presigned URLs; these 64 px outputs are smaller
        # than a thumbnail, so they are shown as they are (larger ones get a WebP thumbnail).
        page.goto(f"/dashboard/batches/{batch_id}")
        thumbs = page.locator(".sheet img")
        assert thumbs.count() == SHEET  # the first 48 of 96
        first = thumbs.first.get_attribute("src") or ""
        assert "/outputs/acme/" in first and ".png" in first
        assert httpx.get(first).headers["content-type"] == "image/png"
        # The sheet's images load lazily: those below the fold only once scrolled to. Load them all.
        page.evaluate("document.querySelectorAll('.sheet img').forEach(i => { i.loading = 'eager'; })")
        page.wait_for_function("Array.from(document.querySelectorAll('.sheet img')).every(i => i.complete)")
        assert page.evaluate("Array.from(document.querySelectorAll('.sheet img')).every(i => i.naturalWidth === 64)")

        # A failure the operator can fix: the input photo vanished from storage. Retry after restoring it.
        storage = Storage(settings)
        image = acme.post("/v1/files", files={"file": ("p.png", png((96, 64), seed=3))}).json()["id"]
        mask = acme.post("/v1/files", files={"file": ("m.png", mask_png((96, 64)))}).json()["id"]
        photo = storage.get(input_key("acme", image))
        storage.client.delete_object(Bucket=settings.s3_bucket, Key=input_key("acme", image))
        fills = [{"custom_id": f"fill-{i}", "kind": "inpaint", "mode": "fill", "image": image, "mask": mask,
                  "seed": i} for i in range(3)]
        failing = acme.post("/v1/batches", json={"items": fills}).json()["id"]
        _wait_status(acme, failing, "failed")
        ids_before = sorted(j["id"] for j in acme.get(f"/v1/batches/{failing}/jobs").json()["data"])
        storage.put(input_key("acme", image), photo, "image/png")

        page.goto(f"/dashboard/batches/{failing}")
        assert "3" in page.locator('[data-count="failed"]').inner_text()
        page.click("text=Retry failed jobs")
        assert "Retry 3 failed jobs" in page.locator("h1").inner_text()
        page.click("button:has-text('Confirm')")
        assert "retried 3 failed jobs" in page.locator(".notice").inner_text()
        page.wait_for_function("document.querySelector('[data-field=status]').textContent === 'completed'",
                               timeout=120_000)
        jobs = acme.get(f"/v1/batches/{failing}/jobs").json()["data"]
        assert sorted(j["id"] for j in jobs) == ids_before
        assert {(j["status"], j["attempts"]) for j in jobs} == {("succeeded", 1)}
        assert page.locator(".sheet img[alt=before]").count() == 3  # inpainting: before and after

        # Cancel a batch waiting behind a pause.
        with session_scope(settings.database_url) as session:
            pause(session, "lane", "bulk", "ops")
        time.sleep(CHECK_SECONDS + 0.5)  # workers re-read the pauses at this pace
        waiting = acme.post("/v1/batches", json={"items": items[:5]}).json()["id"]
        page.goto(f"/dashboard/batches/{waiting}")
        page.click("text=Cancel batch")
        assert "5 queued and 0 running jobs" in page.locator(".touches").inner_text()
        page.click("button:has-text('Confirm')")
        assert "canceled 5 jobs" in page.locator(".notice").inner_text()
        assert acme.get(f"/v1/batches/{waiting}").json()["status"] == "canceled"
        with session_scope(settings.database_url) as session:
            resume(session, "lane", "bulk")

        # Drain the worker: it stops consuming (a Celery broadcast), so new work waits; undrain resumes.
        name = f"cpu@{socket.gethostname()}"
        deadline = time.monotonic() + 30
        while True:  # the row its heartbeat keeps, once a beat says the last micro-batch is done
            with session_scope(settings.database_url) as session:
                worker = session.get(WorkerRow, name)
                if worker is not None and worker.current is None:
                    break
            assert time.monotonic() < deadline, f"worker {name}: no heartbeat with nothing in hand"
            time.sleep(0.2)
        page.goto("/dashboard/workers")
        row = page.locator(f'tr[data-worker="{name}"]')
        assert "MiB" in (row.locator("svg.spark title").last.text_content() or "")  # sampled memory history
        page.click("text=drain…")
        assert "finishes nothing in hand now, then takes nothing more" in page.locator(".touches").inner_text()
        page.click("button:has-text('Confirm')")
        assert "draining" in page.locator(".notice").inner_text()
        deadline = time.monotonic() + 30
        inspect = dispatch.app_for(settings).control.inspect(destination=[name], timeout=1)
        while (queues := inspect.active_queues()) != {name: []}:  # the broadcast has reached the worker
            assert time.monotonic() < deadline, f"worker {name} still consumes {queues}"
            time.sleep(0.2)
        later = acme.post("/v1/batches", json={"items": items[:1]}).json()["id"]
        time.sleep(2)
        assert acme.get(f"/v1/batches/{later}").json()["status"] == "queued"
        page.click("text=undrain…")
        page.click("button:has-text('Confirm')")
        _wait_status(acme, later, "completed")

        # The worker's own metrics: micro-batch sizes and images produced, as the database says.
        # The worker counts a micro-batch after recording it in the database: wait for the count.
        deadline = time.monotonic() + 20
        while True:
            families = {f.name: f for f in text_string_to_metric_families(
                httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text)}
            images = sum(s.value for s in families["step1x_images_produced"].samples if s.name.endswith("_total"))
            if images == size + 4 or time.monotonic() > deadline:  # the batch, 3 fills, the later one
                break
            time.sleep(0.2)
        with session_scope(settings.database_url) as session:
            succeeded = session.scalar(select(func.count()).where(Job.status == "succeeded"))
        assert images == succeeded == size + 4
        sizes = [s for s in families["step1x_microbatch_size"].samples if s.name.endswith("_sum")]
        assert sum(s.value for s in sizes) >= size + 4
    finally:
        stop_all(workers)


def _wait_status(client: httpx.Client, batch_id: str, status: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while client.get(f"/v1/batches/{batch_id}").json()["status"] != status:
        assert time.monotonic() < deadline, client.get(f"/v1/batches/{batch_id}").json()
        time.sleep(0.2)


def test_a_tenant_sees_only_its_own_work_and_actions_need_csrf(api_server, browser, settings):
    stack = api_server
    theirs = stack.api("acme").post("/v1/batches", json={"items": [
        {"custom_id": "secret-sku", "kind": "generate", "prompt": "p"}]}).json()["id"]
    page = log_in(browser, stack, "other")
    assert theirs not in page.content()
    response = page.goto(f"/dashboard/batches/{theirs}")
    assert response is not None and response.status == 404
    stream = page.request.get(f"/dashboard/batches/{theirs}", headers={"Accept": "text/event-stream"})
    assert stream.status == 404

    # Logged in as acme: the batch is there, but a POST without the session's CSRF token is refused.
    mine = log_in(browser, stack, "acme")
    mine.goto(f"/dashboard/batches/{theirs}")
    assert "secret-sku" in mine.content()
    forged = mine.request.post("/dashboard/actions/cancel-batch", form={"target": theirs})
    assert forged.status == 403
    assert stack.api("acme").get(f"/v1/batches/{theirs}").json()["status"] == "queued"


def test_webhook_deliveries_page_shows_attempts_and_redelivers(outbound, control, api_server, browser):
    stack = api_server
    receiver = Receiver("127.0.0.1", free_port()).start()
    try:
        with session_scope(outbound.database_url) as session:  # allow-listed loopback: see `outbound`
            hook_id = webhooks.create_endpoint(session, outbound, "acme", f"{receiver.url}/hook", ["job.canceled"]).id
        acme = stack.api("acme")
        job_id = acme.post("/v1/jobs", json={"kind": "generate", "prompt": "a mug", "steps": 1}).json()["id"]
        assert acme.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "canceled"
        wait_for(lambda: receiver.seen, what="the first delivery")
        delivery_id = receiver.seen[0].headers["webhook-id"]

        page = log_in(browser, stack, "acme")
        page.click("nav >> text=Webhooks")
        page.click(f'tr[data-endpoint="{hook_id}"] a')
        row = page.locator(f'tr[data-delivery="{delivery_id}"]')
        attempts = f'tr[data-delivery="{delivery_id}"] tr[data-attempt]'
        page.wait_for_function(f"document.querySelectorAll('{attempts}').length === 1")  # live, if not yet logged
        assert "204" in row.locator('tr[data-attempt="1"]').inner_text() and job_id[:16] in row.inner_text()

        row.locator("text=redeliver…").click()
        assert "same webhook-id" in page.locator(".touches").inner_text()
        page.click("button:has-text('Confirm')")
        assert "redelivering" in page.locator(".notice").inner_text()
        wait_for(lambda: len(receiver.seen) == 2, what="the redelivery at the receiver")
        assert receiver.seen[1].headers["webhook-id"] == delivery_id
        # The second attempt appears on the page that was open, through its live updates.
        page.wait_for_function(f"document.querySelectorAll('{attempts}').length === 2")

        forged = page.request.post("/dashboard/actions/redeliver", form={"target": delivery_id})
        assert forged.status == 403
        intruder = log_in(browser, stack, "other")
        response = intruder.goto(f"/dashboard/webhooks/{hook_id}")
        assert response is not None and response.status == 404
        intruder.goto("/dashboard/webhooks")
        assert hook_id not in intruder.content() and "no webhook endpoints" in intruder.content()
        with session_scope(outbound.database_url) as session:
            assert session.get(WebhookDelivery, delivery_id).status == "succeeded"  # type: ignore[union-attr]
        assert len(receiver.seen) == 2  # the forged POST sent nothing
    finally:
        receiver.stop()
