"""Input files: validated as images on the way in, content-addressed by sha256, stored once.

Each file's mask coverage is measured on the way in, so submit can check masks without reading them back."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.errors import InvalidImage, NotFound, TooLarge
from core.masks import coverage
from core.settings import Settings
from core.storage import Storage, input_key
from core.tables import File

FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


# Modes PIL converts to 8-bit RGB faithfully; 16-bit and float images would be clipped to white.
EIGHT_BIT_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "La", "RGBa"}


@dataclass(frozen=True)
class ImageInfo:
    content_type: str
    width: int
    height: int
    mask_coverage: float  # what a mask made of this image would redraw (see core.masks)


def inspect_image(data: bytes, settings: Settings, field: str = "file") -> ImageInfo:
    """What the image bytes are, or InvalidImage saying what is wrong. The pixels are decoded in full:
    a truncated file is caught here, not in a worker."""
    if not data:
        raise InvalidImage("the upload is empty", field)
    if len(data) > settings.max_upload_bytes:
        raise TooLarge(f"the upload is over the {settings.max_upload_bytes}-byte limit", field)
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, (width, height), mode = img.format or "", img.size, img.mode
            if fmt == "MPO":  # a JPEG with more pictures after it (phones, cameras): the first is the photo
                fmt = "JPEG"
            if fmt not in FORMATS:
                raise InvalidImage(f"{fmt or 'unknown'} images are not accepted: upload PNG, JPEG or WebP", field)
            if max(width, height) > settings.max_image_side:
                raise InvalidImage(f"{width}x{height} exceeds {settings.max_image_side} px per side", field)
            if mode not in EIGHT_BIT_MODES:
                raise InvalidImage(f"{mode} images (16-bit or floating point) are not accepted: "
                                   "save it with 8 bits per channel", field)
            img.load()
            mask_coverage = coverage(img)
    except Image.DecompressionBombError:
        raise InvalidImage(f"the image declares more than {Image.MAX_IMAGE_PIXELS} pixels", field) from None
    except UnidentifiedImageError:
        raise InvalidImage("not a readable PNG, JPEG or WebP image (the format is not recognised)",
                           field) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImage(f"not a readable PNG, JPEG or WebP image: {_reason(exc)}", field) from None
    return ImageInfo(FORMATS[fmt], width, height, mask_coverage)


def _reason(exc: Exception) -> str:
    # PIL's messages are short and say what broke ("image file is truncated"); keep them, never a repr.
    text = str(exc).split(" <", 1)[0].strip()
    return text or "the file is corrupt"


def store_file(session: Session, storage: Storage, tenant: str, data: bytes, settings: Settings) -> File:
    """Store an upload once per tenant: uploading the same bytes again returns the same file."""
    info = inspect_image(data, settings)
    file_id = hashlib.sha256(data).hexdigest()
    existing = session.get(File, (tenant, file_id))
    if existing is not None:
        return existing
    key = input_key(tenant, file_id)
    # Upload before the row exists: a row never points at a missing object.
    storage.put(key, data, info.content_type)
    row = File(tenant_id=tenant, id=file_id, content_type=info.content_type, width=info.width,
               height=info.height, size_bytes=len(data), storage_key=key, mask_coverage=info.mask_coverage)
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:  # the same bytes uploaded concurrently: the other request's row serves
        return get_file(session, tenant, file_id)
    return row


def get_file(session: Session, tenant: str, file_id: str) -> File:
    row = session.get(File, (tenant, file_id))
    if row is None:
        raise NotFound(f"file {file_id} not found")
    return row


def files_by_id(session: Session, tenant: str, ids: set[str]) -> dict[str, File]:
    found: dict[str, File] = {}
    ordered = sorted(ids)
    # Chunked so a 100,000-item catalog does not build one giant IN list.
    for start in range(0, len(ordered), 5000):
        chunk = ordered[start:start + 5000]
        rows = session.scalars(select(File).where(File.tenant_id == tenant, File.id.in_(chunk)))
        found.update({row.id: row for row in rows})
    return found
