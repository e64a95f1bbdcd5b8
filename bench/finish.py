"""`python -m bench.finish`: the finishing transaction of a micro-batch (`workers.batch.finish`)
with its UPDATE as one statement for all jobs against an executemany of one statement per job
(`workers.batch.finish`'s `one_statement`), side by side on the same PostgreSQL, interleaved, repeated, for
micro-batches of 16 and 200 near no-op jobs: wall time, and the client's CPU time (a worker's store
thread shares the interpreter with the forward pass). Needs PostgreSQL and Redis, which it starts
(with the rest of the bench stack)."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import redis
from rich.console import Console
from rich.table import Table

from bench.stack import BenchStack
from bench.worker import noise_png, tagged_items
from core.db import session_scope
from core.dispatch import worker_queues
from workers import batch
from workers.lookahead import job_ids_of

REPEATS = 5
SIZES = (16, 200)


def take_messages(broker: redis.Redis, queues: list[str]) -> list[str]:
    """The job ids of every message waiting, taken out (no worker runs here)."""
    ids: list[str] = []
    for queue in queues:
        while isinstance(message := broker.rpop(queue), bytes):
            ids += job_ids_of(message)
    return ids


def main() -> None:
    times: dict[tuple[int, bool], list[float]] = {}
    cpu: dict[tuple[int, bool], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp, BenchStack(Path(tmp), Path(tmp) / "models") as stack:
        settings = stack.settings
        broker = redis.Redis.from_url(settings.redis_url)
        with stack.client() as client:
            image = client.post("/v1/files", files={"file": ("x.png", noise_png(8))}).json()["id"]
            spec = {"kind": "upscale", "image": image, "model": "lanczos-x4", "cache": False}
            for repeat in range(REPEATS + 1):  # the first warms the connections and plans up
                for size in SIZES:
                    for one_statement in (True, False):
                        client.post("/v1/batches", json={"items": tagged_items(size, f"r{repeat}", **spec)})
                        ids = take_messages(broker, worker_queues(settings.models))
                        with session_scope(settings.database_url) as session:
                            claimed = batch.claim(session, ids, "bench@host", settings)
                        outcomes = [batch.Outcome(job, output_keys=[f"outputs/{job.id}.png"], timings={"run": 0.001},
                                                  result={"seeds": [0], "cached": False}) for job in claimed]
                        started, thread = time.perf_counter(), time.thread_time()
                        batch.finish(settings, outcomes, one_statement)
                        elapsed, spent = time.perf_counter() - started, time.thread_time() - thread
                        if repeat:
                            times.setdefault((size, one_statement), []).append(elapsed * 1000)
                            cpu.setdefault((size, one_statement), []).append(spent * 1000)
    table = Table(title=f"Finishing a micro-batch on PostgreSQL (ms, median and min-max of {REPEATS})")
    for column in ("jobs", "one UPDATE", "an UPDATE per job", "ratio", "client CPU: one, per job"):
        table.add_column(column)
    for size in SIZES:
        one, each = times[(size, True)], times[(size, False)]
        table.add_row(str(size), f"{statistics.median(one):.1f} ({min(one):.1f}-{max(one):.1f})",
                      f"{statistics.median(each):.1f} ({min(each):.1f}-{max(each):.1f})",
                      f"{statistics.median(each) / statistics.median(one):.2f}x",
                      f"{statistics.median(cpu[(size, True)]):.1f}, {statistics.median(cpu[(size, False)]):.1f}")
    Console().print(table)


if __name__ == "__main__":
    main()
