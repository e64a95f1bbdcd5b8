"""`python -m bench.hops` (also in a full `make bench`): what the API's thread-pool hops cost a
request. FastAPI runs a plain `def` dependency in its thread pool; those that do no I/O
(`api.deps`: settings, storage, the path-id check, the cursor) are `async def` and run on the
event loop. Two API processes on the same database side by side: as shipped, and the same app
with those dependencies overridden by plain `def` twins (two more hops for a GET of a batch). Each
is asked for the same 10,000-job batch in turn, interleaved, repeated; median milliseconds per GET.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
from fastapi import Depends, FastAPI, Request
from rich.console import Console

from api import deps
from api.app import create_app
from bench.spread import spread, spread_text, write_results
from bench.stack import BenchStack
from bench.submit import manifest
from core.services import free_port
from core.settings import Settings
from core.storage import Storage

console = Console()
REPEATS, READS = 7, 60
RESULTS = Path(__file__).resolve().parent / "hops_results.json"


def threaded_app() -> FastAPI:
    """The API with its I/O-free dependencies as plain `def`s, each run in the thread pool."""
    app = create_app()

    def settings_dep(request: Request) -> Settings:
        settings: Settings = request.app.state.settings
        return settings

    def storage_dep(request: Request) -> Storage:
        storage: Storage = request.app.state.storage
        return storage

    def path_ids_dep(request: Request, _: Annotated[str, Depends(deps.tenant_dep)]) -> None:
        for name, value in request.path_params.items():
            if kind := deps._PATH_IDS.get(name):
                deps.known_id(kind, value)

    def cursor_dep(cursor: str | None = None) -> str | None:
        return cursor or None

    app.dependency_overrides |= {deps.settings_dep: settings_dep, deps.storage_dep: storage_dep,
                                 deps.path_ids_dep: path_ids_dep, deps.cursor_dep: cursor_dep}
    return app


def start(stack: BenchStack, factory: str, apis: list[tuple[subprocess.Popen[Any], httpx.Client]]) -> httpx.Client:
    """An API process from `factory` on the stack's database, added to `apis` once started."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "uvicorn", factory, "--factory", "--host", "127.0.0.1",
                                "--port", str(port), "--log-level", "warning"], env={**os.environ, **stack.env})
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {stack.key}"})
    apis.append((process, client))
    deadline = time.monotonic() + 60
    while process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if client.get("/healthz").status_code == 200:
                return client
        time.sleep(0.1)
    raise RuntimeError(f"the API from {factory} did not start (exit code {process.poll()})")


def main() -> dict[str, Any]:
    runs: dict[str, list[float]] = {"async_ms": [], "threaded_ms": []}
    with tempfile.TemporaryDirectory() as tmp, BenchStack(Path(tmp), Path(tmp) / "models") as stack:
        stack.stop_api()
        running: list[tuple[subprocess.Popen[Any], httpx.Client]] = []
        try:
            apis = {"async_ms": start(stack, "api.app:create_app", running),
                    "threaded_ms": start(stack, "bench.hops:threaded_app", running)}
            client = apis["async_ms"]
            response = client.post("/v1/batches/manifest", content=manifest(10_000),
                                   headers={"Content-Type": "application/x-ndjson"})
            assert response.status_code == 202, response.text[:2000]
            path = f"/v1/batches/{response.json()['id']}"
            for repeat in range(REPEATS):
                console.print(f"[bold]hops[/bold] run {repeat + 1}/{REPEATS}")
                for name, client in apis.items():
                    reads = []
                    for _ in range(READS):
                        started = time.perf_counter()
                        assert client.get(path).status_code == 200
                        reads.append(time.perf_counter() - started)
                    runs[name].append(statistics.median(reads) * 1000)
        finally:
            for process, client in running:
                client.close()
                process.terminate()
                process.wait()
    figures = {name: spread(values) for name, values in runs.items()}
    figures["threaded_vs_async"] = spread([t / a for t, a in zip(runs["threaded_ms"], runs["async_ms"], strict=True)])
    for name, label in (("async_ms", "async dependencies (as shipped), ms"),
                        ("threaded_ms", "the same as plain defs, ms"), ("threaded_vs_async", "plain ÷ async")):
        console.print(f"GET of a 10,000-job batch, {label}: {spread_text(figures[name], '.2f')} (min / median / max)")
    write_results(RESULTS, {"repeats": REPEATS, "reads": READS, "figures": figures})
    return figures


if __name__ == "__main__":
    main()
