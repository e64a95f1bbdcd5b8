"""Job specs: what a user may ask for, validated with messages that name the field.

A spec is one catalog item. `parse_items` checks a whole batch and reports every bad item at
once, so a user fixes a manifest in one round trip. Checks that need stored state (does the file
exist, do the sizes agree) live in `core.submit`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from core.errors import FieldError, InvalidInput
from core.settings import ModelProfile, Settings
from core.tables import File

FileId = Annotated[str, Field(pattern=r"^([0-9a-f]{64}|https?://\S+)$", max_length=2000,
                              description="id returned by POST /v1/files, or an http(s) URL to fetch")]
MAX_SEED = 2**32 - 1
# Seeds only need to differ, not to be secret: one generator seeded from the OS, not a system call each.
_seeds = random.Random()
# C0 and C1 control characters (NUL, tab, newline, ...): they break file names, headers and logs.
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _no_blank(value: str) -> str:
    if value and not value.strip():
        raise ValueError("is only whitespace: say what to draw")
    return value


Prompt = Annotated[str, Field(max_length=2000), AfterValidator(_no_blank)]
FILE_FIELDS = ("image", "mask", "edges")


class _Spec(BaseModel):
    # Strict: `steps: true` or `"30"` is a mistake to report, not a value to coerce (an int is
    # still accepted where a float is expected).
    model_config = ConfigDict(extra="forbid", strict=True)

    custom_id: str | None = Field(None, min_length=1, max_length=200,
                                  description="your id for the item: any text without control characters")
    model: str | None = Field(None, description="model profile; the default for the task when omitted")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="random and recorded when omitted")
    cache: bool = Field(True, description="reuse the stored output of an identical earlier job (same spec, "
                                          "inputs, seed and model weights)")
    output_format: Literal["png", "jpeg", "webp"] = Field("png", description="how outputs are encoded")
    quality: int | None = Field(None, ge=1, le=100, description="jpeg and webp quality (90 when omitted)")
    background: str = Field("#ffffff", pattern=r"^#[0-9a-fA-F]{6}$",
                            description="colour that transparent input pixels are flattened onto")

    @model_validator(mode="after")
    def _lossy_quality(self) -> _Spec:
        if self.quality is not None and self.output_format == "png":
            raise ValueError("quality: png is lossless; quality applies to jpeg and webp")
        return self

    @field_validator("custom_id")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        if value is not None and CONTROL.search(value):
            raise ValueError("control characters (NUL, tab, newline, ...) are not allowed")
        return value


class GenerateSpec(_Spec):
    kind: Literal["generate"]
    prompt: Prompt = Field(min_length=1)
    negative_prompt: str = Field("", max_length=2000)
    steps: int = Field(30, ge=1, le=150)
    guidance_scale: float = Field(7.5, ge=0, le=30)
    width: int = Field(512, ge=64, le=4096)
    height: int = Field(512, ge=64, le=4096)
    num_images: int = Field(1, ge=1, le=8, description="images per prompt, seeds seed, seed+1, ...")


class InpaintSpec(_Spec):
    kind: Literal["inpaint"]
    mode: Literal["fill", "structure", "text"] = Field(
        description="fill: match the surroundings; structure: follow an edge map; text: draw the prompt"
    )
    image: FileId
    mask: FileId = Field(description="non-zero pixels are redrawn (the grey level over black: transparent "
                                     "pixels count as black); same size as image")
    prompt: Prompt | None = None
    negative_prompt: str = Field("", max_length=2000)
    edges: FileId | None = Field(None, description="structure mode: your own edge map instead of Canny")
    canny_low: int = Field(100, ge=0, le=255)
    canny_high: int = Field(200, ge=0, le=255)
    steps: int = Field(30, ge=1, le=150)
    guidance_scale: float = Field(7.5, ge=0, le=30)
    strength: float = Field(1.0, gt=0, le=1)
    padding: int = Field(32, ge=0, le=512, description="context pixels kept around the mask's box")

    @model_validator(mode="after")
    def _mode_fields(self) -> InpaintSpec:
        if self.mode == "text" and not self.prompt:
            raise ValueError("prompt: text mode needs a prompt saying what to draw")
        if self.edges is not None and self.mode != "structure":
            raise ValueError("edges: only structure mode uses an edge map")
        if self.canny_low >= self.canny_high:
            raise ValueError("canny_low: must be below canny_high")
        return self


class UpscaleSpec(_Spec):
    kind: Literal["upscale"]
    image: FileId
    scale: Literal[4] = 4


JobSpec = Annotated[GenerateSpec | InpaintSpec | UpscaleSpec, Field(discriminator="kind")]
_adapter: TypeAdapter[GenerateSpec | InpaintSpec | UpscaleSpec] = TypeAdapter(JobSpec)
AnySpec = GenerateSpec | InpaintSpec | UpscaleSpec


def task_key(spec: AnySpec) -> str:
    return f"inpaint.{spec.mode}" if isinstance(spec, InpaintSpec) else spec.kind


def input_files(spec: AnySpec) -> dict[str, str]:
    """The file ids a spec refers to, by field name. Read from the instance dict: getattr of a field
    the spec's kind lacks goes through pydantic's slow __getattr__, once per item of a catalog."""
    if isinstance(spec, GenerateSpec):  # text-to-image has no inputs: a catalog of them skips the look
        return {}
    fields = spec.__dict__
    return {n: fields[n] for n in FILE_FIELDS if fields.get(n) is not None}


def _field_of(loc: Sequence[str | int], message: str) -> tuple[str, str]:
    # The union's discriminator tag ("generate", ...) is noise in a field path.
    parts = [str(p) for p in loc if p not in ("generate", "inpaint", "upscale")]
    field = ".".join(parts)
    # Errors raised in a model validator carry their field in the message ("prompt: ...").
    if not field and ": " in message:
        field, message = message.split(": ", 1)
        field = field.removeprefix("Value error, ")
    return field or "item", message.removeprefix("Value error, ")


def parse_item(raw: Any, item: str | None = None) -> AnySpec:
    """Validate one item; raise InvalidInput naming each bad field."""
    try:
        return _adapter.validate_python(raw)
    except ValidationError as exc:
        errors = []
        for err in exc.errors(include_url=False):
            if err["type"] in ("union_tag_not_found", "union_tag_invalid"):
                errors.append(FieldError("kind", "must be one of: generate, inpaint, upscale", item))
                continue
            field, message = _field_of(err["loc"], err["msg"])
            if field in FILE_FIELDS and err["type"] == "string_pattern_mismatch":
                message = (f"{err['input']!r} is not a file id: upload the file with POST /v1/files and pass "
                           "its id, or submit with `step1x submit`, which uploads local paths")
            errors.append(FieldError(field, message, item))
        raise InvalidInput(errors) from None


def _item_name(raw: Any, index: int) -> str:
    if isinstance(raw, dict) and isinstance(raw.get("custom_id"), str) and raw["custom_id"]:
        return raw["custom_id"]
    return f"#{index}"


def parse_items(raw_items: Iterable[Any], settings: Settings, require_custom_id: bool = True
                ) -> tuple[list[AnySpec], list[FieldError]]:
    """The valid specs and the errors of the others, so later checks can still report on the valid ones."""
    specs: list[AnySpec] = []
    errors: list[FieldError] = []
    seen: set[str] = set()
    # A catalog repeats a few models and sizes: each combination is checked once per call.
    verdicts: dict[tuple[Any, ...], list[tuple[str, str]]] = {}
    index = -1
    for index, raw in enumerate(raw_items):
        name = _item_name(raw, index)
        # Checked on the raw item, so a duplicate is reported beside the item's other errors.
        custom_id = raw.get("custom_id") if isinstance(raw, dict) else None
        if isinstance(custom_id, str) and custom_id:
            if custom_id in seen:
                errors.append(FieldError("custom_id", "appears more than once in this batch", name))
            seen.add(custom_id)
        try:
            spec = parse_item(raw, name)
        except InvalidInput as exc:
            errors.extend(exc.errors)
            continue
        if require_custom_id and spec.custom_id is None:
            errors.append(FieldError("custom_id", "every batch item needs a custom_id", name))
        model_errors = check_model(spec, settings, name, verdicts)
        errors.extend(model_errors)
        if spec.seed is None:
            spec.seed = _seeds.getrandbits(32)  # uniform over 0..MAX_SEED
        if not model_errors:
            specs.append(spec)
    if index + 1 > settings.max_batch_items:
        errors.append(FieldError("items", f"{index + 1} items: at most {settings.max_batch_items} per batch"))
    return specs, errors


def check_model(spec: AnySpec, settings: Settings, name: str | None,
                verdicts: dict[tuple[Any, ...], list[tuple[str, str]]] | None = None) -> list[FieldError]:
    """Resolve the model profile in place; report a model that cannot serve this item. `verdicts`
    keeps the (field, message) problems of each combination of model, mode and size already seen."""
    if spec.model is None:
        spec.model = settings.default_models[task_key(spec)]
    # Everything the verdict depends on: the mode matters to inpainting, the size to generation.
    key: tuple[Any, ...] = (spec.kind, spec.model, None, None, None, None)
    if isinstance(spec, InpaintSpec):
        key = (spec.kind, spec.model, spec.mode, None, None, None)
    elif isinstance(spec, GenerateSpec):
        key = (spec.kind, spec.model, None, spec.width, spec.height, spec.num_images)
    problems = verdicts.get(key) if verdicts is not None else None
    if problems is None:
        problems = _model_problems(settings, *key)
        if verdicts is not None:
            verdicts[key] = problems
    return [FieldError(field, message, name) for field, message in problems]


def _model_problems(settings: Settings, kind: str, model: str, mode: str | None, width: int | None,
                    height: int | None, num_images: int | None) -> list[tuple[str, str]]:
    profile = settings.models.get(model)
    if profile is None:
        known = ", ".join(sorted(settings.models))
        return [("model", f"unknown model {model!r}; known: {known}")]
    if profile.task != kind:
        return [("model", f"model {model!r} does {profile.task}, not {kind}")]
    if mode == "structure" and profile.engine != "controlnet":
        return [("model", f"structure mode needs a controlnet model, {model!r} is not")]
    if mode is not None and mode != "structure" and profile.engine == "controlnet":
        return [("model", f"model {model!r} only does structure mode")]
    if mode is not None and mode != "fill" and profile.engine == "classical":
        return [("model", f"model {model!r} only does fill mode (object removal)")]
    if not installed(profile, settings):
        return [("model", f"model {model!r} is not installed on this server (its weights are "
                          "missing): pick another model, or ask the operator to install it")]
    if width is not None and height is not None and num_images is not None:
        if max(width, height) > profile.max_size:
            return [("width", f"{width}x{height} exceeds {profile.max_size} px per side for model {model!r}")]
        w, h = generation_bucket(width, height, profile.native_size)
        pixels = w * h * num_images
        if pixels > profile.pixel_budget:
            return [("num_images", f"{num_images} images at {w}x{h} = {pixels} px exceed "
                                   f"model {model!r}'s budget of {profile.pixel_budget} px")]
    return []


def check_mask(spec: InpaintSpec, mask: File, name: str | None) -> list[FieldError]:
    """What the worker would refuse about a mask, from the coverage measured at upload (`mask` is
    its files row; rows from before coverage was measured are not checked)."""
    share = mask.mask_coverage
    if share is None:
        return []
    if share == 0:
        return [FieldError("mask", "mask is empty (all black or transparent): nothing to redraw", name)]
    if share == 1 and spec.mode == "fill":
        return [FieldError("mask", "mask covers the whole image: fill draws from the unmasked pixels, so "
                                   "leave some, or use text mode to draw everything anew", name)]
    return []


def installed(profile: ModelProfile, settings: Settings) -> bool:
    """The profile's weights are on disk (checked by path only: the API loads no model). The tiny
    offline profiles build themselves in the worker on first use."""
    if not settings.check_weights_at_submit or profile.tiny:
        return True
    return all(Path(path).exists() for path in (profile.weights, profile.controlnet) if path)


@cache
def generation_bucket(width: int, height: int, native_size: int) -> tuple[int, int]:
    """The size a model draws at: the requested aspect ratio at no more than its native area, sides
    rounded to a grid of native_size/8, so nearby sizes share a batch. The engine resizes the result
    to the exact size asked for."""
    step = max(8, native_size // 8)
    scale = min(1.0, (native_size * native_size / (width * height)) ** 0.5)
    snap = lambda side: max(step, round(side * scale / step) * step)  # noqa: E731
    return snap(width), snap(height)
