"""`python -m bench.collector`: what freezing the worker's heap (`core.heap`, STEP1X_FREEZE_HEAP)
changes for the store path, where a full collection of the garbage collector holds the pool
process's interpreter while every upload thread waits: batches of near no-op jobs (lanczos-x4 on
an 8x8 image, one micro-batch each) through the whole system, with a fresh worker each way,
alternating, repeated. A pause shows in the slow tail of the batches, not in their median, and in
the worker's log (`core.heap.report_pauses`), from which the longest pause each way is read.
"""

from __future__ import annotations

import os
import re
import statistics
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.spread import write_results
from bench.stack import BenchStack
from bench.worker import noise_png, run_batch, tagged_items
from core.heap import PAUSE_SECONDS

console = Console()
REPEATS = 3
BATCHES, JOBS = 8, 200  # per worker: 8 batches of 200 jobs
RESULTS = Path(__file__).resolve().parent / "collector_results.json"
MODES = {"frozen": "1", "default collector": "0"}
PAUSE = re.compile(r"garbage collection \(generation (\d)\) held the process for (\d+) ms; (\d+) objects tracked")


def logged(log_dir: Path) -> dict[Path, int]:
    """The size of each log of the stack's workers so far."""
    return {path: path.stat().st_size for path in log_dir.glob("*.log")}


def pauses_since(log_dir: Path, sizes: dict[Path, int]) -> list[tuple[int, int, int]]:
    """(generation, ms, objects tracked) of each pause logged since `sizes` were taken."""
    found = []
    for path in log_dir.glob("*.log"):
        with path.open("rb") as log:
            log.seek(sizes.get(path, 0))
            text = log.read().decode(errors="replace")
        found += [(int(g), int(ms), int(objects)) for g, ms, objects in PAUSE.findall(text)]
    return found


def main() -> dict[str, Any]:
    os.environ["OMP_NUM_THREADS"] = "1"  # as in `python -m bench`: one thread per process
    from models.tiny import build_tiny

    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    pauses: dict[str, list[tuple[int, int, int]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        build_tiny(workdir / "models" / "tiny")
        with BenchStack(workdir, workdir / "models") as stack, stack.client() as client:
            image = client.post("/v1/files", files={"file": ("x.png", noise_png(8))}).json()["id"]
            spec = {"kind": "upscale", "image": image, "model": "lanczos-x4", "cache": False}
            for repeat in range(REPEATS):
                for mode, flag in MODES.items():
                    console.print(f"[bold]{mode}[/bold] run {repeat + 1}/{REPEATS}")
                    log_dir = stack.workdir / "logs"
                    stack.start_worker(STEP1X_FREEZE_HEAP=flag)
                    try:
                        run_batch(client, tagged_items(16, "warm-up", **spec))
                        sizes = logged(log_dir)  # the pauses of the batches, not of the start
                        for i in range(BATCHES):
                            _, seconds = run_batch(client, tagged_items(JOBS, f"{repeat}-{flag}-{i}", **spec))
                            rates[mode].append(JOBS / seconds)
                    finally:
                        stack.stop_worker()
                    pauses[mode] += pauses_since(log_dir, sizes)
    figures = {mode: {"median": statistics.median(values),
                      "p10": statistics.quantiles(values, n=10, method="inclusive")[0],
                      "slowest": min(values), "runs": values,
                      "pauses": [{"generation": g, "ms": ms, "objects": objects} for g, ms, objects in pauses[mode]]}
               for mode, values in rates.items()}
    table = Table(title=f"{JOBS}-job near no-op batches, jobs/s ({REPEATS * BATCHES} batches each way)")
    for column in ("worker heap", "median", "10th percentile", "slowest",
                   f"collections over {PAUSE_SECONDS * 1000:.0f} ms", "longest (ms, objects tracked)"):
        table.add_column(column)
    for mode, figure in figures.items():
        longest = max(pauses[mode], key=lambda pause: pause[1], default=None)
        table.add_row(mode, *(f"{figure[name]:.0f}" for name in ("median", "p10", "slowest")), str(len(pauses[mode])),
                      f"{longest[1]}, {longest[2]:,}" if longest else "")
    console.print(table)
    report = {"repeats": REPEATS, "batches_per_worker": BATCHES, "jobs_per_batch": JOBS, "figures": figures}
    write_results(RESULTS, report)
    return report


if __name__ == "__main__":
    main()
