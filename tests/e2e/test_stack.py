"""The whole stack in processes: the API served by uvicorn, real Celery workers, real PostgreSQL,
Redis and SeaweedFS. A batch goes in over HTTP; every output must come out in S3. (Killed workers,
lost services and replayed submissions are in tests/fault.)"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from core.storage import Storage
from step1x.client import Client
from tests.integration.helpers import mask_png, png
from tests.stack import Stack
from workers.launcher import start_workers, stop_all

pytestmark = pytest.mark.e2e


@pytest.fixture
def stack(settings, tmp_path) -> Iterator[Client]:
    """API + one CPU worker + the control process, configured through the environment the `settings`
    fixture set."""
    running = Stack(settings, tmp_path).start()
    try:
        yield running.client
    finally:
        running.stop()


def catalog(folder: Path) -> Path:
    (folder / "photo.png").write_bytes(png((120, 90), seed=1))
    (folder / "mask.png").write_bytes(mask_png((120, 90)))
    items: list[dict] = [{"custom_id": f"gen-{i}", "kind": "generate", "prompt": f"product {i}", "width": 96,
                          "height": 64, "steps": 2, "seed": i} for i in range(6)]
    items += [{"custom_id": mode, "kind": "inpaint", "mode": mode, "image": "photo.png", "mask": "mask.png",
               "steps": 2} for mode in ("fill", "structure", "text")]
    items[-1]["prompt"] = "a vase"
    items.append({"custom_id": "up", "kind": "upscale", "image": "photo.png", "model": "lanczos-x4"})
    manifest = folder / "catalog.jsonl"
    manifest.write_text("".join(json.dumps(item) + "\n" for item in items))
    return manifest


def test_a_catalog_flows_through_the_whole_stack(stack, settings, tmp_path):
    batch = stack.submit_manifest(catalog(tmp_path))
    assert batch["total"] == 10
    seen = []
    done = stack.wait_batch(batch["id"], on_progress=lambda b: seen.append(b["progress"]), timeout=240)
    failures = [line for line in stack.results(batch["id"]) if line["status"] != "succeeded"]
    assert failures == []
    assert (done["status"], done["counts"]["succeeded"], done["progress"]) == ("completed", 10, 1.0)
    assert seen == sorted(seen)  # progress never goes backwards
    storage = Storage(settings)
    expected = {**{f"gen-{i}": (96, 64) for i in range(6)}, "fill": (120, 90), "structure": (120, 90),
                "text": (120, 90), "up": (480, 360)}
    jobs = {job["custom_id"]: job for job in stack.iter_jobs(batch["id"])}
    for custom_id, size in expected.items():
        [output] = jobs[custom_id]["outputs"]
        image = Image.open(io.BytesIO(storage.get(output["key"])))
        assert (image.format, image.size) == ("PNG", size), custom_id
        assert jobs[custom_id]["attempts"] == 1
    paths = stack.download_results(batch["id"], tmp_path / "out")
    assert sorted(p.name for p in paths) == sorted(f"{c}.png" for c in expected)


def test_the_cli_submits_waits_and_downloads(stack, tmp_path):
    from typer.testing import CliRunner

    from step1x.cli import app

    env = {"STEP1X_API_URL": str(stack.http.base_url), "STEP1X_API_KEY": stack.http.headers["Authorization"][7:]}
    runner = CliRunner()
    submitted = runner.invoke(app, ["submit", str(catalog(tmp_path)), "--wait"], env=env)
    assert submitted.exit_code == 0, submitted.output
    assert "10 succeeded, 0 failed" in submitted.output and "images/s" in submitted.output
    batch_id = submitted.output.split("batch ", 1)[1].split(":", 1)[0].strip()
    fetched = runner.invoke(app, ["results", batch_id, "--out", str(tmp_path / "cli-out")], env=env)
    assert fetched.exit_code == 0, fetched.output
    assert len(list((tmp_path / "cli-out").glob("*.png"))) == 10
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"custom_id": "x", "kind": "generate", "prompt": "p", "steps": 0}\n')
    rejected = runner.invoke(app, ["submit", str(bad)], env=env)
    assert rejected.exit_code != 0
    assert "x / steps" in str(rejected.exception) or "x / steps" in rejected.output


def test_interactive_jobs_go_before_a_waiting_catalog(settings, tmp_path):
    from tests.integration.helpers import api_client

    client = api_client(settings)
    catalog = [{"custom_id": f"c{i}", "kind": "generate", "prompt": f"p{i}", "width": 64, "height": 64,
                "steps": 20, "seed": i} for i in range(48)]  # three micro-batches of 16 on the bulk lane
    batch_id = client.post("/v1/batches", json={"items": catalog}).json()["id"]
    # Two single jobs, two messages: taking turns between lanes would run a catalog batch between them.
    singles = [client.post("/v1/jobs", json={"kind": "generate", "prompt": f"now {i}", "width": 64, "height": 64,
                                             "steps": 20}).json()["id"] for i in range(2)]
    env = {k: v for k, v in os.environ.items() if k.startswith("STEP1X_")}
    workers = start_workers([], tmp_path, env=env)  # starts only now: every message is waiting
    try:
        deadline = time.monotonic() + 180
        while client.get(f"/v1/batches/{batch_id}").json()["status"] != "completed":
            assert time.monotonic() < deadline, (tmp_path / "worker-cpu.log").read_text()[-3000:]
            time.sleep(0.2)
    finally:
        stop_all(workers)
    first_bulk = min(job["timings"]["started_at"] for job in
                     client.get(f"/v1/batches/{batch_id}/jobs", params={"limit": 100}).json()["data"])
    for single in singles:
        assert client.get(f"/v1/jobs/{single}").json()["timings"]["started_at"] < first_bulk
