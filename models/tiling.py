"""Tiled inference shared by the network upscalers (Real-ESRGAN, waifu2x).

An image of any size goes through the network in tiles, so memory stays bounded by the profile's
pixel budget rather than by the largest photo in a catalog. Each tile carries `context` input
pixels of its neighbours on every side (mirrored at the image border) and only its core is kept,
so seams stay faint (none at all for a network that sees no further than the context). Tiles of
equal shape from every image in a micro-batch share forward passes.
"""

from __future__ import annotations

import math
import time
from abc import abstractmethod
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from core.errors import FieldError, ModelNotAvailable
from core.settings import ModelProfile
from models.device import resolve_device, resolve_dtype
from models.engine import Engine, ImageRequest, ImageResult, hash_path


@dataclass(frozen=True)
class TileSpec:
    scale: int  # output pixels per input pixel of one network pass
    context: int  # input pixels of context kept around each tile, and of padding at the image border
    shrink: int = 0  # input pixels per side the network eats itself (unpadded convolutions)
    pad_mode: Literal["reflect", "replicate"] = "reflect"


def tile_edge(spec: TileSpec, pixel_budget: int) -> int:
    """The core tile edge (input pixels) whose padded output fits the budget of one forward pass."""
    return max(32, math.isqrt(pixel_budget) // spec.scale - 2 * spec.context)


def _balanced(length: int, tile: int) -> int:
    # As many tiles as `tile` needs, but evened out: 130 px at most 108 per tile is 2 x 65, not 108 + 108.
    count = -(-length // tile)
    return -(-length // count)


def _starts(length: int, tile: int) -> list[int]:
    # The last tile is pulled back to end at the border, so every tile of an image has one shape.
    return [*range(0, length - tile, tile), length - tile]


def upscale_tiled(net: nn.Module, images: Sequence[np.ndarray], spec: TileSpec, tile: int,
                  batch_pixels: int, device: torch.device, dtype: torch.dtype,
                  after_pass: Callable[[int, int], None] | None = None) -> list[np.ndarray]:
    """Run `net` over HxWx3 uint8 images tile by tile; return HxW images `spec.scale` times larger.
    `after_pass(tiles done, tiles in all)` is called after each forward pass (it may raise to stop)."""
    s, c = spec.scale, spec.context
    padded, outputs = [], []
    groups: dict[tuple[int, int], list[tuple[int, int, int]]] = defaultdict(list)
    for index, image in enumerate(images):
        height, width = image.shape[:2]
        tensor = torch.from_numpy(np.array(image, np.float32)).permute(2, 0, 1)[None] / 255
        # Reflection needs more pixels than it mirrors; a sliver of an image repeats its edge instead.
        mode = spec.pad_mode if min(height, width) > c else "replicate"
        padded.append(F.pad(tensor, (c, c, c, c), mode=mode)[0])
        outputs.append(np.empty((height * s, width * s, 3), np.uint8))
        th, tw = _balanced(height, tile), _balanced(width, tile)
        groups[th, tw].extend((index, y, x) for y in _starts(height, th) for x in _starts(width, tw))
    margin = s * (c - spec.shrink)
    total, done = sum(len(tiles) for tiles in groups.values()), 0
    for (th, tw), tiles in groups.items():
        per_pass = max(1, batch_pixels // ((th + 2 * c) * (tw + 2 * c) * s * s))
        for first in range(0, len(tiles), per_pass):
            chunk = tiles[first:first + per_pass]
            batch = torch.stack([padded[i][:, y:y + th + 2 * c, x:x + tw + 2 * c] for i, y, x in chunk])
            with torch.inference_mode():
                result = net(batch.to(device, dtype))
            cores = result[:, :, margin:margin + th * s, margin:margin + tw * s].float().clamp(0, 1)
            pixels = cores.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            for (i, y, x), core in zip(chunk, pixels, strict=True):
                outputs[i][y * s:(y + th) * s, x * s:(x + tw) * s] = core
            done += len(chunk)
            if after_pass is not None:
                after_pass(done, total)
    return outputs


def check_upscale(req: ImageRequest, model: str, max_size: int, scales: Sequence[int]) -> list[FieldError]:
    """The upscale checks every upscaler shares: an input image within the size limit, a scale it does."""
    errors = []
    if req.image is None:
        errors.append(FieldError("image", "upscaling needs an input image", req.label))
    elif max(req.image.size) > max_size:
        errors.append(FieldError("image", f"image is {req.image.size[0]}x{req.image.size[1]}; model "
                                          f"{model!r} takes at most {max_size} px per side", req.label))
    if req.scale not in scales:
        allowed = ", ".join(str(s) for s in scales)
        errors.append(FieldError("scale", f"model {model!r} upscales by {allowed}, not {req.scale}",
                                 req.label))
    return errors


class TiledUpscaleEngine(Engine):
    """A 4x upscaler network loaded from a weight file and run tile by tile."""

    task = "upscale"
    spec: TileSpec
    pull_name: str  # what `step1x models pull` calls these weights

    def __init__(self, name: str, profile: ModelProfile) -> None:
        super().__init__(name, profile)
        path = Path(profile.weights or "")
        if not profile.weights or not path.is_file():
            raise ModelNotAvailable(f"weights of model {name!r} not found at {str(path)!r}: "
                                    f"run `step1x models pull {self.pull_name}`")
        self.device = resolve_device(profile.device)
        self.dtype = resolve_dtype(profile.precision, self.device)
        try:
            net = self.build(path)
        except (RuntimeError, KeyError, ValueError) as err:
            raise ModelNotAvailable(f"weights at {str(path)!r} do not fit model {name!r} "
                                    f"({type(err).__name__}: {str(err)[:300]})") from err
        self.net = net.to(self.device, self.dtype).eval()
        self.model_hash = hash_path(path)
        self.tile = tile_edge(self.spec, profile.pixel_budget)

    @abstractmethod
    def build(self, weights: Path) -> nn.Module:
        """The network with the weights in `weights` loaded (strictly: every key, every shape)."""

    def check_request(self, req: ImageRequest) -> list[FieldError]:
        return super().check_request(req) + check_upscale(req, self.name, self.profile.max_size, [4])

    def upscale(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        return upscale_tiled(self.net, images, self.spec, self.tile, self.profile.pixel_budget,
                             self.device, self.dtype, after_pass=self.step)

    def run(self, requests: Sequence[ImageRequest]) -> list[ImageResult]:
        started = time.perf_counter()
        self.check_inputs(requests)
        arrays = [np.asarray(req.image.convert("RGB")) for req in requests if req.image is not None]
        images = [Image.fromarray(out) for out in self.upscale(arrays)]
        return self._results(images, requests, started)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a .pth as BasicSR saves it (optionally under
    `params_ema` / `params`)."""
    if path.suffix == ".safetensors":
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("params_ema", "params"):
        if isinstance(state, dict) and wrapper in state:
            return dict(state[wrapper])
    return dict(state)
