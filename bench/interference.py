"""`python -m bench.interference`: where the forward pass loses its speed inside the system.

`engine_bound_ratio` (`python -m bench`) is the share of the wall time spent in forward passes ÷
how much slower those passes run in the system than in a raw loop. This bench splits the second
factor. tiny-sd (64 px, 10 steps) in micro-batches of 16, its forward-pass speed from the jobs'
own `run` timings, against the raw loop in this process, three interleaved repeats:

- alone: micro-batches sent one at a time, each waited for, so nothing is stored while the engine
  runs: the worker's own engine against the raw loop's.
- streaming: one batch of many micro-batches, so each forward pass runs while the previous
  micro-batch is encoded, uploaded and finished, and SeaweedFS and PostgreSQL store it.
- pinned: the same, with the worker's task thread alone on the first CPU and every other thread
  of the machine (its storing threads, SeaweedFS, PostgreSQL, Redis, the API, this bench) on the
  other: what is left of the slowdown then does not come from sharing a core.
- hosted: streaming again, with the engine in a process of its own (STEP1X_ENGINE_PROCESS, the
  default); the three above run it in the worker's task thread (STEP1X_ENGINE_PROCESS=0).

Besides each variant's forward-pass speed, the streaming ones report the whole run's images/s
(`*_system_images_per_s`, submission to the last job finished).

Linux only (sched_setaffinity); the pinned run needs two CPUs or more.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from rich.console import Console
from rich.table import Table
from sqlalchemy import select

from bench.spread import spread, spread_text, write_results
from bench.stack import BenchStack
from bench.worker import GENERATE, generate_requests, run_batch, tagged_items
from core.db import session_scope
from core.tables import Job

console = Console()
REPEATS = 3
SIZE = 16  # tiny-sd's micro-batch at 64 px
ALONE = 8  # micro-batches sent one at a time
STREAMED = 512  # images in the streaming runs
RESULTS = Path(__file__).resolve().parent / "interference_results.json"


def _pin(stack: BenchStack, pinned: bool) -> None:
    """Pinned: the worker's task thread on CPU 0, every other thread of the machine on the rest.
    Not pinned: every thread on every CPU."""
    cpus = sorted(os.sched_getaffinity(0) | set(range(os.cpu_count() or 1)))
    pool = psutil.Process(stack.workers[0].pid).children()[0]
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            for thread in process.threads():
                task = thread.id == pool.pid  # the task runs on the pool process's main thread
                mask = ({cpus[0]} if task else set(cpus[1:])) if pinned else set(cpus)
                with contextlib.suppress(OSError):  # kernel threads and processes that just left
                    os.sched_setaffinity(thread.id, mask)


def _engine_images_per_s(stack: BenchStack, batch_ids: list[str]) -> float:
    with session_scope(stack.settings.database_url) as session:
        timings = list(session.scalars(select(Job.timings).where(Job.batch_id.in_(batch_ids))))
    return len(timings) / sum((t or {}).get("run", 0.0) for t in timings)


def _raw(stack: BenchStack) -> float:
    from core import heap
    from models.profiles import create_engine

    heap.hold_freed_memory()  # as in the worker's engine process
    engine = create_engine("tiny-sd", stack.settings)
    requests = generate_requests(SIZE)
    engine.run(requests)  # warm
    started = time.perf_counter()
    for _ in range(STREAMED // SIZE):
        engine.run(requests)
    return STREAMED / (time.perf_counter() - started)


def _streamed(stack: BenchStack, client: httpx.Client, name: str, repeat: int) -> dict[str, float]:
    """One batch of STREAMED images: its forward passes' images/s, and the whole run's."""
    batch_id, seconds = run_batch(client, tagged_items(STREAMED, f"{name}{repeat}", **GENERATE))
    return {f"{name}_images_per_s": _engine_images_per_s(stack, [batch_id]),
            f"{name}_system_images_per_s": STREAMED / seconds}


def measure(stack: BenchStack, repeat: int) -> dict[str, float]:
    figures = {"raw_images_per_s": _raw(stack)}
    stack.fresh_database()
    stack.start_worker(STEP1X_ENGINE_PROCESS="0")
    try:
        with stack.client() as client:
            run_batch(client, tagged_items(2 * SIZE, f"warm{repeat}", **GENERATE))  # loads the model
            alone = [run_batch(client, tagged_items(SIZE, f"alone{repeat}-{i}", **GENERATE))[0]
                     for i in range(ALONE)]
            figures["alone_images_per_s"] = _engine_images_per_s(stack, alone)
            figures |= _streamed(stack, client, "streaming", repeat)
            if len(os.sched_getaffinity(0)) >= 2:
                _pin(stack, True)
                try:
                    figures |= _streamed(stack, client, "pinned", repeat)
                finally:
                    _pin(stack, False)
    finally:
        stack.stop_worker()
    stack.start_worker(STEP1X_ENGINE_PROCESS="1")
    try:
        with stack.client() as client:
            run_batch(client, tagged_items(2 * SIZE, f"warm-hosted{repeat}", **GENERATE))
            figures |= _streamed(stack, client, "hosted", repeat)
    finally:
        stack.stop_worker()
    raw = figures["raw_images_per_s"]
    for name in ("alone", "streaming", "pinned", "hosted"):
        if f"{name}_images_per_s" in figures:
            figures[f"{name}_vs_raw"] = figures[f"{name}_images_per_s"] / raw
        if f"{name}_system_images_per_s" in figures:
            figures[f"{name}_system_vs_raw"] = figures[f"{name}_system_images_per_s"] / raw
    return figures


def main() -> dict[str, Any]:
    os.environ["OMP_NUM_THREADS"] = "1"  # as in `python -m bench`: one thread per process
    import torch

    torch.set_num_threads(1)
    from models.tiny import build_tiny

    runs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        build_tiny(workdir / "models" / "tiny")
        with BenchStack(workdir, workdir / "models") as stack:
            for repeat in range(REPEATS):
                console.print(f"[bold]interference[/bold] run {repeat + 1}/{REPEATS}")
                runs.append(measure(stack, repeat))
    figures = {name: spread([run[name] for run in runs]) for name in runs[0]}
    table = Table(title=f"tiny-sd forward passes, micro-batches of {SIZE}: worker ÷ raw loop "
                        f"({REPEATS} repeats, min / median / max)")
    for column in ("forward passes", "images/s", "÷ raw loop", "whole run ÷ raw loop"):
        table.add_column(column)
    table.add_row("raw loop, this process", spread_text(figures["raw_images_per_s"], ".1f"), "1", "")
    for name, label in (("alone", f"in the task thread, {ALONE} micro-batches one at a time"),
                        ("streaming", f"in the task thread, {STREAMED} images in one batch"),
                        ("pinned", "the same, task thread alone on a CPU"),
                        ("hosted", f"engine process, {STREAMED} images in one batch")):
        if f"{name}_vs_raw" in figures:
            system = figures.get(f"{name}_system_vs_raw")
            table.add_row(label, spread_text(figures[f"{name}_images_per_s"], ".1f"),
                          spread_text(figures[f"{name}_vs_raw"], ".2f"), spread_text(system, ".2f") if system else "")
    console.print(table)
    result = {"size": SIZE, "alone": ALONE, "streamed": STREAMED, "repeats": REPEATS, "figures": figures}
    write_results(RESULTS, result)
    return result


if __name__ == "__main__":
    main()
