"""Dynamic resolution for inpainting: work on a crop around the mask, paste back at full size.

A 3000x3000 product photo with a small mask costs one native-size run: the mask's bounding box
plus `padding` of context is cut out, squared up, resized to the model's native size, inpainted,
resized back, and blended into the original through a feathered mask so no seam shows.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageFilter


@dataclass(frozen=True)
class Crop:
    box: tuple[int, int, int, int]  # left, top, right, bottom in the original image

    @property
    def size(self) -> tuple[int, int]:
        return self.box[2] - self.box[0], self.box[3] - self.box[1]


def crop_around_mask(mask: Image.Image, padding: int, min_side: int = 0) -> Crop:
    """The square box (when the image allows) holding the mask's bounding box plus padding."""
    width, height = mask.size
    bbox = mask.convert("L").getbbox()
    if bbox is None:
        raise ValueError("mask is empty")
    left, top, right, bottom = bbox
    side = max(right - left, bottom - top) + 2 * padding
    side = min(max(side, min_side), width, height)
    # Centre the square on the mask, then slide it back inside the image.
    cx, cy = (left + right) / 2, (top + bottom) / 2
    x0 = int(min(max(cx - side / 2, 0), width - side))
    y0 = int(min(max(cy - side / 2, 0), height - side))
    box_w = max(side, right - left)
    box_h = max(side, bottom - top)
    x0 = min(x0, left)
    y0 = min(y0, top)
    return Crop((x0, y0, min(width, x0 + box_w), min(height, y0 + box_h)))


def feathered(mask: Image.Image, radius: int) -> Image.Image:
    """A soft-edged copy of the mask: the blend weight for pasting a result back."""
    hard = mask.convert("L").point(lambda v: 255 if v else 0)
    if radius <= 0:
        return hard
    # Grow first so the feather lies outside the redrawn region, never eating into it.
    grown = hard.filter(ImageFilter.MaxFilter(2 * (radius // 2) + 1))
    return grown.filter(ImageFilter.GaussianBlur(radius / 2))


def paste_back(original: Image.Image, result: Image.Image, mask: Image.Image, crop: Crop,
               feather: int = 4) -> Image.Image:
    """Blend the inpainted crop into the original inside the (feathered) mask; outside it, keep the
    original's pixels exactly."""
    patch = result.convert("RGB").resize(crop.size, Image.Resampling.LANCZOS)
    out = original.convert("RGB").copy()
    weight = feathered(mask.crop(crop.box), feather)
    out.paste(patch, crop.box[:2], weight)
    return out
