"""The engine contract every image model follows (after diffusers' pipelines).

An engine takes a micro-batch of `ImageRequest`s and returns one `ImageResult` per request, in
order. `check_inputs()` raises `InvalidInput` saying what to change before any compute is spent.
`run()` processes the whole micro-batch in as few forward passes as the model allows; each
request carries its own seed so an output is reproducible on its own, whatever batch it ran in.

Long runs are cooperative: inside `engine.watched(progress)`, the engine calls `progress(done, total)`
after each diffusion step or upscale tile, and stops with `Canceled` when it returns False. That is
how a cancel stops running work within a step, and how a job reports how far it got.
"""

from __future__ import annotations

import hashlib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from PIL import Image

from core.errors import FieldError, InvalidInput
from core.settings import ModelProfile

Kind = Literal["generate", "inpaint", "upscale"]
Mode = Literal["fill", "structure", "text"]
# Called with (units done, units in this run): diffusion steps or upscale tiles. False means stop.
Progress = Callable[[int, int], bool]


class Canceled(Exception):
    """The progress callback asked the run to stop: the run is abandoned and returns nothing."""


@dataclass
class ImageRequest:
    """One output image to make. Images are decoded PIL images; masks are mode "L" (non-zero = redraw)."""

    kind: Kind
    seed: int = 0
    width: int = 512  # generate: exact output size
    height: int = 512
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 30
    guidance_scale: float = 7.5
    mode: Mode | None = None  # inpaint only
    image: Image.Image | None = None
    mask: Image.Image | None = None
    edges: Image.Image | None = None  # structure mode: supplied edge map (else Canny of image)
    canny_low: int = 100
    canny_high: int = 200
    strength: float = 1.0
    padding: int = 32
    scale: int = 4  # upscale only
    # Name used in error messages: the job's custom_id or id.
    label: str = ""


@dataclass
class ImageResult:
    image: Image.Image
    seed: int
    model: str  # profile name
    model_hash: str  # short hash of the weights (or engine config for weight-less engines)
    timings: dict[str, float] = field(default_factory=dict)  # seconds, e.g. {"run": 0.42}

    def save(self, path: str | Path) -> None:
        self.image.save(path)


class Engine(ABC):
    """A loaded model profile. Construct once per worker and keep warm; `run` is called per micro-batch."""

    task: Kind

    def __init__(self, name: str, profile: ModelProfile) -> None:
        self.name = name
        self.profile = profile
        self.model_hash = "unknown"
        self._progress: Progress | None = None

    @contextmanager
    def watched(self, progress: Progress) -> Iterator[None]:
        """Runs inside the block report to `progress` and stop when it returns False."""
        self._progress = progress
        try:
            yield
        finally:
            self._progress = None

    def step(self, done: int, total: int) -> None:
        """Engines call this after each unit of work (a diffusion step, an upscale tile)."""
        if self._progress is not None and not self._progress(done, total):
            raise Canceled(f"model {self.name!r} stopped after {done} of {total} steps: canceled")

    def check_inputs(self, requests: Sequence[ImageRequest]) -> None:
        """Raise InvalidInput naming every request and field that cannot run on this engine."""
        errors: list[FieldError] = []
        for req in requests:
            errors.extend(self.check_request(req))
        if errors:
            raise InvalidInput(errors)

    def check_request(self, req: ImageRequest) -> list[FieldError]:
        errors = []
        if req.kind != self.task:
            errors.append(FieldError("kind", f"model {self.name!r} does {self.task}, not {req.kind}",
                                     req.label))
        return errors

    @abstractmethod
    def run(self, requests: Sequence[ImageRequest]) -> list[ImageResult]:
        """Make one image per request, in order. Call check_inputs first."""

    def _results(self, images: Sequence[Image.Image], requests: Sequence[ImageRequest], started: float
                 ) -> list[ImageResult]:
        elapsed = time.perf_counter() - started
        return [
            ImageResult(image=img, seed=req.seed, model=self.name, model_hash=self.model_hash,
                        timings={"run": elapsed / len(requests)})
            for img, req in zip(images, requests, strict=True)
        ]


def hash_path(path: str | Path) -> str:
    """Short content hash of a weight file or model directory (file names and bytes). Files over
    64 MiB contribute their size and first and last MiB, so multi-GB checkpoints hash in
    milliseconds and still change hash whenever they are replaced."""
    root = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    for file in files:
        digest.update(str(file.relative_to(root) if root.is_dir() else file.name).encode())
        size = file.stat().st_size
        with file.open("rb") as fh:
            if size <= _FULL_HASH_LIMIT:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
            else:
                digest.update(str(size).encode() + fh.read(1 << 20))
                fh.seek(-(1 << 20), 2)
                digest.update(fh.read())
    return digest.hexdigest()[:16]


_FULL_HASH_LIMIT = 64 << 20


def mask_is_empty(mask: Image.Image) -> bool:
    return mask.convert("L").getbbox() is None


def check_mask(req: ImageRequest) -> list[FieldError]:
    """The inpaint checks every engine shares: an image, a mask of the same size, not empty."""
    if req.image is None:
        return [FieldError("image", "inpainting needs an input image", req.label)]
    if req.mask is None:
        return [FieldError("mask", "inpainting needs a mask (white = redraw)", req.label)]
    if req.mask.size != req.image.size:
        return [FieldError("mask", f"mask is {req.mask.size[0]}x{req.mask.size[1]} but image is "
                                   f"{req.image.size[0]}x{req.image.size[1]}: they must match", req.label)]
    if mask_is_empty(req.mask):
        return [FieldError("mask", "mask is empty (all black): nothing to redraw", req.label)]
    if req.edges is not None and req.edges.size != req.image.size:
        return [FieldError("edges", "edge map must be the same size as the image", req.label)]
    return []
