"""Thumbnails: a small WebP (256 px on the long side) next to each output and input, for pages.

The dashboard shows only these, through presigned URLs, never the full-size images. An output no
larger than a thumbnail gets none (it would be a second copy of the same pixels, and a second PUT
per job): its job's result says `"thumbnails": false` and pages show the output itself. Keys follow the
image's own key, so a re-run overwrites its thumbnail like its output, and an input's thumbnail
(inputs are content-addressed) is written once however many jobs use it.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from PIL import Image

SIZE = 256
INPUT_FIELDS = ("image", "mask", "edges")
_written_inputs: set[str] = set()  # input thumbnails this process already stored


def thumb_key(output_key: str) -> str:
    """outputs/{tenant}/{batch}/{job}.png -> thumbs/{tenant}/{batch}/{job}.webp"""
    stem = output_key.removeprefix("outputs/").rsplit(".", 1)[0]
    return f"thumbs/{stem}.webp"


def needed(image: Image.Image) -> bool:
    return max(image.size) > SIZE


def shown(output_key: str, result: dict[str, Any] | None) -> str:
    """The key a page shows for an output: its thumbnail, or the output itself when it had none."""
    return thumb_key(output_key) if (result or {}).get("thumbnails", True) else output_key


def input_thumb_key(tenant: str, file_id: str) -> str:
    return f"thumbs/{tenant}/inputs/{file_id}.webp"


def encode(image: Image.Image) -> bytes:
    small = image.convert("L" if image.mode in ("L", "1") else "RGB")
    small.thumbnail((SIZE, SIZE))
    buffer = io.BytesIO()
    small.save(buffer, format="WEBP", quality=70, method=4)
    return buffer.getvalue()


def wanted(tenant: str, spec: dict[str, Any], outputs: Sequence[tuple[str, Image.Image]],
           load_input: Callable[[str], Image.Image]) -> dict[str, Callable[[], bytes]]:
    """The thumbnails a finished job needs, as key -> how to make its bytes: its outputs' and, once
    per process, its inputs' (the "before" of an inpainting's before/after). The caller stores them
    with the outputs, then calls `written` with the keys."""
    made: dict[str, Callable[[], bytes]] = {
        thumb_key(key): functools.partial(encode, image) for key, image in outputs if needed(image)}
    for field in INPUT_FIELDS:
        file_id = spec.get(field)
        if isinstance(file_id, str) and (key := input_thumb_key(tenant, file_id)) not in _written_inputs:
            made[key] = functools.partial(_input_thumb, load_input, file_id)
    return made


def written(keys: Iterable[str]) -> None:
    """Stored: input thumbnails among `keys` are not made again by this process."""
    if len(_written_inputs) > 100_000:  # bounded: a forgotten key only costs one rewrite
        _written_inputs.clear()
    _written_inputs.update(key for key in keys if key.split("/", 3)[2:3] == ["inputs"])


def _input_thumb(load_input: Callable[[str], Image.Image], file_id: str) -> bytes:
    return encode(load_input(file_id))
