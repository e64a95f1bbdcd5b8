"""Submission at catalog scale, on the whole system: a JSONL manifest streamed to the API process.

Figures: items/s from request start to response; the API's peak RSS growth during the request
(at two sizes, to show it does not grow with the catalog); seconds from the end of the upload to the
first micro-batch message in Redis; `GET /v1/batches/{id}` latency on the large batch.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil
import redis
from sqlalchemy import select

from bench.stack import BenchStack
from core.db import session_scope
from core.tables import Batch

UPLOAD_CHUNK = 256 * 1024


def manifest(n: int) -> bytes:
    return b"".join(json.dumps({"custom_id": f"sku-{i:06d}", "kind": "generate", "prompt": f"product photo {i}",
                                "width": 64, "height": 64, "steps": 10}).encode() + b"\n" for i in range(n))


class Sampler(threading.Thread):
    """Peak RSS of a process, and the first time a message shows up in the broker."""

    def __init__(self, pid: int, redis_url: str) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.broker = redis.Redis.from_url(redis_url)
        self.baseline = self.peak = self.process.memory_info().rss
        self.first_message: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            if self.first_message is None and self.broker.llen("bulk.tiny-sd"):
                self.first_message = time.perf_counter()
            time.sleep(0.002)


def submit_once(stack: BenchStack, body: bytes) -> dict[str, float]:
    upload_end = 0.0

    def chunks() -> Iterator[bytes]:
        nonlocal upload_end
        for start in range(0, len(body), UPLOAD_CHUNK):
            yield body[start:start + UPLOAD_CHUNK]
        upload_end = time.perf_counter()

    assert stack.api is not None
    sampler = Sampler(stack.api.pid, stack.settings.redis_url)
    sampler.start()
    with stack.client() as client:
        started = time.perf_counter()
        response = client.post("/v1/batches/manifest", content=chunks(),
                               headers={"Content-Type": "application/x-ndjson"})
        elapsed = time.perf_counter() - started
        assert response.status_code == 202, response.text[:2000]
        batch_id = response.json()["id"]
        deadline = time.monotonic() + 30
        while sampler.first_message is None and time.monotonic() < deadline:
            time.sleep(0.01)
        sampler.stop.set()
        sampler.join()
        # The API sends the rest of the catalog's messages after answering: read the batch once that
        # is done, so the figure is the read, not the read beside a busy sender.
        while True:
            with session_scope(stack.settings.database_url) as session:
                if session.scalar(select(Batch.dispatched_at).where(Batch.id == batch_id)) is not None:
                    break
            time.sleep(0.05)
        reads = []
        for _ in range(30):
            t = time.perf_counter()
            assert client.get(f"/v1/batches/{batch_id}").status_code == 200
            reads.append(time.perf_counter() - t)
    n = body.count(b"\n")
    return {"items_per_s": n / elapsed, "rss_growth_mb": (sampler.peak - sampler.baseline) / 2**20,
            "first_message_s": (sampler.first_message or float("inf")) - upload_end,
            "get_batch_ms": statistics.median(reads) * 1000}


def run(stack: BenchStack, quick: bool) -> dict[str, Any]:
    """One repeat of the family; returns figure -> value."""
    large, small = 100_000, 10_000
    stack.fresh_database()  # a fresh API process: its RSS baseline is not left over from an earlier run
    big = submit_once(stack, manifest(large))
    stack.fresh_database()
    little = submit_once(stack, manifest(small))
    return {
        "submit_items_per_s": big["items_per_s"],
        "api_rss_growth_mb": big["rss_growth_mb"],
        "api_rss_growth_10k_mb": little["rss_growth_mb"],
        "first_message_after_upload_s": big["first_message_s"],
        "get_batch_ms": big["get_batch_ms"],
        "get_batch_10k_ms": little["get_batch_ms"],
    }
