"""What each upscaler costs per megapixel of output, on the device its profile resolves to:
`step1x measure-upscalers` (`make measure-upscalers`) prints the table the README quotes.

One photo shipped in scikit-image, upscaled 4x to `size` x `size` after a warm-up call (weights
loaded, kernels chosen); the median of `repeats` timed calls counts. Seconds per output megapixel
is the figure that scales: upscalers tile, so their cost grows with the output's area.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from core.settings import Settings
from models.engine import ImageRequest
from models.evaluate import photo
from models.profiles import create_engine


def measure(settings: Settings, names: list[str], size: int = 512, repeats: int = 3,
            device: str | None = None) -> dict[str, Any]:
    """Seconds per output megapixel of each upscale profile in `names` (weights must be present)."""
    small = photo("astronaut").resize((size // 4, size // 4), Image.Resampling.BICUBIC)
    report: dict[str, Any] = {"size": size, "repeats": repeats, "torch_threads": torch.get_num_threads(),
                              "cpus": os.cpu_count(), "upscalers": {}}
    for name in names:
        profile = settings.models[name]
        if device is not None:
            profile = profile.model_copy(update={"device": device})
        engine = create_engine(name, settings.model_copy(update={"models": {**settings.models, name: profile}}))
        engine.run([ImageRequest(kind="upscale", image=small.crop((0, 0, 32, 32)), label="warm-up")])
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            [result] = engine.run([ImageRequest(kind="upscale", image=small, label="measure")])
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        megapixels = result.image.width * result.image.height / 1e6
        seconds = statistics.median(times)
        kind = str(getattr(getattr(engine, "device", None), "type", "cpu"))
        report["upscalers"][name] = {"device": kind, "seconds_per_image": round(seconds, 4),
                                     "seconds_per_megapixel": round(seconds / megapixels, 4),
                                     "megapixels_per_second": round(megapixels / seconds, 5)}
    return report


def print_report(report: dict[str, Any], console: Console, out: Path | None = None) -> None:
    table = Table(title=f"4x upscaling to {report['size']}x{report['size']}, median of {report['repeats']} "
                        f"({report['cpus']} CPUs, {report['torch_threads']} torch threads)")
    for column in ("model", "device", "s/image", "s per output MP", "output MP/s"):
        table.add_column(column, justify="left" if column in ("model", "device") else "right")
    for name, m in report["upscalers"].items():
        table.add_row(name, m["device"], f"{m['seconds_per_image']:.3f}", f"{m['seconds_per_megapixel']:.3f}",
                      f"{m['megapixels_per_second']:.3g}")
    console.print(table)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"written to {out}")
