"""`python -m bench.sizes` (also in a full `make bench`): why the quick bench's near no-op rounds are
1,000 jobs. The near no-op figures of `python -m bench` (`bench.worker.uploads_and_orchestration`)
at 200 jobs, one micro-batch whose claim, engine round trip, uploads and finishing run one after
another, against 1,000, four micro-batches whose stages overlap as a catalog's do; each size on a
fresh worker, side by side on one stack, in alternating order, repeated.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console

from bench import worker
from bench.spread import mirrored, print_table, spread, spread_text, write_results
from bench.stack import BenchStack

console = Console()
REPEATS = 4
SIZES = (200, 1000)
FIGURES = ("orchestration_vs_bare_celery", "upload_bound_ratio", "noop_jobs_per_s", "bare_celery_tasks_per_s")
RESULTS = Path(__file__).resolve().parent / "sizes_results.json"


def main() -> dict[str, Any]:
    os.environ["OMP_NUM_THREADS"] = "1"  # as in `python -m bench`: one thread per process
    runs: dict[int, list[dict[str, float]]] = {size: [] for size in SIZES}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        with BenchStack(workdir, workdir / "models") as stack:
            for repeat in range(REPEATS):
                for size in mirrored(SIZES, repeat):
                    console.print(f"[bold]{size} jobs[/bold] run {repeat + 1}/{REPEATS}")
                    stack.fresh_database()
                    stack.start_worker()
                    try:
                        with stack.client() as client:
                            runs[size].append(worker.uploads_and_orchestration(stack, client, size))
                    finally:
                        stack.stop_worker()
    result: dict[str, Any] = {"repeats": REPEATS, "rounds": worker.ROUNDS,
                              "figures": {str(size): {name: spread([run[name] for run in runs[size]])
                                                      for name in FIGURES} for size in SIZES}}
    print_table(f"Near no-op rounds of 200 and 1,000 jobs ({REPEATS} alternating repeats, min / median / max)",
                ("figure", *(f"{size} jobs" for size in SIZES)),
                [(name, *(spread_text(result["figures"][str(size)][name], ".3g") for size in SIZES))
                 for name in FIGURES])
    write_results(RESULTS, result)
    return result


if __name__ == "__main__":
    main()
