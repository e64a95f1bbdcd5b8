"""`python -m bench.encode` (also in a full `make bench`): what zlib's level for PNG outputs
(STEP1X_PNG_COMPRESS_LEVEL) costs and saves.

- Encoding alone: sample photos (scikit-image's astronaut, coffee and chelsea) upscaled to 2048 px,
  as a 4x upscale of a 512 px catalog photo makes them: milliseconds per encode (median of 3) and
  bytes, at each level against Pillow's default 6.
- The whole system: lanczos-x4 upscales of those photos at 256 px (1024 px outputs, each with its
  thumbnail) through API, worker, S3 and PostgreSQL, jobs/s at level 6, the default and level 1,
  interleaved, repeated; every job stores its own output (cache off).
"""

from __future__ import annotations

import io
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image
from rich.console import Console

from bench.spread import print_table, spread, spread_text, write_results
from bench.stack import BenchStack
from bench.worker import fresh_worker_rate
from core.formats import PNG_LEVEL, encode
from step1x.demo import sample_photo

console = Console()
PHOTOS = ("astronaut", "coffee", "chelsea")
LEVELS = sorted({1, PNG_LEVEL, 6})  # 9 takes 7-8 times level 6's time for 4-6% fewer bytes
REPEATS = 3
JOBS = 48
RESULTS = Path(__file__).resolve().parent / "encode_results.json"


def encoding() -> dict[str, dict[int, dict[str, float]]]:
    """Per photo and level: ms per encode (median of 3) and MiB."""
    figures: dict[str, dict[int, dict[str, float]]] = {}
    for name in PHOTOS:
        photo = sample_photo(name, 512).resize((2048, 2048), Image.Resampling.LANCZOS)
        figures[name] = {}
        for level in LEVELS:
            times = []
            for _ in range(3):
                started = time.perf_counter()
                data = encode(photo, "png", png_level=level)
                times.append(time.perf_counter() - started)
            figures[name][level] = {"ms": statistics.median(times) * 1000, "mib": len(data) / 2**20}
    return figures


def system(stack: BenchStack, inputs: list[str], level: int, first: int) -> float:
    """Jobs/s of JOBS upscales on a fresh worker at `level` (after a warm-up batch of 8)."""
    def items(start: int, count: int) -> list[dict[str, Any]]:
        return [{"custom_id": f"u{i}", "kind": "upscale", "model": "lanczos-x4", "cache": False,
                 "image": inputs[i % len(inputs)], "seed": i} for i in range(start, start + count)]

    return fresh_worker_rate(stack, {"STEP1X_PNG_COMPRESS_LEVEL": str(level)}, items, first, 8, JOBS)


def main() -> dict[str, Any]:
    os.environ["OMP_NUM_THREADS"] = "1"  # as in `python -m bench`: one thread per process
    from models.tiny import build_tiny

    alone = encoding()
    rates: dict[int, list[float]] = {level: [] for level in LEVELS}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        build_tiny(workdir / "models" / "tiny")
        with BenchStack(workdir, workdir / "models") as stack:
            with stack.client() as client:
                inputs = []
                for name in PHOTOS:
                    buffer = io.BytesIO()
                    sample_photo(name, 256).save(buffer, format="PNG")
                    inputs.append(client.post("/v1/files", files={"file": (f"{name}.png", buffer.getvalue())})
                                  .json()["id"])
            first = 0
            for repeat in range(REPEATS):
                for level in LEVELS:
                    console.print(f"[bold]level {level}[/bold] run {repeat + 1}/{REPEATS}")
                    rates[level].append(system(stack, inputs, level, first))
                    first += JOBS + 8
    result: dict[str, Any] = {
        "encode_2048px": alone,
        "system_jobs_per_s": {str(level): spread(runs) for level, runs in rates.items()},
        "system_gain_vs_level_6": {str(level): spread([r / six for r, six in zip(runs, rates[6], strict=True)])
                                   for level, runs in rates.items() if level != 6}}
    print_table("PNG outputs by zlib level: one encode of a 2048 px sample photo",
                ("photo", "level", "ms", "MiB", "time ÷ level 6", "bytes against level 6"),
                [(name, str(level), f"{f['ms']:.0f}", f"{f['mib']:.2f}", f"{f['ms'] / levels[6]['ms']:.2f}",
                  f"{f['mib'] / levels[6]['mib'] - 1:+.0%}")
                 for name, levels in alone.items() for level, f in levels.items()])
    gains = result["system_gain_vs_level_6"]
    print_table(f"Whole system: {JOBS} lanczos-x4 upscales to 1024 px, jobs/s ({REPEATS} interleaved repeats, "
                "min / median / max)", ("level", "jobs/s", "÷ level 6"),
                [(str(level) + (" (default)" if level == PNG_LEVEL else ""),
                  spread_text(result["system_jobs_per_s"][str(level)]),
                  spread_text(gains[str(level)]) if str(level) in gains else "") for level in LEVELS])
    write_results(RESULTS, result)
    return result


if __name__ == "__main__":
    main()
