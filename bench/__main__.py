"""`make bench` (`python -m bench [--quick]`): the whole system's throughput figures, measured side by
side in one run. Families run interleaved (submission, worker, submission, worker, ...), each
repeated REPEATS times; the table shows min / median / max and the target, and everything is
written to bench/results.json (with `--trace`, tiny-sd runs traced and bench/results-traced.json is
written instead). Full runs add the engine-level comparisons of `bench.models`, webhook
delivery (`bench.webhooks`), the input lookahead (`bench.prefetch`), the job cap (`bench.jobcap`),
PNG compression levels (`bench.encode`), freed memory held or not (`bench.malloc`),
where the forward pass slows down in the system (`bench.interference`), the API's thread-pool
hops (`bench.hops`), traced engines (`bench.tracing`), the near no-op rounds at 200 and 1,000 jobs
(`bench.sizes`) and torch's CPU threads beside a busy process (`bench.threads`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench import submit, worker
from bench.dashboard import bench_dashboard
from bench.spread import spread
from bench.stack import BenchStack

console = Console()
REPEATS = 3
RESULTS = Path(__file__).resolve().parent / "results.json"
TRACED = RESULTS.with_name("results-traced.json")

# figure -> (target, "higher" or "lower" is better); None: reported, no target
TARGETS: dict[str, tuple[float | None, str]] = {
    "engine_bound_ratio": (0.90, "higher"),
    "batching_gain": (6.0, "higher"),
    "upload_bound_ratio": (0.95, "higher"),
    "orchestration_vs_bare_celery": (1.0, "higher"),
    "submit_items_per_s": (20_000, "higher"),
    "api_rss_growth_mb": (100, "lower"),
    "api_rss_growth_10k_mb": (100, "lower"),
    "first_message_after_upload_s": (1.0, "lower"),
    "interactive_start_p95_micro_batches": (None, "lower"),
    "interactive_start_p95_vs_allowance": (1.0, "lower"),
    "interactive_finish_p95_micro_batches": (None, "lower"),
    "worker_rss_growth_pct": (5.0, "lower"),
    "get_batch_ms": (5.0, "lower"),
    "get_batch_10k_ms": (5.0, "lower"),
    "system_engine_s_vs_raw": (None, "lower"),
    "claim_share_of_wall": (None, "lower"),
}

FAMILIES = {"submission": submit.run, "worker": worker.run}


def machine() -> dict[str, Any]:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "system": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "gpu": "none (CPU only)", "load_average_at_start": os.getloadavg()}


def summarise(runs: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    figures: dict[str, dict[str, Any]] = {}
    for name in runs[0]:
        figure = spread([run[name] for run in runs])
        target, better = TARGETS.get(name, (None, "higher"))
        median = figure["median"]
        met = None if target is None else (median >= target if better == "higher" else median <= target)
        figures[name] = {**figure, "target": target, "better": better, "met": met}
    return figures


def print_table(figures: dict[str, dict[str, Any]], title: str) -> None:
    table = Table(title=title)
    for column in ("figure", "min", "median", "max", "target", "met"):
        table.add_column(column)
    for name, f in figures.items():
        target = "" if f["target"] is None else f"{'≥' if f['better'] == 'higher' else '≤'} {f['target']:g}"
        met = "" if f["met"] is None else ("yes" if f["met"] else "NO")
        table.add_row(name, f"{f['min']:.3g}", f"{f['median']:.3g}", f"{f['max']:.3g}", target, met)
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="smaller worker runs (under 3 minutes)")
    parser.add_argument("--trace", action="store_true",
                        help="tiny-sd traced (profile field trace, models.tracing), in the workers and the raw "
                             f"loop; written to {TRACED.name}")
    args = parser.parse_args()
    # One thread per process: on a machine the API, PostgreSQL, Redis, S3 and the worker share,
    # two OpenMP threads per process spin against each other (measured: 40x slower forward passes).
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from models.tiny import build_tiny

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        models_dir = workdir / "models"
        build_tiny(models_dir / "tiny")
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in FAMILIES}
        profiles: dict[str, dict[str, Any]] = {}
        if args.trace:
            from core.settings import Settings

            tiny_sd = Settings(models_dir=models_dir).models["tiny-sd"]
            profiles["tiny-sd"] = tiny_sd.model_copy(update={"trace": True}).model_dump()
        with BenchStack(workdir, models_dir, profiles) as stack:
            for repeat in range(REPEATS):
                for name, family in FAMILIES.items():
                    console.print(f"[bold]{name}[/bold] run {repeat + 1}/{REPEATS}")
                    runs[name].append(family(stack, args.quick))
        figures = {name: f for family in runs.values() for name, f in summarise(family).items()}
        engine: list[dict[str, Any]] = []
        dashboard: list[dict[str, Any]] = []
        if not args.quick:
            from bench import models

            engine = models.run(models_dir)
            dashboard = bench_dashboard(workdir)
    print_table(figures, f"Step1X Batch, whole system ({'quick' if args.quick else 'full'} run, "
                         f"{REPEATS} interleaved repeats{', tiny-sd traced' if args.trace else ''})")
    results = TRACED if args.trace else RESULTS
    results.write_text(json.dumps({"machine": machine(), "quick": args.quick, "trace": args.trace, "repeats": REPEATS,
                                   "figures": figures, "engine": engine, "dashboard": dashboard},
                                  indent=2) + "\n")
    console.print(f"written to {results}")
    if not args.quick:
        from bench import encode, hops, interference, jobcap, malloc, prefetch, sizes, threads, tracing, webhooks

        webhooks.main()
        hops.main()
        prefetch.main()
        jobcap.main()
        encode.main()
        malloc.main()
        interference.main()
        tracing.main()
        sizes.main()
        threads.main()  # last: it changes this process's torch threads


if __name__ == "__main__":
    main()
