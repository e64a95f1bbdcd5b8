"""`python -m bench.jobcap` (also in a full `make bench`): what the job cap per micro-batch (profile
field `max_jobs`) buys and costs, with lanczos-x4 at its default cap and with the cap lifted, side by
side, interleaved, repeated. Its pixel budget alone holds 16,384 upscales of 8x8 images.

- interactive_finish_behind_upscales_max_s: the slowest of PROBES single upscales sent while a
  batch of small upscales is being worked through, seconds from submit to finish (their outputs
  are stored after those of the bulk micro-batches already in the store pipeline);
- noop_jobs_per_s: a batch of near no-op upscales alone, one more claim, message and finishing
  transaction per `max_jobs` jobs.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.spread import spread, spread_text, write_results
from bench.stack import BenchStack
from bench.worker import noise_png, run_batch, singles_waits, tagged_items

console = Console()
REPEATS = 3
BACKLOG, PROBES, NOOPS = 5_000, 5, 2_000
LIFTED = 100_000
RESULTS = Path(__file__).resolve().parent / "jobcap_results.json"


def measure(stack: BenchStack, max_jobs: int) -> dict[str, float]:
    """Both figures on a fresh API and worker planning lanczos-x4 with this cap."""
    stack.profiles = {"lanczos-x4": {**stack.settings.models["lanczos-x4"].model_dump(), "max_jobs": max_jobs}}
    stack.fresh_database()  # the API plans with the new profile
    stack.start_worker()
    try:
        with stack.client() as client:
            image = client.post("/v1/files", files={"file": ("n.png", noise_png(8))}).json()["id"]
            spec = {"kind": "upscale", "image": image, "model": "lanczos-x4", "cache": False}
            run_batch(client, tagged_items(16, "warm-up", **spec))
            _, seconds = run_batch(client, tagged_items(NOOPS, "noop", **spec))
            # To the finish, not the start: single jobs run first, but their outputs are stored after
            # those of the bulk micro-batches already in the store pipeline.
            _, waits = singles_waits(client, spec, BACKLOG, PROBES)
            return {"noop_jobs_per_s": NOOPS / seconds,
                    "interactive_finish_behind_upscales_max_s": max(waits["finished_at"])}
    finally:
        stack.stop_worker()


def main() -> dict[str, Any]:
    os.environ["OMP_NUM_THREADS"] = "1"  # as in `python -m bench`: one thread per process
    from models.tiny import build_tiny

    runs: dict[str, list[dict[str, float]]] = {"default": [], "lifted": []}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        build_tiny(workdir / "models" / "tiny")
        with BenchStack(workdir, workdir / "models") as stack:
            cap = stack.settings.models["lanczos-x4"].max_jobs
            for repeat in range(REPEATS):
                for name, max_jobs in (("default", cap), ("lifted", LIFTED)):
                    console.print(f"[bold]max_jobs {max_jobs}[/bold] run {repeat + 1}/{REPEATS}")
                    runs[name].append(measure(stack, max_jobs))
    figures = {}
    for name, measured in runs.items():
        for figure in measured[0]:
            figures[f"{figure}_{name}"] = spread([run[figure] for run in measured])
    table = Table(title=f"Job cap per micro-batch, lanczos-x4 8x8 upscales ({REPEATS} interleaved repeats)")
    for column in ("max_jobs", f"single job's finish behind {BACKLOG:,} (slowest of {PROBES}, s)",
                   f"{NOOPS:,} no-op jobs/s"):
        table.add_column(column)
    for name, label in (("default", f"{cap} (default)"), ("lifted", f"{LIFTED:,}")):
        row = [figures[f"{figure}_{name}"] for figure in ("interactive_finish_behind_upscales_max_s",
                                                           "noop_jobs_per_s")]
        table.add_row(label, *(spread_text(f) for f in row))
    console.print(table)
    console.print("min / median / max")
    result = {"default_max_jobs": cap, "lifted_max_jobs": LIFTED, "backlog": BACKLOG, "probes": PROBES,
              "noop_jobs": NOOPS, "repeats": REPEATS, "figures": figures}
    write_results(RESULTS, result)
    return result


if __name__ == "__main__":
    main()
