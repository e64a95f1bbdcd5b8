"""`make screenshots`: the README's pictures of each dashboard page, taken from a demo run.

Starts the embedded stack in a scratch folder, submits the demo catalog (upscales through Lanczos, so
nothing needs fetching), and photographs the pages with Debian's Chromium while it runs and after.
Two webhook endpoints point at a receiver on loopback (allow-listed for this run only): one answers
200, the other 503 to each first attempt, so the deliveries pages show a retry.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
from PIL import Image
from playwright.sync_api import Page, ViewportSize, sync_playwright

from core.db import session_scope
from core.keys import create_key
from core.services import free_port
from core.settings import Settings
from step1x.client import Client
from step1x.demo import write_catalog
from step1x.stack import EmbeddedStack

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEWPORT = ViewportSize(width=1200, height=820)


def _offline_catalog(folder: Path) -> Path:
    manifest = write_catalog(folder)
    lines = manifest.read_text().splitlines()
    manifest.write_text("".join(line.replace('"kind": "upscale",', '"kind": "upscale", "model": "lanczos-x4",') + "\n"
                                for line in lines))
    return manifest


class _Receiver(BaseHTTPRequestHandler):
    """Answers /catalog with 200; /erp with 503 the first time it sees a webhook-id, 200 after."""

    seen: set[str] = set()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        msg_id = self.headers.get("webhook-id", "")
        busy = self.path == "/erp" and msg_id not in self.seen
        self.seen.add(msg_id)
        body = b"maintenance window, try later" if busy else b'{"received": true}'
        self.send_response(503 if busy else 200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


def _endpoints(api_url: str, api_key: str, receiver: str) -> str:
    """Registers the two endpoints; returns the id of the one that answers 503 first."""
    ids = []
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {api_key}"}) as http:
        for path, events, about in (("/catalog", ["batch.completed", "job.succeeded"], "catalog import"),
                                    ("/erp", ["batch.completed", "job.succeeded"], "ERP sync")):
            response = http.post("/v1/webhooks", json={"url": receiver + path, "events": events,
                                                       "description": about})
            response.raise_for_status()
            ids.append(response.json()["id"])
    return str(ids[1])


def _shoot(page: Page, path: str, out: Path) -> None:
    page.goto(path)
    page.wait_for_timeout(1500)  # one live update, so the page shows the stream's state
    page.screenshot(path=str(out), full_page=False)
    # A 128-colour palette keeps each picture a fraction of a true-colour PNG's size.
    Image.open(out).convert("RGB").quantize(colors=128, method=Image.Quantize.FASTOCTREE).save(out, optimize=True)
    print(f"wrote {out}")


def take(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="step1x-screenshots-") as scratch:
        data_dir = Path(scratch)
        manifest = _offline_catalog(data_dir / "catalog")
        receiver = ThreadingHTTPServer(("127.0.0.1", free_port()), _Receiver)
        threading.Thread(target=receiver.serve_forever, daemon=True).start()
        os.environ["STEP1X_OUTBOUND_ALLOW"] = "127.0.0.1/32"  # the stack's processes inherit it
        with EmbeddedStack(data_dir, api_port=free_port(), gpus="all", loglevel="WARNING") as stack:
            with session_scope(Settings(data_dir=data_dir).database_url) as session:
                operator = create_key(session, "ops", operator=True)
            erp = _endpoints(stack.api_url, stack.api_key, f"http://127.0.0.1:{receiver.server_address[1]}")
            with Client(stack.api_url, stack.api_key) as client, sync_playwright() as playwright:
                batch = client.submit_manifest(manifest, metadata={"source": "step1x demo", "season": "spring"})
                browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS,
                                                     chromium_sandbox=False)
                page = browser.new_page(base_url=stack.api_url, viewport=VIEWPORT)
                page.goto("/dashboard/login")
                page.fill("input[name=key]", operator)
                page.click("button[type=submit]")
                page.wait_for_url("**/dashboard")
                deadline = time.monotonic() + 600
                while client.get_batch(batch["id"])["progress"] < 0.3 and time.monotonic() < deadline:
                    time.sleep(0.5)
                _shoot(page, "/dashboard", out / "dashboard-overview.png")
                _shoot(page, "/dashboard/batches", out / "dashboard-batches.png")
                client.wait_batch(batch["id"])
                _shoot(page, f"/dashboard/batches/{batch['id']}", out / "dashboard-batch.png")
                fill = next(j for j in client.iter_jobs(batch["id"]) if j["custom_id"] == "fill-00")
                _shoot(page, f"/dashboard/jobs/{fill['id']}", out / "dashboard-job.png")
                time.sleep(8)  # the first retry of the 503s (5 s on the schedule, with jitter)
                _shoot(page, "/dashboard/webhooks", out / "dashboard-webhooks.png")
                _shoot(page, f"/dashboard/webhooks/{erp}", out / "dashboard-webhook.png")
                browser.close()
        receiver.shutdown()


if __name__ == "__main__":
    take(Path(sys.argv[1] if len(sys.argv) > 1 else "docs"))
