"""Stable Diffusion engines on diffusers pipelines loaded from local directories.

`DiffusionEngine` draws text-to-image (profile task "generate") or inpaints in text and fill modes
(task "inpaint"); `ControlNetInpaintEngine` inpaints in structure mode, steered by an edge map.
A micro-batch runs as one forward pass per group of equal parameters, with one seeded generator
per image, so each output depends on its own request only, whatever batch it ran in.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import time
from abc import abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import cv2
import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    ControlNetModel,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
)
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from transformers.utils import logging as transformers_logging

from core.errors import ConfigError, FieldError, ModelNotAvailable
from core.settings import ModelProfile
from core.specs import generation_bucket
from models.caches import Embeddings, PromptEmbeddingCache
from models.device import resolve_device, resolve_dtype
from models.engine import Engine, ImageRequest, ImageResult, Kind, Mode, check_mask, hash_path
from models.resolution import Crop, crop_around_mask, paste_back
from models.tracing import trace_calls

log = logging.getLogger(__name__)
# Loading progress bars flood worker logs once per pipeline and tell an operator nothing.
diffusers_logging.disable_progress_bar()
transformers_logging.disable_progress_bar()

# Pipelines whose encode_prompt returns (embeds, negative embeds): SDXL's returns four tensors and
# takes its prompts as text instead.
_CACHEABLE = (
    StableDiffusionPipeline, StableDiffusionInpaintPipeline, StableDiffusionControlNetInpaintPipeline,
)
CONTROL_SCALE = 1.0


def _require(path: str | None, field: str, marker: str, profile: ModelProfile, name: str) -> Path:
    """The profile's weights folder, or ModelNotAvailable saying how to provide it."""
    if not path:
        raise ModelNotAvailable(f"model {name!r} has no {field} directory: set one in its profile "
                                "(STEP1X_MODELS)")
    folder = Path(path)
    if (folder / marker).is_file():
        return folder
    if profile.tiny:
        fix = f"build the offline tiny models with models.tiny.ensure_tiny({str(folder.parent)!r})"
    else:
        fix = (f"save a diffusers model there (save_pretrained layout, with {marker}) or point the "
               f"profile's {field} at one (STEP1X_MODELS)")
    raise ModelNotAvailable(f"model {name!r}: no model at {folder} ({marker} missing): {fix}")


@dataclass
class _Patch:
    """One inpaint request cut down to the model's native square."""

    crop: Crop
    image: Image.Image
    mask: Image.Image


def _patch(req: ImageRequest, size: int) -> _Patch:
    assert req.image is not None and req.mask is not None
    crop = crop_around_mask(req.mask, req.padding)
    image = req.image.convert("RGB").crop(crop.box).resize((size, size), Image.Resampling.LANCZOS)
    # Area averaging then any-coverage-counts keeps thin strokes alive when the crop shrinks.
    mask = req.mask.convert("L").crop(crop.box).resize((size, size), Image.Resampling.BOX)
    return _Patch(crop, image, mask.point(lambda v: 255 if v else 0))


def _paste(req: ImageRequest, drawn: Image.Image, patch: _Patch) -> Image.Image:
    assert req.image is not None and req.mask is not None
    return paste_back(req.image, drawn, req.mask, patch.crop)


