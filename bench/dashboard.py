"""Dashboard pages over a big history: 1,000,000 jobs in PostgreSQL.

Nine finished catalogs of 100,000 jobs (about 1% failed, three error messages), one 100,000-item batch
half done and running, and 1,000 small finished batches. Each page is timed through the app
(operator session, in-process ASGI), with the dashboard's indexes (migration 0003) and without them,
side by side. Targets: overview and batch list under 300 ms, a 100,000-item batch's page under 500 ms.

    python -m bench.dashboard      (also part of `make bench`)
"""

from __future__ import annotations

import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from rich.console import Console
from rich.table import Table
from sqlalchemy import create_engine, text

BIG = 100_000
SMALL_BATCHES, SMALL = 1_000, 100
DASHBOARD_INDEXES = ("ix_jobs_status_lane_created", "ix_jobs_status_model_created", "ix_jobs_finished",
                     "ix_jobs_batch_finished", "ix_batches_tenant_created", "ix_batches_created")
TARGETS = {"overview": 0.3, "batch list": 0.3, "batch detail (100,000 jobs)": 0.5, "GET /v1/batches": 0.3}

# Batches are written by hand here: their Python-side defaults (completion window, output TTL)
# must be spelled out.
WINDOWS = f"{24 * 3600}, {7 * 24 * 3600}"
BATCH_COLUMNS = "id, tenant_id, metadata, total, canceled, completion_window, output_ttl, created_at"
JOB_COLUMNS = ("id, tenant_id, batch_id, custom_id, kind, model, spec, seed, lane, group_key, cost, status, "
               "attempts, worker, error, output_keys, created_at, started_at, finished_at")


def _jobs_sql(batch: str, count: int, status_expr: str, finished_expr: str, start_offset: str) -> str:
    return f"""
        INSERT INTO jobs ({JOB_COLUMNS})
        SELECT 'job_' || md5('{batch}' || g), 'acme', '{batch}', 'sku-' || g, 'generate', 'tiny-sd',
               '{{"kind": "generate", "prompt": "p"}}'::json, g, 'bulk', 'tiny-sd|generate|512x512|30|7.5', 262144,
               {status_expr}, 1, 'gpu0@bench',
               CASE WHEN ({status_expr}) = 'failed' THEN
                 (ARRAY['CUDA out of memory', 'image: cannot decode input', 'prompt: too long'])[1 + g % 3] END,
               CASE WHEN ({status_expr}) = 'succeeded'
                 THEN json_build_array('outputs/acme/{batch}/' || g || '.png') END,
               now() AT TIME ZONE 'utc' - interval '{start_offset}',
               now() AT TIME ZONE 'utc' - interval '{start_offset}' + interval '1 second',
               {finished_expr}
        FROM generate_series(1, {count}) AS g"""


