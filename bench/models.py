"""Engine-level choices, each against its alternative in the same process: batching, the prompt
cache, dynamic resolution, and a real-size SD UNet step on the CPU (`bench.gpu` measures CUDA). Full runs only
(`make bench`); the whole-system figures are in `bench.submit` and `bench.worker`."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPEATS = 3


def best_of(run: Callable[[], Any], repeats: int = REPEATS) -> float:
    """Median wall time of `repeats` runs after one warm-up run."""
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_batching(models_dir: Path) -> dict[str, Any]:
    """16 images through the tiny text-to-image pipeline: one forward pass of 8 vs 8 passes of 1."""
    from core.settings import Settings
    from models.engine import ImageRequest
    from models.profiles import create_engine

    engine = create_engine("tiny-sd", Settings(models_dir=models_dir))
    requests = [ImageRequest(kind="generate", prompt=f"product {i}", width=64, height=64, steps=10, seed=i)
                for i in range(16)]
    single = best_of(lambda: [engine.run([r]) for r in requests])
    batched = best_of(lambda: [engine.run(requests[i:i + 8]) for i in (0, 8)])
    return {"case": "micro-batch of 8 vs 1 (tiny SD, 64 px, 10 steps, 16 images)",
            "baseline_s": single, "choice_s": batched, "ratio": single / batched,
            "unit": "x images/s"}


def bench_prompt_cache(models_dir: Path) -> dict[str, Any]:
    """16 single-image jobs repeating one prompt: cached text embeddings vs encoding every time."""
    from core.settings import Settings
    from models.engine import ImageRequest
    from models.profiles import create_engine

    engine = create_engine("tiny-sd", Settings(models_dir=models_dir))
    requests = [ImageRequest(kind="generate", prompt="a white sneaker on a wooden table", width=64, height=64,
                             steps=2, seed=i) for i in range(16)]

    def uncached() -> None:
        for request in requests:
            engine.prompt_cache.clear()  # type: ignore[attr-defined]
            engine.run([request])

    cold = best_of(uncached)
    warm = best_of(lambda: [engine.run([r]) for r in requests])
    return {"case": "prompt-embedding cache, repeated prompt (tiny SD, 2 steps)", "baseline_s": cold,
            "choice_s": warm, "ratio": cold / warm, "unit": "x jobs/s"}


def bench_dynamic_resolution() -> dict[str, Any]:
    """Object removal on a 3000x3000 photo with a 200x200 mask: crop around the mask vs whole image."""
    import numpy as np
    from PIL import Image, ImageDraw
    from skimage import data

    from core.settings import ModelProfile
    from models.classical import ClassicalFillEngine, choose_method, inpaint
    from models.engine import ImageRequest

    photo = Image.fromarray(data.astronaut()).resize((3000, 3000), Image.Resampling.BICUBIC)
    mask = Image.new("L", photo.size)
    ImageDraw.Draw(mask).rectangle((1400, 1400, 1599, 1599), fill=255)
    engine = ClassicalFillEngine("classical-fill", ModelProfile(task="inpaint", engine="classical"))
    request = ImageRequest(kind="inpaint", mode="fill", image=photo, mask=mask)
    pixels, holes = np.asarray(photo), np.asarray(mask) > 0
    method = choose_method(holes)
    whole = best_of(lambda: inpaint(pixels, holes, method), repeats=1)
    cropped = best_of(lambda: engine.run([request]), repeats=1)
    return {"case": f"fill 3000x3000, 200x200 mask ({method}): crop vs whole image", "baseline_s": whole,
            "choice_s": cropped, "ratio": whole / cropped, "unit": "x faster"}


def bench_unet() -> list[dict[str, Any]]:
    """A real-size SD 1.x UNet (randomly initialised from its published config: nothing downloaded),
    one denoising step at 512 px on the CPU, fp32: batch 2 vs 1. The CUDA path has its own benchmark,
    `python -m bench.gpu`."""
    import torch
    from diffusers import UNet2DConditionModel

    from bench.gpu import SD15

    unet: Any = UNet2DConditionModel(in_channels=4, out_channels=4, **SD15["unet"])
    unet.eval()

    def step(batch: int) -> float:
        latents = torch.randn(batch, 4, 64, 64)
        text = torch.randn(batch, 77, 768)
        t = torch.tensor([500])

        def run() -> None:
            with torch.inference_mode():
                unet(latents, t, encoder_hidden_states=text)

        return best_of(run, repeats=1)

    one, two = step(1), step(2)
    return [{"case": "real-size SD UNet step, 512 px, CPU fp32: batch 2 vs 1", "baseline_s": one,
             "choice_s": two / 2, "ratio": one / (two / 2), "unit": "x images/s"}]


def run(models_dir: Path) -> list[dict[str, Any]]:
    results = [bench_batching(models_dir), bench_prompt_cache(models_dir), bench_dynamic_resolution()]
    return results + bench_unet()
