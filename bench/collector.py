"""`python -m bench.collector`: what freezing the worker's heap (`core.heap`, STEP1X_FREEZE_HEAP)
changes for the store path, where a full collection of the garbage collector holds the pool
process's interpreter while every upload thread waits: batches of near no-op jobs (lanczos-x4 on
an 8x8 image, one micro-batch each) through the whole system, with a fresh worker each way,
alternating, repeated. A pause shows in the slow tail of the batches, not in their median.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.stack import BenchStack
from bench.worker import noise_png, run_batch, tagged_items

console = Console()
REPEATS = 3
BATCHES, JOBS = 8, 200  # per worker: 8 batches of 200 jobs
RESULTS = Path(__file__).resolve().parent / "collector_results.json"
MODES = {"frozen": "1", "default collector": "0"}


def main() -> dict[str, Any]:
    os.environ["OMP_NUM_THREADS"] = "1"  # as in `python -m bench`: one thread per process
    from models.tiny import build_tiny

    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        build_tiny(workdir / "models" / "tiny")
        with BenchStack(workdir, workdir / "models") as stack, stack.client() as client:
            image = client.post("/v1/files", files={"file": ("x.png", noise_png(8))}).json()["id"]
            spec = {"kind": "upscale", "image": image, "model": "lanczos-x4", "cache": False}
            for repeat in range(REPEATS):
                for mode, flag in MODES.items():
                    console.print(f"[bold]{mode}[/bold] run {repeat + 1}/{REPEATS}")
                    stack.start_worker(STEP1X_FREEZE_HEAP=flag)
                    try:
                        run_batch(client, tagged_items(16, "warm-up", **spec))
                        for i in range(BATCHES):
                            _, seconds = run_batch(client, tagged_items(JOBS, f"{repeat}-{flag}-{i}", **spec))
                            rates[mode].append(JOBS / seconds)
                    finally:
                        stack.stop_worker()
    figures = {mode: {"median": statistics.median(values),
                      "p10": statistics.quantiles(values, n=10, method="inclusive")[0],
                      "slowest": min(values), "runs": values} for mode, values in rates.items()}
    table = Table(title=f"{JOBS}-job near no-op batches, jobs/s ({REPEATS * BATCHES} batches each way)")
    for column in ("worker heap", "median", "10th percentile", "slowest"):
        table.add_column(column)
    for mode, figure in figures.items():
        table.add_row(mode, *(f"{figure[name]:.0f}" for name in ("median", "p10", "slowest")))
    console.print(table)
    report = {"repeats": REPEATS, "batches_per_worker": BATCHES, "jobs_per_batch": JOBS, "figures": figures}
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"written to {RESULTS}")
    return report


if __name__ == "__main__":
    main()
