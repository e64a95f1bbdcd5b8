"""Output image formats: how an output is encoded, what it is served as, what a download is named.

PNG is lossless and the default; JPEG and WebP take a `quality`. JPEG has no alpha channel, and the
engines draw RGB, so transparency in an input is flattened onto the item's `background` colour
before any model sees it.
"""

from __future__ import annotations

import io
from typing import Literal

from PIL import Image, ImageColor

OutputFormat = Literal["png", "jpeg", "webp"]
CONTENT_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
EXTENSIONS: dict[str, str] = {"png": "png", "jpeg": "jpg", "webp": "webp"}
EXTENSION_OF_TYPE = {CONTENT_TYPES[f]: EXTENSIONS[f] for f in CONTENT_TYPES}
# zlib's level 4 against Pillow's default 6, on sample photos upscaled to 2048 px: 2.5-2.8 times
# faster for 3-5% more bytes in two runs of `python -m bench.encode`; a worker encodes every output it makes.
PNG_LEVEL = 4


def encode(image: Image.Image, output_format: str = "png", quality: int | None = None,
           png_level: int = PNG_LEVEL) -> bytes:
    """`png_level`: zlib's compression level for PNG (STEP1X_PNG_COMPRESS_LEVEL)."""
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG", compress_level=png_level)
    elif output_format == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=quality or 90, optimize=True)
    else:
        image.save(buffer, format="WEBP", quality=quality or 90, method=4)
    return buffer.getvalue()


def flatten(image: Image.Image, background: str = "#ffffff") -> Image.Image:
    """RGB, with any transparency composited onto `background` (a CSS colour like "#ffffff")."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, ImageColor.getrgb(background))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")
