"""The registry: model profile name -> loaded engine, kept warm in an LRU cache.

Engine modules are imported on first use so a worker that only upscales never imports diffusers.
"""

from __future__ import annotations

import importlib
import logging
from functools import cache
from importlib import metadata

from core.errors import ConfigError
from core.settings import Settings
from models.caches import LRUCache, PromptEmbeddingCache
from models.device import limit_cpu_threads
from models.engine import Engine

log = logging.getLogger(__name__)

# engine name in a profile -> "module:class"
ENGINES = {
    "diffusers": "models.diffusion:DiffusionEngine",
    "controlnet": "models.diffusion:ControlNetInpaintEngine",
    "classical": "models.classical:ClassicalFillEngine",
    "esrgan": "models.esrgan:EsrganEngine",
    "waifu2x": "models.waifu2x:Waifu2xEngine",
    "lanczos": "models.classical:LanczosUpscaleEngine",
}


def create_engine(name: str, settings: Settings, prompt_cache: PromptEmbeddingCache | None = None) -> Engine:
    profile = settings.models.get(name)
    if profile is None:
        raise ConfigError(f"unknown model profile {name!r}; known: {', '.join(sorted(settings.models))}")
    module, cls = ENGINES[profile.engine].split(":")
    if profile.tiny:
        # The offline defaults build themselves on first use: a fresh machine needs no setup.
        from models.tiny import ensure_tiny

        ensure_tiny(settings.model_root / "tiny")
    extra = {"prompt_cache": prompt_cache} if profile.engine in ("diffusers", "controlnet") else {}
    engine: Engine = getattr(importlib.import_module(module), cls)(name, profile, **extra)
    log.info("loaded model %s (%s engine, hash %s)", name, profile.engine, engine.model_hash)
    return engine


class Registry:
    """The engines one worker keeps loaded; the least recently used is dropped past `size`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        limit_cpu_threads(settings.cpu_threads)  # the process that keeps engines runs them
        self._engines: LRUCache[str, Engine] = LRUCache(settings.pipeline_cache_size)
        # One prompt cache for all the worker's pipelines, bounded once.
        self.prompt_cache = PromptEmbeddingCache(settings.prompt_cache_size)

    def get(self, name: str) -> Engine:
        return self._engines.get_or_create(
            name, lambda: create_engine(name, self.settings, self.prompt_cache))

    def loaded(self) -> list[str]:
        """Profiles loaded now (warm), least recently used first."""
        return self._engines.keys()


@cache
def library_versions() -> dict[str, str]:
    """Recorded with every output, so an image can be traced to the code that drew it."""
    versions = {}
    for dist in ("step1x-batch", "torch", "diffusers", "transformers", "opencv-python-headless"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions
