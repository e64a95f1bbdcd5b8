"""Pieces of the dashboard that need no services: session signing, thumbnail keys, charts, settings."""

from __future__ import annotations

import io
import time

import pytest
from PIL import Image

from api.dashboard import session
from api.dashboard.charts import bar_chart
from core.errors import ConfigError
from core.settings import Settings
from core.thumbs import encode, input_thumb_key, thumb_key
from workers.telemetry import metrics_port


def test_a_session_cookie_is_signed_and_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    value, csrf = session.sign(b"secret-one", "key_1")
    assert session.unsign(b"secret-one", value) == {"k": "key_1", "c": csrf, "t": pytest.approx(time.time(), abs=5)}
    assert session.unsign(b"secret-two", value) is None
    body, mac = value.split(".")
    forged = session._b64(b'{"k": "key_admin", "c": "x", "t": 9999999999}')
    assert session.unsign(b"secret-one", f"{forged}.{mac}") is None
    assert session.unsign(b"secret-one", body) is None
    monkeypatch.setattr(time, "time", lambda: 10**10)
    assert session.unsign(b"secret-one", value) is None  # older than MAX_AGE


def test_production_refuses_a_missing_session_secret() -> None:
    with pytest.raises(ConfigError, match="STEP1X_SESSION_SECRET"):
        Settings(environment="production", s3_secret_key="s" * 40, session_secret="")
    Settings(environment="production", s3_secret_key="s" * 40, session_secret="x" * 32)


def test_thumbnails_sit_beside_their_images_and_are_small_webp() -> None:
    assert thumb_key("outputs/acme/bat_1/job_2.png") == "thumbs/acme/bat_1/job_2.webp"
    assert thumb_key("outputs/acme/single/job_2-1.png") == "thumbs/acme/single/job_2-1.webp"
    assert input_thumb_key("acme", "ab12") == "thumbs/acme/inputs/ab12.webp"
    thumb = Image.open(io.BytesIO(encode(Image.new("RGB", (1024, 512), "red"))))
    assert (thumb.format, thumb.size) == ("WEBP", (256, 128))


def test_each_worker_on_a_host_gets_its_own_metrics_port() -> None:
    assert metrics_port(9100, "3") == 9103
    assert metrics_port(9100, "") == metrics_port(9100, None) == 9100  # CPU worker, or a container's one GPU
    assert metrics_port(9100, "0,1") == 9100


def test_the_chart_escapes_its_labels() -> None:
    svg = bar_chart([1.0, 2.0], [0.0, 1.0], unit="<b>")
    assert "<b>" not in svg and "&lt;b&gt;" in svg
    assert svg.count('class="ok"') == 2 and svg.count('class="bad"') == 1
