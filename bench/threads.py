"""`python -m bench.threads`: a forward pass on one torch thread and on one per core
(`STEP1X_CPU_THREADS`), alone and beside one busy process.

One micro-batch of 16 tiny-SD images (64 px, 30 steps), timed LOOPS times after a warm-up, the
median kept; the thread counts alternate, REPEATS of each. "Beside" is a process spinning on one
core, as an encode, an upload or another service of the stack takes one on a small machine: an
OpenMP thread that loses its core stalls every other at the next step's barrier. Writes
bench/threads_results.json.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.spread import print_table, spread, spread_text, write_results

RESULTS = Path(__file__).resolve().parent / "threads_results.json"
REPEATS, LOOPS, IMAGES, STEPS = 3, 3, 16, 30
BUSY = "while True: pass"


def main() -> dict[str, Any]:
    import dataclasses

    from bench.worker import generate_requests
    from core.settings import Settings
    from models.device import limit_cpu_threads
    from models.profiles import create_engine
    from models.tiny import build_tiny

    cores = os.cpu_count() or 1
    counts = sorted({1, cores})  # one, and torch's own default: one per core
    runs: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny(Path(tmp) / "models" / "tiny")
        engine = create_engine("tiny-sd", Settings(models_dir=Path(tmp) / "models"))
        requests = [dataclasses.replace(r, steps=STEPS) for r in generate_requests(IMAGES)]

        def timed() -> float:
            seconds = []
            for _ in range(LOOPS):
                started = time.perf_counter()
                engine.run(requests)
                seconds.append(time.perf_counter() - started)
            return statistics.median(seconds)

        for repeat in range(REPEATS):
            for threads in counts:
                print(f"{threads} thread(s), run {repeat + 1}/{REPEATS}", flush=True)
                limit_cpu_threads(threads)
                engine.run(requests)  # warm at this thread count
                runs.setdefault(f"{threads}_alone", []).append(timed())
                busy = subprocess.Popen([sys.executable, "-c", BUSY])
                try:
                    runs.setdefault(f"{threads}_beside_busy", []).append(timed())
                finally:
                    busy.kill()
                    busy.wait()
    result: dict[str, Any] = {"cores": cores, "images": IMAGES, "steps": STEPS,
                              **{name: spread(values) for name, values in runs.items()}}
    for threads in counts:
        result[f"{threads}_busy_vs_alone"] = spread(
            [b / a for a, b in zip(runs[f"{threads}_alone"], runs[f"{threads}_beside_busy"], strict=True)])
    print_table(f"One micro-batch of {IMAGES} tiny-SD images (64 px, {STEPS} steps) on {cores} cores, seconds, "
                f"{REPEATS} alternating repeats, min / median / max",
                ("torch threads", "alone", "beside one busy process", "÷ alone"),
                [(str(threads), spread_text(result[f"{threads}_alone"]), spread_text(result[f"{threads}_beside_busy"]),
                  spread_text(result[f"{threads}_busy_vs_alone"])) for threads in counts])
    write_results(RESULTS, result)
    return result


if __name__ == "__main__":
    main()
