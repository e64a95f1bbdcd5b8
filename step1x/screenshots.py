"""`make screenshots`: the README's pictures of each dashboard page, taken from a demo run.

Starts the embedded stack in a scratch folder, submits the demo catalog (upscales through Lanczos, so
nothing needs fetching), and photographs the pages with Debian's Chromium while it runs and after.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

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
        with EmbeddedStack(data_dir, api_port=free_port(), gpus="all", loglevel="WARNING") as stack:
            with session_scope(Settings(data_dir=data_dir).database_url) as session:
                operator = create_key(session, "ops", operator=True)
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
                browser.close()


if __name__ == "__main__":
    take(Path(sys.argv[1] if len(sys.argv) > 1 else "docs"))