class _PipelineEngine(Engine):
    """Loading, device placement, prompt embeddings and sub-batching shared by both engines."""

    tasks: tuple[Kind, ...] = ()
    modes: tuple[Mode, ...] = ()

    def __init__(self, name: str, profile: ModelProfile,
                 prompt_cache: PromptEmbeddingCache | None = None) -> None:
        super().__init__(name, profile)
        if profile.task not in self.tasks:
            raise ConfigError(f"model {name!r}: engine {profile.engine!r} does {' or '.join(self.tasks)}, "
                              f"not {profile.task}")
        self.task = profile.task
        self.device = resolve_device(profile.device)
        self.dtype = resolve_dtype(profile.precision, self.device)
        # Shared per worker when the caller passes one, so profiles' prompts share one bound.
        self.prompt_cache = prompt_cache if prompt_cache is not None else PromptEmbeddingCache()
        self._steps = (0, 0)  # steps done before the current pass, steps in the whole run
        self.pipe: Any = self._load()
        self._place()
        if profile.tiny:
            log.warning("model %r runs the offline tiny pipelines: their weights are random and every image "
                        "is noise. Configure a real model profile (STEP1X_MODELS, STEP1X_DEFAULT_MODELS) "
                        "for real images.", name)

    @abstractmethod
    def _load(self) -> Any:
        """The pipeline from the profile's folders; sets model_hash."""

    @abstractmethod
    def _draw(self, requests: list[ImageRequest]) -> list[Image.Image]:
        """One forward pass for requests sharing a batch key."""

    def _batch_key(self, req: ImageRequest) -> Hashable:
        return req.steps, self._guidance(req), req.strength

    def _place(self) -> None:
        # The UNet stays NCHW on CUDA too: channels-last measured 14% slower there (`make bench-gpu`).
        self.pipe.to(self.device)
        if self.profile.attention_slicing:
            self.pipe.enable_attention_slicing()
        if self.profile.vae_tiling:
            self.pipe.vae.enable_tiling()
        self.pipe.set_progress_bar_config(disable=True)
        if self.profile.trace:
            self._trace()

    def _trace(self) -> None:
        trace_calls(self.pipe.unet)
        if isinstance(getattr(self.pipe, "controlnet", None), ControlNetModel):
            trace_calls(self.pipe.controlnet)
        # Exactly AutoencoderKL, whose decode takes a generator and never uses it (other decoders
        # sample with it, so they stay eager).
        if type(self.pipe.vae) is AutoencoderKL:
            trace_calls(cast(torch.nn.Module, self.pipe.vae), "decode", ignore=("generator",))

    def close(self) -> None:
        """Drop the pipeline and give its GPU memory back (called when a cache evicts this engine)."""
        self.pipe = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def check_request(self, req: ImageRequest) -> list[FieldError]:
        errors = super().check_request(req)
        if errors or req.kind != "inpaint":
            return errors
        if req.mode not in self.modes:
            return [FieldError("mode", f"model {self.name!r} inpaints in {' or '.join(self.modes)} mode, "
                                       f"not {req.mode}", req.label)]
        errors = check_mask(req)
        if not errors and req.image is not None and max(req.image.size) > self.profile.max_size:
            errors.append(FieldError("image", f"{req.image.size[0]}x{req.image.size[1]} exceeds "
                                              f"{self.profile.max_size} px per side for model {self.name!r}",
                                     req.label))
        return errors

    def run(self, requests: Sequence[ImageRequest]) -> list[ImageResult]:
        self.check_inputs(requests)
        started = time.perf_counter()
        groups: dict[Hashable, list[int]] = {}
        for index, req in enumerate(requests):
            groups.setdefault(self._batch_key(req), []).append(index)
        drawn: dict[int, Image.Image] = {}
        # Progress counts denoising steps over every pass of this run.
        total = sum(requests[indices[0]].steps for indices in groups.values())
        done = 0
        for indices in groups.values():
            self._steps = (done, total)
            images = self._draw([requests[i] for i in indices])
            drawn.update(zip(indices, images, strict=True))
            done += requests[indices[0]].steps
        return self._results([drawn[i] for i in range(len(requests))], requests, started)

    @staticmethod
    def _guidance(req: ImageRequest) -> float:
        # Fill mode has no prompt: guidance between two empty prompts would double the work for nothing.
        return 1.0 if req.mode == "fill" and not req.negative_prompt else req.guidance_scale

    def _encode(self, prompt: str, negative: str, guided: bool) -> Embeddings:
        with torch.no_grad():
            embeds, negative_embeds = self.pipe.encode_prompt(prompt, self.device, 1, guided, negative)
        return embeds, negative_embeds

    def _prompts(self, requests: list[ImageRequest], guidance: float) -> dict[str, Any]:
        prompts = ["" if r.mode == "fill" else r.prompt for r in requests]
        negatives = [r.negative_prompt for r in requests]
        if not isinstance(self.pipe, _CACHEABLE):
            return {"prompt": prompts, "negative_prompt": negatives}
        guided = guidance > 1  # the pipelines' own test for classifier-free guidance
        pairs = [self.prompt_cache.get(self.name, p, n, guided, partial(self._encode, p, n, guided))
                 for p, n in zip(prompts, negatives, strict=True)]
        args = {"prompt_embeds": torch.cat([embeds for embeds, _ in pairs])}
        if guided:
            args["negative_prompt_embeds"] = torch.cat([neg for _, neg in pairs if neg is not None])
        return args

    def _call(self, requests: list[ImageRequest], **inputs: Any) -> list[Image.Image]:
        """One forward pass for requests that share steps and guidance; one generator per image."""
        guidance = self._guidance(requests[0])
        generators = [torch.Generator(self.device).manual_seed(r.seed) for r in requests]
        before, total = self._steps

        def after_step(_pipe: Any, step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            self.step(before + step + 1, total)  # raises Canceled out of the pipeline: nothing decoded
            return tensors

        output = self.pipe(**self._prompts(requests, guidance), **inputs, guidance_scale=guidance,
                           num_inference_steps=requests[0].steps, generator=generators, output_type="pil",
                           callback_on_step_end=after_step)
        return list(output.images)

    def _inpaint(self, requests: list[ImageRequest],
                 control: Callable[[ImageRequest, _Patch], Image.Image] | None = None) -> list[Image.Image]:
        size = self.profile.native_size
        patches = [_patch(r, size) for r in requests]
        extra: dict[str, Any] = {}
        if control is not None:
            extra = {"control_image": [control(r, p) for r, p in zip(requests, patches, strict=True)],
                     "controlnet_conditioning_scale": CONTROL_SCALE}
        drawn = self._call(requests, image=[p.image for p in patches], mask_image=[p.mask for p in patches],
                           height=size, width=size, strength=requests[0].strength, **extra)
        return [_paste(r, out, p) for r, out, p in zip(requests, drawn, patches, strict=True)]


class DiffusionEngine(_PipelineEngine):
    """Text-to-image for task "generate"; inpainting in text and fill modes for task "inpaint"."""

    tasks = ("generate", "inpaint")
    modes = ("text", "fill")

    def _load(self) -> Any:
        weights = _require(self.profile.weights, "weights", "model_index.json", self.profile, self.name)
        self.model_hash = hash_path(weights)
        # The auto pipelines pick the SD 1.x/2.x or SDXL class from the folder's model_index.json.
        auto = AutoPipelineForText2Image if self.task == "generate" else AutoPipelineForInpainting
        return auto.from_pretrained(weights, dtype=self.dtype, local_files_only=True)

    def check_request(self, req: ImageRequest) -> list[FieldError]:
        errors = super().check_request(req)
        if errors:
            return errors
        if req.kind == "generate":
            if max(req.width, req.height) > self.profile.max_size or min(req.width, req.height) < 8:
                limit = f"8..{self.profile.max_size} px per side for model {self.name!r}"
                errors.append(FieldError("width", f"{req.width}x{req.height} is outside {limit}", req.label))
            if not req.prompt.strip():
                errors.append(FieldError("prompt", "text-to-image needs a prompt", req.label))
        elif req.mode == "text" and not req.prompt.strip():
            errors.append(FieldError("prompt", "text mode needs a prompt saying what to draw", req.label))
        return errors

    def _batch_key(self, req: ImageRequest) -> Hashable:
        if req.kind == "generate":
            bucket = generation_bucket(req.width, req.height, self.profile.native_size)
            return bucket, req.steps, req.guidance_scale
        return super()._batch_key(req)

    def _draw(self, requests: list[ImageRequest]) -> list[Image.Image]:
        if self.task == "inpaint":
            return self._inpaint(requests)
        width, height = generation_bucket(requests[0].width, requests[0].height, self.profile.native_size)
        images = self._call(requests, width=width, height=height)
        return [img if img.size == (r.width, r.height) else img.resize((r.width, r.height),
                                                                       Image.Resampling.LANCZOS)
                for img, r in zip(images, requests, strict=True)]


def _canny(image: Image.Image, low: int, high: int) -> Image.Image:
    edges = cv2.Canny(np.asarray(image.convert("L")), low, high)
    return Image.fromarray(edges).convert("RGB")


def _is_sdxl(weights: Path) -> bool:
    return "XL" in json.loads((weights / "model_index.json").read_text())["_class_name"]


class ControlNetInpaintEngine(_PipelineEngine):
    """Structure-mode inpainting: an edge map (supplied, or Canny of the input) steers what is drawn."""

    tasks = ("inpaint",)
    modes = ("structure",)

    def _load(self) -> Any:
        weights = _require(self.profile.weights, "weights", "model_index.json", self.profile, self.name)
        folder = _require(self.profile.controlnet, "controlnet", "config.json", self.profile, self.name)
        # The output depends on both folders, so the recorded hash does too.
        both = hash_path(weights) + hash_path(folder)
        self.model_hash = hashlib.sha256(both.encode()).hexdigest()[:16]
        controlnet = ControlNetModel.from_pretrained(folder, dtype=self.dtype, local_files_only=True)
        cls: Any = StableDiffusionControlNetInpaintPipeline
        if _is_sdxl(weights):
            cls = StableDiffusionXLControlNetInpaintPipeline
        return cls.from_pretrained(weights, controlnet=controlnet, dtype=self.dtype,
                                   local_files_only=True)

    def _draw(self, requests: list[ImageRequest]) -> list[Image.Image]:
        return self._inpaint(requests, control=self._control)

    @staticmethod
    def _control(req: ImageRequest, patch: _Patch) -> Image.Image:
        if req.edges is None:
            return _canny(patch.image, req.canny_low, req.canny_high)
        edges = req.edges.convert("RGB").crop(patch.crop.box)
        return edges.resize(patch.image.size, Image.Resampling.BILINEAR)