def seed(url: str) -> str:
    """Fill the database; returns the id of the running 100,000-item batch."""
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO tenants (id, created_at) VALUES ('acme', now()), ('ops', now())"))
        for b in range(9):
            batch = f"bat_done{b}"
            conn.execute(text(f"INSERT INTO batches ({BATCH_COLUMNS}, finished_at) "
                              f"VALUES ('{batch}', 'acme', '{{\"catalog\": \"c{b}\"}}', {BIG}, false, {WINDOWS}, "
                              f"now() AT TIME ZONE 'utc' - interval '{10 - b} days', now() AT TIME ZONE 'utc')"))
            conn.execute(text(_jobs_sql(batch, BIG, "CASE WHEN g % 97 = 0 THEN 'failed' ELSE 'succeeded' END",
                                        f"now() AT TIME ZONE 'utc' - interval '{10 - b} days' + g * interval '5 ms'",
                                        f"{10 - b} days")))
        for s in range(SMALL_BATCHES):
            conn.execute(text(f"INSERT INTO batches ({BATCH_COLUMNS}, finished_at) "
                              f"VALUES ('bat_small{s}', 'acme', '{{}}', {SMALL}, false, {WINDOWS}, "
                              f"now() AT TIME ZONE 'utc' - interval '{s + 60} minutes', now() AT TIME ZONE 'utc')"))
        conn.execute(text(f"""
            INSERT INTO jobs ({JOB_COLUMNS})
            SELECT 'job_' || md5('bat_small' || s || '_' || g), 'acme', 'bat_small' || s, 'sku-' || g, 'upscale',
                   'lanczos-x4', '{{}}'::json, g, 'bulk', 'lanczos-x4|upscale|x4', 1, 'succeeded', 1, 'cpu@bench',
                   NULL, NULL,
                   now() AT TIME ZONE 'utc' - interval '2 hours', now() AT TIME ZONE 'utc' - interval '2 hours',
                   now() AT TIME ZONE 'utc' - interval '2 hours'
            FROM generate_series(0, {SMALL_BATCHES - 1}) AS s, generate_series(1, {SMALL}) AS g"""))
        running = "bat_running"
        conn.execute(text(f"INSERT INTO batches ({BATCH_COLUMNS}) "
                          f"VALUES ('{running}', 'acme', '{{\"catalog\": \"live\"}}', {BIG}, false, {WINDOWS}, "
                          "now() AT TIME ZONE 'utc' - interval '50 minutes')"))
        half = BIG // 2
        conn.execute(text(_jobs_sql(
            running, BIG,
            f"CASE WHEN g <= {half} AND g % 97 = 0 THEN 'failed' WHEN g <= {half} THEN 'succeeded' "
            f"WHEN g <= {half + 16} THEN 'running' ELSE 'queued' END",
            f"CASE WHEN g <= {half} THEN now() AT TIME ZONE 'utc' - interval '50 minutes' + g * interval '60 ms' END",
            "50 minutes")))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))
    engine.dispose()
    return running


def timed(client: TestClient, path: str, repeats: int = 5) -> float:
    client.get(path).raise_for_status()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        client.get(path).raise_for_status()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_dashboard(workdir: Path) -> list[dict[str, Any]]:
    from api.app import create_app
    from core.db import session_scope, upgrade
    from core.keys import create_key
    from core.services import start_postgres
    from core.settings import Settings

    with start_postgres(workdir / "dashboard-pg") as postgres:
        url = postgres.create_database("bench_dashboard")
        upgrade(url)
        running = seed(url)
        settings = Settings(database_url=url, data_dir=workdir / "dashboard-data", s3_endpoint_url="http://127.0.0.1:9")
        with session_scope(url) as session:
            operator, tenant = create_key(session, "ops", operator=True), create_key(session, "acme")
        client = TestClient(create_app(settings, migrate=False))
        client.post("/dashboard/login", data={"key": operator}).raise_for_status()
        pages = {"overview": "/dashboard", "batch list": "/dashboard/batches",
                 "batch detail (100,000 jobs)": f"/dashboard/batches/{running}"}
        api = TestClient(create_app(settings, migrate=False), headers={"Authorization": f"Bearer {tenant}"})
        page = client.get(pages["batch detail (100,000 jobs)"]).text
        assert re.search(r'data-count="queued">(\d+)<', page), "the batch page shows no counts"

        def measure() -> dict[str, float]:
            found = {name: timed(client, path) for name, path in pages.items()}
            found["GET /v1/batches"] = timed(api, "/v1/batches")
            found["/metrics"] = timed(client, "/metrics")
            return found

        with_indexes = measure()
        engine = create_engine(url)
        with engine.begin() as conn:
            for index in DASHBOARD_INDEXES:
                conn.execute(text(f"DROP INDEX {index}"))
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("ANALYZE"))
        engine.dispose()
        without = measure()
    return [{"case": f"dashboard {name}, 1M jobs: without vs with the 0003 indexes"
                     + (f" (target < {TARGETS[name] * 1000:.0f} ms)" if name in TARGETS else ""),
             "baseline_s": without[name], "choice_s": with_indexes[name], "ratio": without[name] / with_indexes[name],
             "unit": "x faster"} for name in with_indexes]


def main() -> None:
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        results = bench_dashboard(Path(tmp))
    table = Table(title="Dashboard over 1,000,000 jobs (median of 5; ratio = without / with indexes)")
    for column in ("case", "without s", "with s", "ratio"):
        table.add_column(column)
    for r in results:
        table.add_row(r["case"], f"{r['baseline_s']:.3f}", f"{r['choice_s']:.3f}", f"{r['ratio']:.2f} {r['unit']}")
    console.print(table)


if __name__ == "__main__":
    main()
