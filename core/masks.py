"""What a mask means, decided once for the API, the workers and in-process use.

A mask is read as its grey level composited over black: non-zero pixels are redrawn. An opaque
mask is its grey level; in a mask with transparency, transparent pixels count as black, so a
white image whose region is drawn in the alpha channel (what image editors export) masks exactly
that region. The fraction of redrawn pixels (coverage) is measured at upload, so submit can
refuse empty and full masks without reading the image back from storage.
"""

from __future__ import annotations

from PIL import Image, ImageChops


def as_mask(image: Image.Image) -> Image.Image:
    """The mode "L" mask of any image (non-zero = redraw)."""
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if not has_alpha:
        return image.convert("L")
    rgba = image.convert("RGBA")
    return ImageChops.multiply(rgba.convert("L"), rgba.getchannel("A"))


def coverage(image: Image.Image) -> float:
    """Fraction of the pixels a mask made of `image` redraws: 0.0 is empty, 1.0 is everything."""
    mask = as_mask(image)
    total = mask.width * mask.height
    return 1.0 - mask.histogram()[0] / total if total else 0.0
