"""`python -m bench.malloc`: what holding freed memory (`core.heap.hold_freed_memory`, in the
worker's engine and pool processes) saves a forward pass.

The raw tiny-SD loop (64 px, 10 steps, micro-batches of 16) in fresh processes, one with glibc's
default and one holding freed memory, alternating, REPEATS of each: images/s and minor page faults
per image, each process timing its loop a few times after a warm-up, the median kept. Fresh
processes, because glibc's default depends on what the process freed before (the sliding mmap
threshold): a process that handled a large buffer earlier runs its forward passes as if held.
Writes bench/malloc_results.json. Linux with glibc only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.spread import print_table, spread, spread_text, write_results

RESULTS = Path(__file__).resolve().parent / "malloc_results.json"
REPEATS, LOOPS, IMAGES, SIZE = 3, 4, 256, 16
WAYS = ("default", "held")


def child(way: str, models_dir: Path) -> dict[str, float]:
    """In a fresh process: the raw loop's images/s and page faults per image, median of LOOPS."""
    import torch

    torch.set_num_threads(1)
    from bench.worker import generate_requests
    from core import heap
    from core.settings import Settings
    from models.profiles import create_engine

    if way == "held" and not heap.hold_freed_memory():
        raise SystemExit("holding freed memory needs glibc")
    engine = create_engine("tiny-sd", Settings(models_dir=models_dir))
    requests = generate_requests(IMAGES)
    for _ in range(2):
        engine.run(requests[:SIZE])
    rates, faults = [], []
    for _ in range(LOOPS):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        started = time.perf_counter()
        for start in range(0, IMAGES, SIZE):
            engine.run(requests[start:start + SIZE])
        rates.append(IMAGES / (time.perf_counter() - started))
        faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / IMAGES)
    return {"images_per_s": statistics.median(rates), "page_faults_per_image": statistics.median(faults)}


def main() -> dict[str, Any]:
    from models.tiny import build_tiny

    runs: dict[str, list[dict[str, float]]] = {way: [] for way in WAYS}
    # One thread per process, as in `python -m bench`; glibc's own settings untouched (no MALLOC_*).
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        models_dir = Path(tmp) / "models"
        build_tiny(models_dir / "tiny")
        for repeat in range(REPEATS):
            for way in WAYS:
                print(f"{way} run {repeat + 1}/{REPEATS}", flush=True)
                out = subprocess.run([sys.executable, "-m", "bench.malloc", "--child", way, str(models_dir)],
                                     env=env, check=True, capture_output=True, text=True).stdout
                runs[way].append(json.loads(out.splitlines()[-1]))
    result: dict[str, Any] = {
        way: {name: spread([run[name] for run in runs[way]]) for name in runs[way][0]} for way in WAYS}
    result["held_vs_default"] = spread([held["images_per_s"] / default["images_per_s"]
                                        for held, default in zip(runs["held"], runs["default"], strict=True)])
    print_table(f"Raw tiny-SD loop ({IMAGES} images of 64 px, micro-batches of {SIZE}), fresh processes, "
                f"{REPEATS} alternating repeats, min / median / max", ("malloc", "images/s", "page faults per image",
                                                                      "÷ default"),
                [(way, spread_text(result[way]["images_per_s"]), spread_text(result[way]["page_faults_per_image"]),
                  spread_text(result["held_vs_default"]) if way == "held" else "") for way in WAYS])
    write_results(RESULTS, result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.malloc")
    parser.add_argument("--child", choices=WAYS, help=argparse.SUPPRESS)
    parser.add_argument("models_dir", nargs="?", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.models_dir)))
    else:
        main()
