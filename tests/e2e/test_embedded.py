"""`step1x up`'s embedded stack: SQLite (WAL, API and worker in separate processes), Redis and
SeaweedFS as child processes, the API and a CPU worker — the path `make demo` takes."""

from __future__ import annotations

import io
import os

import httpx
import pytest
from PIL import Image

from core.services import free_port
from step1x.client import Client
from step1x.stack import EmbeddedStack
from tests.integration.helpers import mask_png, png

pytestmark = pytest.mark.e2e


def test_the_embedded_stack_runs_a_batch_on_sqlite(tmp_path, monkeypatch):
    for name in [n for n in os.environ if n.startswith("STEP1X_")]:
        monkeypatch.delenv(name)
    stack = EmbeddedStack(tmp_path / "data", api_port=free_port(), gpus="cpu").start()
    try:
        assert stack.env["STEP1X_DATA_DIR"] == str((tmp_path / "data").resolve())
        assert (tmp_path / "data" / "step1x.db").exists()
        with Client(stack.api_url, stack.api_key) as client:
            image = client.upload_file(png((64, 48)))["id"]
            mask = client.upload_file(mask_png((64, 48)))["id"]
            batch = client.create_batch([
                {"custom_id": "fill", "kind": "inpaint", "mode": "fill", "image": image, "mask": mask},
                {"custom_id": "up", "kind": "upscale", "image": image, "model": "lanczos-x4"},
                {"custom_id": "gen", "kind": "generate", "prompt": "a lamp", "width": 64, "height": 64,
                 "steps": 2},
            ])
            done = client.wait_batch(batch["id"], timeout=180)
            assert done["counts"]["succeeded"] == 3, client.results(batch["id"])
            sizes = {}
            for line in client.results(batch["id"]):
                sizes[line["custom_id"]] = Image.open(io.BytesIO(httpx.get(line["url"]).content)).size
            assert sizes == {"fill": (64, 48), "up": (256, 192), "gen": (64, 64)}
        # The dev key survives a restart of the stack on the same data folder.
        key = stack.api_key
    finally:
        stack.stop()
    restarted = EmbeddedStack(tmp_path / "data", api_port=free_port(), gpus="cpu").start()
    try:
        assert restarted.api_key == key
        with Client(restarted.api_url, key) as client:
            assert client.get_batch(batch["id"])["status"] == "completed"  # state persisted in SQLite
    finally:
        restarted.stop()
