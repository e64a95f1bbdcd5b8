"""Batch terms, output names, per-device defaults, and the first-run checks of the command line."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from core.catalog import BatchTerms, parse_duration
from core.errors import InvalidInput
from core.settings import CPU_DEFAULT_MODELS, DEFAULT_MODELS, Settings, get_settings
from step1x.cli import app
from step1x.client import Client


@pytest.mark.parametrize(("value", "seconds"), [(3600, 3600), ("3600", 3600), ("90m", 5400), ("24h", 86400),
                                                 (" 7d ", 604800)])
def test_durations_read_seconds_or_units(value, seconds):
    assert parse_duration(value, "output_ttl") == seconds


def test_terms_default_from_settings(tmp_path):
    terms = BatchTerms.parse(Settings(data_dir=tmp_path, completion_window=7200), output_ttl="2d")
    assert (terms.completion_window, terms.output_ttl) == (7200, 172800)
    with pytest.raises(InvalidInput, match="completion_window: 59s is out of range: from 1m to 30d"):
        BatchTerms.parse(Settings(data_dir=tmp_path), completion_window=59)


def test_the_default_upscaler_follows_the_device_kind(tmp_path):
    assert Settings(data_dir=tmp_path, compute="cpu").default_models["upscale"] == CPU_DEFAULT_MODELS["upscale"]
    assert Settings(data_dir=tmp_path, compute="cuda").default_models["upscale"] == DEFAULT_MODELS["upscale"]
    chosen = Settings(data_dir=tmp_path, compute="cpu", default_models={"upscale": "lanczos-x4"})
    assert chosen.default_models == {**DEFAULT_MODELS, "upscale": "lanczos-x4"}  # the rest stay


def test_state_lives_in_the_per_user_data_folder_whatever_the_working_directory(tmp_path, monkeypatch):
    for name in ("STEP1X_DATA_DIR", "STEP1X_MODELS_DIR", "STEP1X_API_KEY", "STEP1X_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    (tmp_path / "xdg" / "step1x").mkdir(parents=True)
    (tmp_path / "xdg" / "step1x" / "dev-key").write_text("sk-dev\n")
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    get_settings.cache_clear()
    try:
        settings = get_settings()
        assert settings.data_dir == tmp_path / "xdg" / "step1x"
        # Step1XMedium and the workers read weights from here, wherever they were started.
        assert Path(settings.models["waifu2x-x4"].weights or "").parent == tmp_path / "xdg" / "step1x" / "models"
        result = CliRunner().invoke(app, ["keys", "dev"])
        assert (result.exit_code, result.output) == (0, "sk-dev\n")
        assert Client().http.headers["Authorization"] == "Bearer sk-dev"
        monkeypatch.setenv("STEP1X_DATA_DIR", "relative")  # taken at start, absolute from then on
        get_settings.cache_clear()
        assert get_settings().data_dir == elsewhere / "relative"
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize("command", ["up", "demo"])
def test_a_busy_port_fails_at_once_saying_which_and_how_to_choose_another(command):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        started = time.monotonic()
        result = CliRunner().invoke(app, [command, "--port", str(port)])
        elapsed = time.monotonic() - started
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert f"port {port} on 127.0.0.1 is already in use" in text and "--port" in text and "PORT=" in text
    assert elapsed < 10  # nothing was started or fetched before the check (not a speed figure)


def test_submit_names_every_missing_file_by_custom_id_or_line(tmp_path):
    (tmp_path / "here.png").write_bytes(b"x")
    manifest = tmp_path / "catalog.jsonl"
    lines = ['# a comment', '{"custom_id": "a", "kind": "upscale", "image": "gone.png"}', '',
             '{"kind": "inpaint", "mode": "fill", "image": "here.png", "mask": "masks/none.png"}',
             '{"custom_id": "c", "kind": "upscale", "image": "here.png"}']
    manifest.write_text("\n".join(lines) + "\n")
    with Client("http://127.0.0.1:9", "unused") as client, pytest.raises(InvalidInput) as caught:
        client.submit_manifest(manifest)  # refused before anything is uploaded (nothing listens on :9)
    assert [(e.item, e.field) for e in caught.value.errors] == [("a", "image"), ("line 4", "mask")]
    assert json.loads(lines[1])["image"] in caught.value.errors[0].message


def test_on_progress_fires_only_when_the_batch_changed():
    """The client's own polling logic, against canned answers (the API itself is tested elsewhere)."""
    import httpx

    states = [("queued", 0, 0.0), ("queued", 0, 0.0), ("running", 1, 0.5), ("running", 1, 0.5), ("completed", 2, 1.0)]
    answers = iter(states)

    def answer(_: httpx.Request) -> httpx.Response:
        status, done, progress = next(answers)
        return httpx.Response(200, json={"status": status, "counts": {"succeeded": done}, "progress": progress})

    seen: list[str] = []
    with Client("http://api", "key", transport=httpx.MockTransport(answer)) as client:
        client.wait_batch("bat_1", on_progress=lambda b: seen.append(b["status"]), poll=0)
    assert seen == ["queued", "running", "completed"]
