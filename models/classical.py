"""Engines without learned weights: classical object removal (`fill`) and Lanczos upscaling.

`fill` picks its method from the mask's shape, by what measured best on the nine eval photos at
512 px (whole-image PSNR, mean; see `models.evaluate`):

    strokes 1-3 px wide   biharmonic alone (1 px: 45.8 dB, against 42.3 for NS and 42.2 blended)
    anything wider        mean of Telea and biharmonic (5% centre square: 28.9 dB, against 28.4
                          for the best of NS/Telea and 28.2 for biharmonic alone)

Biharmonic solves one sparse system per masked region, which grows faster than its area (a
384 px square hole takes ~2.6 s), so past `BIHARMONIC_MAX_PIXELS` it is left out: NS for thin
strokes (it measured best of the two OpenCV methods there), Telea for the rest. Only a crop around
the mask is processed, so a small mask on a 3000x3000 photo costs as much as on a thumbnail.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from typing import Literal

import cv2
import numpy as np
from PIL import Image
from skimage.restoration import inpaint_biharmonic

from core.errors import FieldError
from core.masks import as_mask, coverage
from core.settings import ModelProfile
from models.engine import Engine, ImageRequest, ImageResult, check_mask
from models.resolution import Crop, paste_back
from models.tiling import check_upscale

FillMethod = Literal["ns", "telea", "biharmonic", "blend"]
FILL_METHODS: tuple[FillMethod, ...] = ("ns", "telea", "biharmonic", "blend")
# Neighbourhood (px) the OpenCV methods draw from: 7 measured ~0.1-0.3 dB above 3 on wide holes.
RADIUS = 7
# Masks whose 95th-percentile distance to the border is at most this are "thin" (strokes up to
# ~3 px wide measured best with biharmonic alone, 5 px and wider with the blend).
THIN_DISTANCE = 4.0
BIHARMONIC_MAX_PIXELS = 160_000
# Context kept around the mask: well beyond RADIUS and biharmonic's 2 px stencil, so the crop
# fills exactly as the whole image would.
CONTEXT = 32


def _opencv(image: np.ndarray, mask: np.ndarray, flag: int) -> np.ndarray:
    return cv2.inpaint(image, mask.astype(np.uint8) * 255, RADIUS, flag)


def _biharmonic(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    filled = inpaint_biharmonic(image.astype(np.float64) / 255, mask, channel_axis=-1)
    return np.clip(np.round(filled * 255), 0, 255).astype(np.uint8)


def inpaint(image: np.ndarray, mask: np.ndarray, method: FillMethod) -> np.ndarray:
    """Fill the True pixels of `mask` in an HxWx3 uint8 image; other pixels come back unchanged."""
    if method == "ns":
        return _opencv(image, mask, cv2.INPAINT_NS)
    if method == "telea":
        return _opencv(image, mask, cv2.INPAINT_TELEA)
    if method == "biharmonic":
        return _biharmonic(image, mask)
    mean = (_opencv(image, mask, cv2.INPAINT_TELEA).astype(np.uint16) + _biharmonic(image, mask) + 1) // 2
    return mean.astype(np.uint8)


def is_thin(mask: np.ndarray) -> bool:
    distance = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)
    return bool(np.percentile(distance[mask], 95) <= THIN_DISTANCE)


def choose_method(mask: np.ndarray) -> FillMethod:
    """The fill method for a boolean mask, by its shape and size (see the module docstring)."""
    thin = is_thin(mask)
    if np.count_nonzero(mask) > BIHARMONIC_MAX_PIXELS:
        return "ns" if thin else "telea"
    return "biharmonic" if thin else "blend"


def context_box(mask: Image.Image, context: int) -> Crop:
    """The mask's bounding box grown by `context` on every side within the image. Not squared like
    the diffusion crop: on a thin image a square would shrink to the mask and leave nothing to
    draw from."""
    box = mask.getbbox()
    if box is None:
        raise ValueError("mask is empty")
    left, top, right, bottom = box
    return Crop((max(0, left - context), max(0, top - context),
                 min(mask.width, right + context), min(mask.height, bottom + context)))


def config_hash(config: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


class ClassicalFillEngine(Engine):
    """Object removal (`inpaint`, mode `fill`) with OpenCV and scikit-image, on CPU."""

    task = "inpaint"

    def __init__(self, name: str, profile: ModelProfile) -> None:
        super().__init__(name, profile)
        self.model_hash = config_hash({"engine": "classical", "radius": RADIUS, "thin": THIN_DISTANCE,
                                       "biharmonic_max": BIHARMONIC_MAX_PIXELS, "context": CONTEXT})

    def check_request(self, req: ImageRequest) -> list[FieldError]:
        errors = super().check_request(req)
        if req.mode != "fill":
            errors.append(FieldError("mode", f"model {self.name!r} only does mode 'fill' (object removal), "
                                             f"not {req.mode!r}: pick a diffusion model for it", req.label))
        mask_errors = check_mask(req)
        if not mask_errors and req.mask is not None and coverage(req.mask) == 1:
            mask_errors.append(FieldError("mask", "mask covers the whole image: fill draws from the unmasked "
                                                  "pixels, so leave some", req.label))
        errors += mask_errors
        if req.image is not None and max(req.image.size) > self.profile.max_size:
            width, height = req.image.size
            errors.append(FieldError("image", f"image is {width}x{height}; model {self.name!r} takes at most "
                                              f"{self.profile.max_size} px per side", req.label))
        return errors

    def fill(self, image: Image.Image, mask: Image.Image, padding: int = 0) -> Image.Image:
        binary = as_mask(mask).point(lambda v: 255 if v else 0)
        crop = context_box(binary, max(padding, CONTEXT))
        region = np.asarray(binary.crop(crop.box)) > 0
        patch = inpaint(np.asarray(image.convert("RGB").crop(crop.box)), region, choose_method(region))
        # No feather: every pixel outside the mask keeps its original value exactly.
        return paste_back(image, Image.fromarray(patch), binary, crop, feather=0)

    def run(self, requests: Sequence[ImageRequest]) -> list[ImageResult]:
        started = time.perf_counter()
        self.check_inputs(requests)
        images = [self.fill(req.image, req.mask, req.padding) for req in requests
                  if req.image is not None and req.mask is not None]
        return self._results(images, requests, started)


class LanczosUpscaleEngine(Engine):
    """Upscaling by Lanczos resampling: the weight-free baseline the networks are measured against."""

    task = "upscale"
    scales = range(2, 9)

    def __init__(self, name: str, profile: ModelProfile) -> None:
        super().__init__(name, profile)
        self.model_hash = config_hash({"engine": "lanczos", "filter": "PIL.LANCZOS"})

    def check_request(self, req: ImageRequest) -> list[FieldError]:
        return super().check_request(req) + check_upscale(req, self.name, self.profile.max_size, self.scales)

    def run(self, requests: Sequence[ImageRequest]) -> list[ImageResult]:
        started = time.perf_counter()
        self.check_inputs(requests)
        images = [req.image.convert("RGB").resize((req.image.width * req.scale, req.image.height * req.scale),
                                                  Image.Resampling.LANCZOS)
                  for req in requests if req.image is not None]
        return self._results(images, requests, started)
