"""Webhook delivery, measured end to end: PostgreSQL and Redis as child processes, the control
process (Celery, thread pool) delivering from the outbox to receivers on loopback.

- latency from the state change's commit to the receiver, one event at a time (p50, p95);
- deliveries per second to one fast receiver (a 1,000-item batch canceled at once, per-item events);
- the same 200 events to a fast receiver alone, then beside a receiver that takes 2 s per call.

`python -m bench.webhooks` runs it alone; `make bench` runs it after the other cases.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()
THREADS = 16


class Receiver:
    """Records when each event (by its data id) arrived, then answers after `delay` seconds."""

    def __init__(self, delay: float = 0.0) -> None:
        self.arrived: dict[str, float] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                outer.arrived.setdefault(json.loads(body)["data"]["id"], time.time())
                if delay:
                    time.sleep(delay)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait(self, count: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while len(self.arrived) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.arrived)} of {count} deliveries arrived")
            time.sleep(0.01)


@contextmanager
def stack(workdir: Path) -> Iterator[Any]:
    from core.db import upgrade
    from core.services import start_postgres, start_redis
    from core.settings import get_settings
    from workers.launcher import QUIET, stop_all

    with ExitStack() as stop:
        redis = stop.enter_context(start_redis(workdir))
        postgres = stop.enter_context(start_postgres(workdir))
        database = postgres.create_database("bench")
        env = {"STEP1X_DATABASE_URL": database, "STEP1X_REDIS_URL": redis.url, "STEP1X_DATA_DIR": str(workdir),
               "STEP1X_OUTBOUND_ALLOW": "127.0.0.1/32", "STEP1X_OUTBOUND_DUE_INTERVAL": "1"}
        os.environ.update(env)  # the in-process kick after each commit reads the same settings
        get_settings.cache_clear()
        settings = get_settings()
        upgrade(database)
        log = stop.enter_context((workdir / "control.log").open("wb"))
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers.deliver", "worker", "-Q", "control", "-P", "threads",
             "-c", str(THREADS), "-B", "-s", str(workdir / "beat"), "-n", "control@bench", "--loglevel", "WARNING",
             *QUIET],
            env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        stop.callback(stop_all, [proc])
        yield settings


def _tenant(session: Any, tenant: str) -> None:
    from core.tables import Tenant

    if session.get(Tenant, tenant) is None:
        session.add(Tenant(id=tenant))
        session.flush()


def _jobs(settings: Any, tenant: str, count: int, as_batch: bool) -> list[str]:
    from core.db import session_scope
    from core.submit import accept

    items = [{"custom_id": f"sku-{i}", "kind": "generate", "prompt": f"product {i}"} for i in range(count)]
    with session_scope(settings.database_url) as session:
        _tenant(session, tenant)
        if as_batch:
            accepted = accept(session, settings, tenant, items, as_batch=True)
            assert accepted.batch is not None
            return [accepted.batch.id]
        return [accept(session, settings, tenant, [items[0] | {"custom_id": None}], as_batch=False).first_id
                for _ in range(count)]


def _endpoint(settings: Any, tenant: str, url: str, events: list[str]) -> None:
    from core.db import session_scope
    from core.webhooks import create_endpoint

    with session_scope(settings.database_url) as session:
        _tenant(session, tenant)
        create_endpoint(session, settings, tenant, url, events)


def _cancel_batch(settings: Any, tenant: str, batch_id: str) -> float:
    from core.db import session_scope
    from core.jobs import cancel_batch

    with session_scope(settings.database_url) as session:
        cancel_batch(session, tenant, batch_id)
    return time.time()


def measure(settings: Any) -> dict[str, Any]:
    from core.db import session_scope
    from core.jobs import cancel_job

    fast = Receiver()
    _endpoint(settings, "latency", fast.url, ["job.canceled"])
    _cancel_batch(settings, "latency", _jobs(settings, "latency", 20, True)[0])  # warm-up
    fast.wait(20)
    latencies = []
    for job_id in _jobs(settings, "latency", 60, False):
        with session_scope(settings.database_url) as session:
            cancel_job(session, "latency", job_id)
        committed = time.time()
        while job_id not in fast.arrived:
            time.sleep(0.001)
        latencies.append(fast.arrived[job_id] - committed)
        time.sleep(0.02)
    quantiles = statistics.quantiles(latencies, n=20)

    fast.arrived.clear()
    [batch] = _jobs(settings, "throughput", 1000, True)
    _endpoint(settings, "throughput", fast.url, ["job.canceled"])
    started = _cancel_batch(settings, "throughput", batch)
    fast.wait(1000)
    per_second = 1000 / (max(fast.arrived.values()) - started)

    def fast_alongside(slow: Receiver | None, tenant: str) -> float:
        fast.arrived.clear()
        [batch] = _jobs(settings, tenant, 200, True)
        _endpoint(settings, tenant, fast.url, ["job.canceled"])
        if slow is not None:
            _endpoint(settings, tenant, slow.url, ["job.canceled"])
        started = _cancel_batch(settings, tenant, batch)
        fast.wait(200)
        return max(fast.arrived.values()) - started

    alone = fast_alongside(None, "alone")
    slow = Receiver(delay=2.0)
    beside = fast_alongside(slow, "beside-slow")
    slow_done = len(slow.arrived)
    slow.close()
    fast.close()
    return {"latency_p50_ms": quantiles[9] * 1000, "latency_p95_ms": quantiles[18] * 1000,
            "deliveries_per_s": per_second, "fast_alone_s": alone, "fast_beside_slow_s": beside,
            "slow_reached_meanwhile": slow_done, "threads": THREADS}


def main(workdir: Path | None = None) -> dict[str, Any]:
    with ExitStack() as cleanup:
        if workdir is None:
            workdir = Path(cleanup.enter_context(tempfile.TemporaryDirectory()))
        (workdir / "webhooks").mkdir(parents=True, exist_ok=True)
        with stack(workdir / "webhooks") as settings:
            result = measure(settings)
    table = Table(title=f"Webhook delivery (PostgreSQL, Redis, control process with {THREADS} threads)")
    for column in ("measure", "value"):
        table.add_column(column)
    table.add_row("latency, commit -> receiver, p50 / p95",
                  f"{result['latency_p50_ms']:.0f} / {result['latency_p95_ms']:.0f} ms")
    table.add_row("deliveries/s to one fast receiver (1,000 events)", f"{result['deliveries_per_s']:.0f}")
    alone, beside = result["fast_alone_s"], result["fast_beside_slow_s"]
    table.add_row("200 events to a fast receiver: alone vs beside a 2 s receiver",
                  f"{alone:.2f} s vs {beside:.2f} s ({beside / alone:.2f}x; "
                  f"{result['slow_reached_meanwhile']} reached the slow one meanwhile)")
    console.print(table)
    out = Path("bench-output")
    out.mkdir(exist_ok=True)
    (out / "webhooks.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
