"""Input files: validated as images on the way in, content-addressed by sha256, stored once."""

from __future__ import annotations

import hashlib
import io

from PIL import Image, UnidentifiedImageError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.errors import InvalidImage, NotFound
from core.settings import Settings
from core.storage import Storage, input_key
from core.tables import File

FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


def inspect_image(data: bytes, settings: Settings, field: str = "file") -> tuple[str, int, int]:
    """(content type, width, height) of image bytes, or InvalidImage saying what is wrong."""
    if not data:
        raise InvalidImage("the upload is empty", field)
    if len(data) > settings.max_upload_bytes:
        raise InvalidImage(f"the upload is over the {settings.max_upload_bytes}-byte limit", field)
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, (width, height) = img.format or "", img.size
            img.verify()  # catches truncated and corrupt files, not only wrong headers
    except Image.DecompressionBombError:
        raise InvalidImage(f"the image declares more than {Image.MAX_IMAGE_PIXELS} pixels", field) from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise InvalidImage(f"not a readable PNG, JPEG or WebP image ({exc})", field) from None
    if fmt not in FORMATS:
        raise InvalidImage(f"{fmt or 'unknown'} images are not accepted: upload PNG, JPEG or WebP", field)
    if max(width, height) > settings.max_image_side:
        raise InvalidImage(f"{width}x{height} exceeds {settings.max_image_side} px per side", field)
    return FORMATS[fmt], width, height


def store_file(session: Session, storage: Storage, tenant: str, data: bytes, settings: Settings) -> File:
    """Store an upload once per tenant: uploading the same bytes again returns the same file."""
    content_type, width, height = inspect_image(data, settings)
    file_id = hashlib.sha256(data).hexdigest()
    existing = session.get(File, (tenant, file_id))
    if existing is not None:
        return existing
    key = input_key(tenant, file_id)
    # Upload before the row exists: a row never points at a missing object.
    storage.put(key, data, content_type)
    row = File(tenant_id=tenant, id=file_id, content_type=content_type, width=width, height=height,
               size_bytes=len(data), storage_key=key)
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
