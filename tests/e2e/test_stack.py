"""The whole stack in processes: the API served by uvicorn, real Celery workers, real PostgreSQL,
Redis and SeaweedFS. A batch goes in over HTTP; every output must come out in S3."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image

from core.db import session_scope
from core.keys import create_key
from core.services import free_port
from core.storage import Storage
from step1x.client import Client
from tests.integration.helpers import mask_png, png
from workers.launcher import start_workers, stop_all

pytestmark = pytest.mark.e2e


@pytest.fixture
def stack(settings, tmp_path) -> Iterator[Client]:
    """API + one CPU worker (with the reconciler embedded), configured through the environment the
    `settings` fixture set."""
    port = free_port()
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {**os.environ, "STEP1X_LEASE_SECONDS": "8", "STEP1X_RECONCILE_INTERVAL": "1",
           "STEP1X_REDISPATCH_AFTER": "5"}
    api = subprocess.Popen([sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory", "--port", str(port),
                            "--log-level", "warning"], env=env, stdout=(logs / "api.log").open("wb"),
                           stderr=subprocess.STDOUT)
    worker_env = {k: v for k, v in env.items() if k.startswith("STEP1X_")}
    workers = start_workers([], logs, env=worker_env, beat=True)
    with session_scope(settings.database_url) as session:
        key = create_key(session, "e2e")
    client = Client(f"http://127.0.0.1:{port}", key, timeout=30)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if client.http.get("/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert api.poll() is None, (logs / "api.log").read_text()
            assert time.monotonic() < deadline, "API not ready"
            time.sleep(0.2)
        client.workers = workers  # type: ignore[attr-defined]
        client.logs = logs  # type: ignore[attr-defined]
        client.worker_env = worker_env  # type: ignore[attr-defined]
        yield client
    finally:
        client.close()
        stop_all([api, *workers])


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


def slow_batch_in_flight(stack, count: int) -> tuple[dict, subprocess.Popen]:
    """A batch of slow generate jobs (150 steps), returned once the worker is running it."""
    items = [{"custom_id": f"slow-{i}", "kind": "generate", "prompt": f"p{i}", "width": 64, "height": 64,
              "steps": 150, "seed": i} for i in range(count)]
    batch = stack.create_batch(items)
    [worker] = stack.workers
    deadline = time.monotonic() + 60
    while stack.get_batch(batch["id"])["counts"]["running"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return batch, worker


def test_a_killed_worker_loses_no_job_and_duplicates_no_output(stack, settings, tmp_path):
    batch, worker = slow_batch_in_flight(stack, 16)
    # Kill the pool process mid-batch without warning.
    children = psutil.Process(worker.pid).children(recursive=True)
    assert children, "prefork pool child not found"
    for child in children:
        os.kill(child.pid, signal.SIGKILL)
    done = stack.wait_batch(batch["id"], timeout=240)
    assert done["counts"]["succeeded"] == 16, stack.results(batch["id"])
    jobs = list(stack.iter_jobs(batch["id"]))
    assert max(job["attempts"] for job in jobs) >= 2  # the killed attempt was retried
    keys = [out["key"] for job in jobs for out in job["outputs"]]
    assert len(keys) == len(set(keys)) == 16
    listed = Storage(settings).client.list_objects_v2(Bucket=settings.s3_bucket, Prefix="outputs/")
    assert len(listed.get("Contents", [])) == 16  # deterministic keys: no duplicate objects


def test_a_worker_killed_whole_is_replaced_and_its_jobs_recovered(stack, settings):
    """The worker's main process dies with its pool (a lost machine): its Redis message stays unacked
    for the visibility timeout (an hour), so recovery falls to the lease and the reconciler."""
    batch, worker = slow_batch_in_flight(stack, 8)
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    stack.workers[:] = start_workers([], stack.logs, env=stack.worker_env, beat=True)
    done = stack.wait_batch(batch["id"], timeout=240)
    assert done["counts"]["succeeded"] == 8, stack.results(batch["id"])
    jobs = list(stack.iter_jobs(batch["id"]))
    assert max(job["attempts"] for job in jobs) == 2
    assert all(job["attempts"] <= 2 for job in jobs)


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
