"""`python -m bench.tracing`: what tracing (`models.tracing`, a profile's `trace` field) gains on a CPU.

- tiny-sd's images/s traced against eager, each alone and beside a thread of the same process that
  holds the interpreter lock a share of the time, as a worker's store, upload and heartbeat threads
  do: 64 px, 10 steps, micro-batches of 16, side by side, interleaved, repeated.
- The memory a trace of tiny-sd's UNet leaves behind once dropped (TorchScript keeps its graph).
- One call of SD 1.5's UNet (its published config, random weights) traced against eager, at 128 px
  (16x16 latents), batch 2 (one image with classifier-free guidance).

One torch thread, as workers on a shared CPU run."""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from rich.console import Console
from rich.table import Table

from bench.spread import spread, spread_text

REPEATS = 3
BATCHES = 6
SIZE = 16
LOCK_SHARE = 0.15  # of every 10 ms, the neighbour thread runs Python for this share


def main() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from core.settings import Settings
    from models.diffusion import DiffusionEngine
    from models.engine import ImageRequest
    from models.tiny import ensure_tiny

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(models_dir=Path(tmp))
        ensure_tiny(settings.model_root / "tiny")
        profile = settings.models["tiny-sd"]
        engines = {"eager": DiffusionEngine("tiny-sd", profile.model_copy(update={"trace": False})),
                   "traced": DiffusionEngine("tiny-sd", profile.model_copy(update={"trace": True}))}
        requests = [ImageRequest(kind="generate", prompt="a product photo", width=64, height=64, steps=10,
                                 seed=i) for i in range(SIZE)]
        for engine in engines.values():  # traced, checked and optimised before timing
            engine.run(requests)
            engine.run(requests)

        def images_per_s(engine: DiffusionEngine) -> float:
            started = time.perf_counter()
            for _ in range(BATCHES):
                engine.run(requests)
            return BATCHES * SIZE / (time.perf_counter() - started)

        runs: dict[tuple[str, bool], list[float]] = {}
        for _ in range(REPEATS):
            for neighbour in (False, True):
                stop = threading.Event()
                thread = threading.Thread(target=_hold_the_lock, args=(stop,))
                if neighbour:
                    thread.start()
                for name, engine in engines.items():
                    runs.setdefault((name, neighbour), []).append(images_per_s(engine))
                stop.set()
                if neighbour:
                    thread.join()
    table = Table(title=f"tiny-sd, micro-batches of {SIZE}, images/s (min / median / max of {REPEATS})")
    for column in ("engine", "alone", f"beside a thread holding the lock {LOCK_SHARE:.0%}", "beside ÷ alone"):
        table.add_column(column)
    for name in engines:
        alone, beside = runs[name, False], runs[name, True]
        table.add_row(name, spread_text(spread(alone), ".1f"), spread_text(spread(beside), ".1f"),
                      f"{statistics.median(beside) / statistics.median(alone):.2f}")
    eager, traced = (statistics.median(runs[name, False]) for name in engines)
    Console().print(table)
    Console().print(f"tiny-sd traced ÷ eager, alone: {traced / eager:.2f}")
    Console().print(f"memory a trace of tiny-sd's UNet keeps after it is dropped: "
                    f"{trace_memory_mb(engines['eager'].pipe.unet):.0f} MB")
    eager_ms, traced_ms, differences = sd15_unet()
    Console().print(f"SD 1.5 UNet, one call at 128 px, batch 2: eager {eager_ms:.0f} ms, traced {traced_ms:.0f} ms "
                    f"({eager_ms / traced_ms:.2f}x); largest difference traced - eager at batch 2, 1: "
                    f"{differences[0]:g}, {differences[1]:g}")


def trace_memory_mb(unet: Any, traces: int = 4) -> float:
    """Resident MB per trace left after tracing `unet` at `traces` latent sizes and dropping them all."""
    import ctypes
    import gc

    import psutil
    import torch

    from models.tracing import Traced

    def resident() -> int:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the system, so RSS shows what is kept
        return int(psutil.Process().memory_info().rss)

    text = torch.randn(2, 77, unet.config.cross_attention_dim)
    before = resident()
    with torch.no_grad():
        for side in range(8, 8 + traces):
            traced = Traced(unet)
            traced(torch.randn(2, 4, side, side), torch.tensor(500), encoder_hidden_states=text, return_dict=False)
            del traced
    return (resident() - before) / traces / 2**20


def sd15_unet() -> tuple[float, float, tuple[float, float]]:
    """Median ms of one UNet call (of REPEATS), eager and traced, interleaved; and the largest
    difference between their outputs at the traced batch size and at another."""
    import torch
    from diffusers import UNet2DConditionModel

    from bench.gpu import SD15
    from models.tracing import Traced

    # Built, not loaded, so it is in training mode (dropout is 0 in its config): eval() says so.
    unet = cast(torch.nn.Module, UNet2DConditionModel(in_channels=4, out_channels=4, **SD15["unet"])).eval()
    traced = Traced(unet)
    inputs = (torch.randn(2, 4, 16, 16), torch.tensor(500), torch.randn(2, 77, SD15["unet"]["cross_attention_dim"]))
    calls: dict[str, Callable[..., Any]] = {"eager": unet.forward, "traced": traced}
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for _ in range(2):  # traced, then optimised on its second run
            traced(*inputs[:2], encoder_hidden_states=inputs[2], return_dict=False)
        for _ in range(REPEATS):
            for name, call in calls.items():
                started = time.perf_counter()
                call(*inputs[:2], encoder_hidden_states=inputs[2], return_dict=False)
                times[name].append((time.perf_counter() - started) * 1000)
        differences = []
        for batch in (2, 1):
            x, t, text = inputs[0][:batch], inputs[1], inputs[2][:batch]
            eager = unet(x, t, encoder_hidden_states=text, return_dict=False)[0]
            # Twice: the first call at a new batch size is the check, which answers with eager's output.
            for _ in range(2):
                out = traced(x, t, encoder_hidden_states=text, return_dict=False)[0]
            differences.append(float((out - eager).abs().max()))
    return statistics.median(times["eager"]), statistics.median(times["traced"]), (differences[0], differences[1])


def _hold_the_lock(stop: threading.Event) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        while time.perf_counter() - started < 0.01 * LOCK_SHARE:
            sum(range(1000))  # pure Python: holds the lock
        time.sleep(0.01 * (1 - LOCK_SHARE))


if __name__ == "__main__":
    main()
