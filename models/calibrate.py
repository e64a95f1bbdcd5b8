"""Measure the micro-batch size a model runs best at on this device.

Growing batch sizes of synthetic requests at the profile's working size: keep the one with the best
images/s that fits in memory. Growth stops at the first size that runs out of memory, that gains
less than MIN_GAIN over the best so far, or when the time budget is spent. The planner then cuts
micro-batches to `batch_size x cost per image` pixels instead of the profile's guessed budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from PIL import Image, ImageDraw

from core.settings import ModelProfile
from models.engine import Engine, ImageRequest

SIZES = (1, 2, 4, 8, 16, 32, 64)
MIN_GAIN = 1.05
# Steps of the untimed run at each size: a trace is optimised on its second run.
WARM_STEPS = 2
UPSCALE_INPUT = 64  # side of the synthetic upscale input


@dataclass
class Calibrated:
    batch_size: int
    pixel_budget: int
    images_per_s: float
    trials: list[dict[str, Any]] = field(default_factory=list)


def cost_per_image(profile: ModelProfile) -> int:
    """Pixels one request adds to a forward pass, as `core.dispatch.plan` counts them."""
    if profile.task == "upscale":
        return UPSCALE_INPUT * UPSCALE_INPUT * 16
    return profile.native_size * profile.native_size


def synthetic(profile: ModelProfile, n: int, steps: int) -> list[ImageRequest]:
    side = profile.native_size
    if profile.task == "generate":
        return [ImageRequest(kind="generate", prompt="calibration", width=side, height=side, steps=steps, seed=i)
                for i in range(n)]
    if profile.task == "upscale":
        image = Image.effect_noise((UPSCALE_INPUT, UPSCALE_INPUT), 64).convert("RGB")
        return [ImageRequest(kind="upscale", image=image, seed=i) for i in range(n)]
    image = Image.effect_noise((side, side), 64).convert("RGB")
    mask = Image.new("L", (side, side))
    ImageDraw.Draw(mask).rectangle((side // 4, side // 4, side // 2, side // 2), fill=255)
    mode: Literal["fill", "structure", "text"] = (
        "structure" if profile.engine == "controlnet" else "fill" if profile.engine == "classical" else "text")
    return [ImageRequest(kind="inpaint", mode=mode, image=image, mask=mask, prompt="calibration", steps=steps,
                         seed=i) for i in range(n)]


def device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError | torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def calibrate(engine: Engine, profile: ModelProfile, steps: int = 4, budget_s: float = 120.0) -> Calibrated:
    """Try growing batch sizes; returns the best that fit, with every trial."""
    started = time.monotonic()
    engine.run(synthetic(profile, 1, steps))  # warm-up: lazy loading, kernels, caches
    trials: list[dict[str, Any]] = []
    best: tuple[int, float] | None = None
    for size in SIZES:
        requests = synthetic(profile, size, steps)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            # Untimed first: a traced engine (models.tracing) checks a new batch size against the
            # module once, and a GPU makes its first allocations at it; the timed run must not pay.
            engine.run(synthetic(profile, size, WARM_STEPS))
            t = time.perf_counter()
            engine.run(requests)
            seconds = time.perf_counter() - t
        except Exception as exc:
            if not _out_of_memory(exc):
                raise
            trials.append({"batch_size": size, "oom": True})
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            break
        rate = size / seconds
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        trials.append({"batch_size": size, "images_per_s": round(rate, 3), "peak_bytes": peak})
        if best is not None and rate < best[1] * MIN_GAIN:
            break
        best = (size, rate)
        if time.monotonic() - started > budget_s:
            break
    if best is None:
        raise RuntimeError(f"model {engine.name!r} could not run even one image: out of memory")
    size, rate = best
    return Calibrated(size, size * cost_per_image(profile), rate, trials)
