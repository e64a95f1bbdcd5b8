"""`python -m bench.prefetch` (also in a full `make bench`): what the worker's input lookahead
(`workers.lookahead`) gains, as inpainting images/s through the whole system with it on ÷ off
(STEP1X_PREFETCH_INPUTS), side by side, interleaved, repeated. Every job reads its own image and
mask, so each micro-batch of 16 reads 32 objects.

Twice: with the worker on loopback SeaweedFS, and with the worker's S3 traffic through a proxy
adding 20 ms round trips (`bench.latency`), standing in for an S3 service on another machine,
where reading inputs waits on the network rather than the CPU.
"""

from __future__ import annotations

import io
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image
from rich.console import Console

from bench.latency import delayed
from bench.spread import print_table, spread, spread_text, write_results
from bench.stack import BenchStack
from bench.worker import fresh_worker_rate

console = Console()
REPEATS = 3
IMAGES = 128
RESULTS = Path(__file__).resolve().parent / "prefetch_results.json"
SPEC = {"kind": "inpaint", "mode": "text", "prompt": "a lid", "model": "tiny-sd-inpaint", "steps": 10, "cache": False}


def _input_png(seed: int, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 20 + seed).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def measure(stack: BenchStack, s3_url: str, prefetch: bool, inputs: list[tuple[str, str]], start: int) -> float:
    """Images/s of one batch of IMAGES jobs on a fresh worker (after a warm-up batch of 16)."""
    def items(first: int, count: int) -> list[dict[str, Any]]:
        return [{"custom_id": f"i{i}", **SPEC, "image": inputs[i % len(inputs)][0],
                 "mask": inputs[i % len(inputs)][1], "seed": i} for i in range(first, first + count)]

    env = {"STEP1X_S3_ENDPOINT_URL": s3_url, "STEP1X_PREFETCH_INPUTS": str(prefetch).lower()}
    return fresh_worker_rate(stack, env, items, start, 16, IMAGES)


def main() -> dict[str, Any]:
    os.environ["OMP_NUM_THREADS"] = "1"  # as in `python -m bench`: one thread per process
    from models.tiny import build_tiny

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        build_tiny(workdir / "models" / "tiny")
        with BenchStack(workdir, workdir / "models") as stack, delayed(stack.s3.url, 10) as far_s3:
            with stack.client() as client:
                # Distinct inputs for every job of a run, none read by an earlier run.
                count = (IMAGES + 16) * REPEATS * 4
                inputs = [(client.post("/v1/files", files={"file": ("i.png", _input_png(i, "RGB"))}).json()["id"],
                           client.post("/v1/files", files={"file": ("m.png", _input_png(i, "L"))}).json()["id"])
                          for i in range(count)]
            rates: dict[str, list[float]] = {}
            start = 0
            for repeat in range(REPEATS):
                for where, url in (("loopback", stack.s3.url), ("20ms", far_s3)):
                    for prefetch in (True, False):
                        name = f"{where}_{'on' if prefetch else 'off'}"
                        console.print(f"[bold]{name}[/bold] run {repeat + 1}/{REPEATS}")
                        rates.setdefault(name, []).append(measure(stack, url, prefetch, inputs, start))
                        start += IMAGES + 16
    result: dict[str, Any] = {"images": IMAGES, "repeats": REPEATS,
                              "images_per_s": {name: statistics.median(r) for name, r in rates.items()},
                              "runs": rates}
    for where in ("loopback", "20ms"):
        gains = [on / off for on, off in zip(rates[f"{where}_on"], rates[f"{where}_off"], strict=True)]
        result[f"input_prefetch_gain_{where}"] = spread(gains)
    print_table(f"Input lookahead: inpainting images/s, on vs off ({REPEATS} interleaved repeats, medians)",
                ("worker's S3", "on", "off", "gain (min / median / max)"),
                [(label, f"{result['images_per_s'][f'{where}_on']:.1f}",
                  f"{result['images_per_s'][f'{where}_off']:.1f}",
                  spread_text(result[f"input_prefetch_gain_{where}"], ".2f"))
                 for where, label in (("loopback", "loopback"), ("20ms", "through 20 ms round trips"))])
    write_results(RESULTS, result)
    return result


if __name__ == "__main__":
    main()
