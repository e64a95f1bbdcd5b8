"""Shared pieces of the integration tests: images, API clients per tenant."""

from __future__ import annotations

import io

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from api.app import create_app
from core.db import session_scope
from core.keys import create_key
from core.settings import Settings


def png(size: tuple[int, int] = (96, 64), seed: int = 0, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def mask_png(size: tuple[int, int] = (96, 64), empty: bool = False) -> bytes:
    mask = Image.new("L", size)
    if not empty:
        ImageDraw.Draw(mask).rectangle((size[0] // 3, size[1] // 3, size[0] // 2, size[1] // 2), fill=255)
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return buffer.getvalue()


def api_client(settings: Settings, tenant: str = "acme") -> TestClient:
    with session_scope(settings.database_url) as session:
        key = create_key(session, tenant)
    client = TestClient(create_app(settings, migrate=False))
    client.headers["Authorization"] = f"Bearer {key}"
    return client


def upload(client: TestClient, data: bytes) -> str:
    response = client.post("/v1/files", files={"file": ("x.png", data)})
    assert response.status_code == 201, response.text
    file_id: str = response.json()["id"]
    return file_id
