"""`make bench`: each design choice against its alternative, measured side by side in one run.

Prints a table of ratios and writes bench-output/bench.json. Absolute times depend on the machine;
the ratios are what the choices are judged by. Run on CPU unless a GPU is visible.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from bench.dashboard import bench_dashboard

console = Console()
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


def bench_bulk_insert(workdir: Path) -> dict[str, Any]:
    """Storing a 5,000-item catalog (SQLite): one executemany INSERT vs ORM objects one by one."""
    from core.db import session_scope, upgrade
    from core.settings import Settings
    from core.submit import accept
    from core.tables import Job, Tenant, new_id

    runs = iter(range(100))

    def fresh() -> Settings:
        settings = Settings(data_dir=workdir / f"db{next(runs)}")
        upgrade(settings.database_url)
        with session_scope(settings.database_url) as session:
            session.add(Tenant(id="bench"))
        return settings

    items = [{"custom_id": f"sku-{i}", "kind": "generate", "prompt": f"product {i}", "width": 512, "height": 512}
             for i in range(5000)]

    def bulk() -> None:
        settings = fresh()
        with session_scope(settings.database_url) as session:
            accept(session, settings, "bench", items, as_batch=True)

    def one_by_one() -> None:
        settings = fresh()
        with session_scope(settings.database_url) as session:
            rows = accept(session, settings, "bench", items[:1], as_batch=True).jobs
            for i in range(len(items)):
                session.add(Job(**{**rows[0], "id": new_id("job"), "custom_id": f"x{i}", "batch_id": None}))
                session.flush()

    orm = best_of(one_by_one, repeats=1)
    fast = best_of(bulk, repeats=1)
    return {"case": "store 5,000 catalog items: bulk INSERT vs ORM row by row (SQLite)", "baseline_s": orm,
            "choice_s": fast, "ratio": orm / fast, "unit": "x items/s"}


def bench_unet() -> list[dict[str, Any]]:
    """A real-size SD 1.x UNet (randomly initialised from its published config: nothing downloaded),
    one denoising step at 512 px. On CUDA: fp32 vs fp16 time and peak memory, and batch 8 vs 1
    throughput in fp16. On a CPU: fp32 batch 2 vs 1 (fp16 does not run on CPUs here)."""
    import torch
    from diffusers import UNet2DConditionModel

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    unet: Any = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
    unet.eval()

    def step(dtype: torch.dtype, batch: int) -> tuple[float, float]:
        net = unet.to(device=device, dtype=dtype)
        if cuda:
            net = net.to(memory_format=torch.channels_last)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        latents = torch.randn(batch, 4, 64, 64, device=device, dtype=dtype)
        text = torch.randn(batch, 77, 768, device=device, dtype=dtype)
        t = torch.tensor([500], device=device)

        def run() -> None:
            with torch.inference_mode():
                net(latents, t, encoder_hidden_states=text)
            if cuda:
                torch.cuda.synchronize()

        seconds = best_of(run, repeats=5 if cuda else 1)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        return seconds, peak

    if not cuda:
        one, _ = step(torch.float32, 1)
        two, _ = step(torch.float32, 2)
        return [{"case": "real-size SD UNet step, 512 px, CPU fp32: batch 2 vs 1", "baseline_s": one,
                 "choice_s": two / 2, "ratio": one / (two / 2), "unit": "x images/s"}]
    fp32, mem32 = step(torch.float32, 1)
    fp16, mem16 = step(torch.float16, 1)
    eight, _ = step(torch.float16, 8)
    return [
        {"case": f"real-size SD UNet step, 512 px: fp16 vs fp32 (peak {mem16:.2f} vs {mem32:.2f} GiB, "
                 f"{(1 - mem16 / mem32) * 100:.0f}% less)", "baseline_s": fp32, "choice_s": fp16,
         "ratio": fp32 / fp16, "unit": "x faster"},
        {"case": "real-size SD UNet step, 512 px, fp16: batch 8 vs 1", "baseline_s": fp16,
         "choice_s": eight / 8, "ratio": fp16 / (eight / 8), "unit": "x images/s"},
    ]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        from models.tiny import build_tiny

        models_dir = workdir / "models"
        build_tiny(models_dir / "tiny")
        cases: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("batching", lambda: bench_batching(models_dir)),
            ("prompt cache", lambda: bench_prompt_cache(models_dir)),
            ("dynamic resolution", bench_dynamic_resolution),
            ("bulk insert", lambda: bench_bulk_insert(workdir)),
        ]
        results = []
        with Progress(console=console) as progress:
            task = progress.add_task("benchmarks", total=len(cases) + 2)
            for name, run in cases:
                progress.update(task, description=name)
                results.append(run())
                progress.advance(task)
            progress.update(task, description="real-size UNet")
            results.extend(bench_unet())
            progress.advance(task)
            progress.update(task, description="dashboard over 1M jobs")
            results.extend(bench_dashboard(workdir))
            progress.advance(task)
    table = Table(title="Step1X Batch benchmarks (median wall time; ratio = baseline / choice)")
    for column in ("case", "baseline s", "choice s", "ratio"):
        table.add_column(column)
    for r in results:
        table.add_row(r["case"], f"{r['baseline_s']:.3f}", f"{r['choice_s']:.3f}", f"{r['ratio']:.2f} {r['unit']}")
    console.print(table)
    out = Path("bench-output")
    out.mkdir(exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2))
    console.print(f"written to {out / 'bench.json'}")
    from bench import webhooks

    webhooks.main()


if __name__ == "__main__":
    main()
