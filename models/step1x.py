"""The in-process API of the product brief:

    from models import Step1XMedium
    model = Step1XMedium(version="medium", device="cpu", precision="fp32")
    model.generate(prompt="a white sneaker", steps=30, guidance_scale=7.5, width=512, height=512).save("out.png")
    model.inpaint(image, mask, mode="fill").save("clean.png")
    model.upscale(image, scale=4).save("big.png")

`version` names model profiles: `<version>` for text-to-image, `<version>-inpaint` for text and
fill inpainting, `<version>-controlnet` for structure inpainting, `<version>-upscale` for 4x. A
profile that is not configured falls back to the offline default for that task, and says so in
the log. The same engines run in the workers.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from core.masks import as_mask
from core.settings import Precision, Settings, get_settings
from core.specs import MAX_SEED
from models.engine import Engine, ImageRequest, ImageResult, Mode
from models.profiles import Registry

log = logging.getLogger(__name__)

ImageLike = Image.Image | np.ndarray | str | Path


def to_image(value: ImageLike, mode: str) -> Image.Image:
    if isinstance(value, str | Path):
        with Image.open(value) as img:
            return img.convert(mode)
    if isinstance(value, np.ndarray):
        return Image.fromarray(value).convert(mode)
    return value.convert(mode)


@dataclass
class Output:
    """The images of one call. `save` writes the first to `path`, further ones to `path-1.png`, ..."""

    results: list[ImageResult]

    @property
    def image(self) -> Image.Image:
        return self.results[0].image

    @property
    def images(self) -> list[Image.Image]:
        return [r.image for r in self.results]

    def save(self, path: str | Path) -> list[Path]:
        path = Path(path)
        paths = [path if i == 0 else path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(len(self.results))]
        for result, target in zip(self.results, paths, strict=True):
            result.image.save(target)
        return paths


class Step1XMedium:
    def __init__(self, version: str = "medium", device: str = "auto", precision: Precision = "auto",
                 settings: Settings | None = None) -> None:
        base = settings or get_settings()
        models = dict(base.models)
        # The caller's device and precision apply to every profile this instance loads.
        for name, profile in models.items():
            models[name] = profile.model_copy(update={"device": device, "precision": precision})
        self.settings = base.model_copy(update={"models": models})
        self.version = version
        self.registry = Registry(self.settings)

    def _engine(self, suffix: str, task: str) -> Engine:
        name = f"{self.version}{suffix}"
        if name not in self.settings.models:
            fallback = self.settings.default_models[task]
            log.warning("no model profile %r is configured; using the offline default %r for %s", name,
                        fallback, task)
            name = fallback
        return self.registry.get(name)

    def _run(self, engine: Engine, requests: list[ImageRequest]) -> Output:
        engine.check_inputs(requests)
        return Output(engine.run(requests))

    def generate(self, prompt: str, negative_prompt: str = "", steps: int = 30, guidance_scale: float = 7.5,
                 width: int = 512, height: int = 512, seed: int | None = None, num_images: int = 1) -> Output:
        seed = secrets.randbelow(MAX_SEED + 1) if seed is None else seed
        requests = [ImageRequest(kind="generate", prompt=prompt, negative_prompt=negative_prompt, steps=steps,
                                 guidance_scale=guidance_scale, width=width, height=height, seed=seed + i,
                                 label=f"image {i}") for i in range(num_images)]
        return self._run(self._engine("", "generate"), requests)

    def inpaint(self, image: ImageLike, mask: ImageLike, mode: Mode = "fill", prompt: str | None = None,
                edges: ImageLike | None = None, seed: int | None = None, **options: Any) -> Output:
        """mode: 'fill' (match the surroundings), 'structure' (follow edges: Canny of the image unless
        `edges` is given), 'text' (draw `prompt`). Options: steps, guidance_scale, strength, padding,
        canny_low, canny_high, negative_prompt."""
        if mode == "fill":
            task, suffix = "inpaint.fill", "-inpaint"
            if f"{self.version}-inpaint" not in self.settings.models:
                suffix = "-fill"  # the classical filler is the default for fill
        else:
            task, suffix = f"inpaint.{mode}", "-controlnet" if mode == "structure" else "-inpaint"
        request = ImageRequest(
            kind="inpaint", mode=mode, image=to_image(image, "RGB"), mask=as_mask(to_image(mask, "RGBA")),
            edges=to_image(edges, "RGB") if edges is not None else None, prompt=prompt or "",
            seed=secrets.randbelow(MAX_SEED + 1) if seed is None else seed, label="image", **options,
        )
        return self._run(self._engine(suffix, task), [request])

    def upscale(self, image: ImageLike, scale: int = 4) -> Output:
        request = ImageRequest(kind="upscale", image=to_image(image, "RGB"), scale=scale, label="image")
        return self._run(self._engine("-upscale", "upscale"), [request])
