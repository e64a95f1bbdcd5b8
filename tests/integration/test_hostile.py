"""Hostile and sloppy input, as a table: each case gets a clear 4xx naming the field (and the item),
never a 500, and nothing of it is stored. Then the kin that must be accepted and read right (CMYK,
alpha masks, NUL and unicode in free text), the limits on bodies while they stream, and the
throttle on failed API keys."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select

from api.app import create_app
from core.db import session_scope
from core.settings import Settings
from core.storage import Storage
from core.tables import Batch, File, IdempotencyKey, Job
from models.profiles import Registry
from step1x.client import Client
from tests.integration.helpers import api_client, mask_png, png, upload
from workers.batch import MicroBatch

pytestmark = pytest.mark.integration

LIMIT = 256 * 1024  # every body limit, scaled down so the oversized cases stay small
SMALL = {"max_request_bytes": LIMIT, "max_upload_bytes": LIMIT, "max_manifest_bytes": LIMIT,
         "max_metadata_bytes": 1024}
ID = "0123456789abcdef" * 2


@dataclass
class Ctx:
    client: TestClient
    image: str
    mask: str
    empty: str
    full: str


def image_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def gen(**fields: Any) -> dict[str, Any]:
    return {"custom_id": "a", "kind": "generate", "prompt": "a mug", "width": 64, "height": 64, **fields}


def batch(*items: dict[str, Any], **extra: Any) -> Callable[[Ctx], httpx.Response]:
    return lambda c: c.client.post("/v1/batches", json={"items": list(items), **extra})


def raw_batch(text: str) -> Callable[[Ctx], httpx.Response]:
    return lambda c: c.client.post("/v1/batches", content=text, headers={"Content-Type": "application/json"})


def manifest(text: str, metadata: str | None = None) -> Callable[[Ctx], httpx.Response]:
    params = {"metadata": metadata} if metadata is not None else {}
    return lambda c: c.client.post("/v1/batches/manifest", content=text.encode(), params=params,
                                   headers={"Content-Type": "application/x-ndjson"})


def file(data: bytes) -> Callable[[Ctx], httpx.Response]:
    return lambda c: c.client.post("/v1/files", files={"file": ("x.png", data)})


def inpaint(mode: str, mask: str, **fields: Any) -> Callable[[Ctx], httpx.Response]:
    return lambda c: batch({"custom_id": "a", "kind": "inpaint", "mode": mode, "image": c.image,
                            "mask": getattr(c, mask), **fields})(c)


def bomb() -> bytes:
    header = bytearray(image_bytes(Image.new("L", (1, 1))))
    header[16:24] = struct.pack(">II", 20000, 20000)  # IHDR claims 20000x20000 pixels
    return bytes(header)


GOOD = '{"custom_id": "a", "kind": "generate", "prompt": "x"}'
CASES: list[tuple[str, Callable[[Ctx], httpx.Response], int, set[tuple[str | None, str]]]] = [
    # nesting, size and numbers no database can hold, in every JSON a client sends
    ("metadata-nested-300", raw_batch(f'{{"items": [{GOOD}], "metadata": {{"x": {nested(300)}}}}}'),
     422, {(None, "body")}),
    ("item-nested-1000", raw_batch(f'{{"items": [{{"kind": "generate", "x": {nested(1000)}}}]}}'),
     422, {(None, "body")}),
    ("metadata-over-limit", batch(gen(), metadata={"x": "a" * 2000}), 422, {(None, "metadata")}),
    ("metadata-nan", raw_batch(f'{{"items": [{GOOD}], "metadata": {{"x": NaN}}}}'), 422, {(None, "body")}),
    ("metadata-infinity", raw_batch(f'{{"items": [{GOOD}], "metadata": {{"x": -Infinity}}}}'),
     422, {(None, "body")}),
    ("float-overflow", raw_batch('{"items": [{"custom_id": "a", "kind": "generate", "prompt": "x", '
                                 '"guidance_scale": 1e400}]}'), 422, {(None, "body")}),
    ("int-of-5000-digits", raw_batch('{"items": [{"custom_id": "a", "kind": "generate", "prompt": "x", '
                                     f'"seed": 1{"0" * 5000}}}]}}'), 422, {(None, "body")}),
    ("seed-out-of-range", batch(gen(seed=10**30)), 422, {("a", "seed")}),
    ("manifest-line-nested-1000", manifest(f'{nested(1000)}\n'), 422, {("line 1", "item")}),
    ("manifest-line-nan", manifest('{"custom_id": "a", "kind": "generate", "prompt": "x", "steps": NaN}\n'),
     422, {("line 1", "item")}),
    ("manifest-metadata-nested-1000", manifest(GOOD + "\n", "{\"x\": " + nested(1000) + "}"),
     422, {(None, "metadata")}),
    ("manifest-metadata-nan", manifest(GOOD + "\n", '{"x": NaN}'), 422, {(None, "metadata")}),
    ("manifest-metadata-over-limit", manifest(GOOD + "\n", json.dumps({"x": "a" * 2000})),
     422, {(None, "metadata")}),
    # bodies over their limit, refused by Content-Length
    ("json-body-over-limit", batch(gen(negative_prompt="x" * (LIMIT + 1))), 413, {(None, "body")}),
    ("manifest-over-limit", manifest(GOOD + "\n" + "#" * (LIMIT + 1) + "\n"), 413, {(None, "body")}),
    ("upload-over-limit", file(b"\x89PNG" + bytes(LIMIT + 1)), 413, {(None, "file")}),
    ("upload-body-over-limit", file(b"\x89PNG" + bytes(2 * LIMIT)), 413, {(None, "body")}),
    # NUL bytes where PostgreSQL refuses them
    ("nul-in-custom-id", batch(gen(custom_id="a\x00b")), 422, {("a\x00b", "custom_id")}),
    ("newline-in-custom-id", batch(gen(custom_id="a\nb")), 422, {("a\nb", "custom_id")}),
    ("nul-in-job-id", lambda c: c.client.get("/v1/jobs/job_%00"), 404, {(None, "path")}),
    ("nul-in-batch-id", lambda c: c.client.post("/v1/batches/bat_%00x/cancel"), 404, {(None, "path")}),
    ("nul-in-file-id", lambda c: c.client.get("/v1/files/%00"), 404, {(None, "path")}),
    ("nul-in-cursor", lambda c: c.client.get(f"/v1/batches/bat_{ID}/jobs", params={"cursor": "job_\x00"}),
     422, {(None, "cursor")}),
    # strict types
    ("steps-true", batch(gen(steps=True)), 422, {("a", "steps")}),
    ("guidance-false", batch(gen(guidance_scale=False)), 422, {("a", "guidance_scale")}),
    ("width-as-string", batch(gen(width="512")), 422, {("a", "width")}),
    ("cache-as-int", batch(gen(cache=1)), 422, {("a", "cache")}),
    # what a worker would refuse, refused at submit
    ("blank-prompt", batch(gen(prompt=" \t ")), 422, {("a", "prompt")}),
    ("blank-text-prompt", inpaint("text", "mask", prompt="   "), 422, {("a", "prompt")}),
    ("empty-mask", inpaint("fill", "empty"), 422, {("a", "mask")}),
    ("full-mask-fill", inpaint("fill", "full"), 422, {("a", "mask")}),
    ("fill-model-in-text-mode", inpaint("text", "mask", prompt="a hat", model="classical-fill"),
     422, {("a", "model")}),
    ("weights-not-installed", lambda c: batch({"custom_id": "a", "kind": "upscale", "image": c.image})(c),
     422, {("a", "model")}),
    # the error shape: every error listed, JSON errors located, no Python reprs
    ("duplicate-beside-other-errors", batch(gen(), gen(steps=0)), 422, {("a", "custom_id"), ("a", "steps")}),
    ("no-items", batch(), 422, {(None, "items")}),
    ("item-not-an-object", raw_batch(f'{{"items": [{GOOD}, 7]}}'), 422, {("#1", "item")}),
    ("manifest-custom-id-a-number", manifest('{"custom_id": 5, "kind": "generate", "prompt": "x"}\n'),
     422, {("line 1", "custom_id")}),
    ("malformed-json", raw_batch('{"items": [1,]}'), 422, {(None, "body")}),
    ("not-utf8-json", lambda c: c.client.post("/v1/batches", content=b'{"items": ["\xff"]}',
                                              headers={"Content-Type": "application/json"}), 422, {(None, "body")}),
    ("truncated-multipart", lambda c: c.client.post(
        "/v1/files", content=b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nabc',
        headers={"Content-Type": "multipart/form-data; boundary=xyz"}), 422, {(None, "file")}),
    ("multipart-without-boundary", lambda c: c.client.post(
        "/v1/files", content=b"--xyz\r\n", headers={"Content-Type": "multipart/form-data"}), 400, {(None, "body")}),
    # uploads that are not usable images
    ("not-an-image", file(b"hello, I am text"), 422, {(None, "file")}),
    ("empty-upload", file(b""), 422, {(None, "file")}),
    ("truncated-png", lambda c: file(png((64, 64))[:300])(c), 422, {(None, "file")}),
    ("decompression-bomb", lambda c: file(bomb())(c), 422, {(None, "file")}),
    ("16-bit-png", lambda c: file(image_bytes(Image.fromarray(np.full((8, 8), 4000, np.uint16))))(c),
     422, {(None, "file")}),
    ("gif", lambda c: file(image_bytes(Image.new("P", (8, 8)), "GIF"))(c), 422, {(None, "file")}),
    # digits str.isdigit() takes and int() does not, or not at that length
    ("window-superscript-two", batch(gen(), completion_window="²"), 422, {(None, "completion_window")}),
    ("window-arabic-indic-digits", batch(gen(), output_ttl="٣٦٠٠"), 422, {(None, "output_ttl")}),
    ("window-of-5000-digits", batch(gen(), completion_window="9" * 5000), 422, {(None, "completion_window")}),
    ("manifest-window-superscript", lambda c: c.client.post(
        "/v1/batches/manifest", content=GOOD.encode(), params={"completion_window": "²"},
        headers={"Content-Type": "application/x-ndjson"}), 422, {(None, "completion_window")}),
    # text UTF-8 cannot encode, quoted back in the error
    ("lone-surrogate-custom-id", raw_batch('{"items": [{"custom_id": "\\ud800", "kind": "generate", '
                                           '"prompt": "x"}]}'), 422, {("\ud800", "custom_id")}),
    ("lone-surrogate-in-metadata", raw_batch(f'{{"items": [{GOOD}], "metadata": {{"x": "\\ud800"}}}}'),
     422, {(None, "metadata")}),
    ("lone-surrogate-manifest-line", manifest('{"custom_id": "\\ud800", "kind": "generate", "prompt": "x"}\n'),
     422, {("\ud800", "custom_id")}),
    # dates that leave the calendar once converted to UTC
    ("created-from-before-year-1", lambda c: c.client.get(
        "/v1/batches", params={"created_from": "0001-01-01T00:00:00+14:00"}), 422, {(None, "created_from")}),
    ("created-to-after-year-9999", lambda c: c.client.get(
        "/v1/batches", params={"created_to": "9999-12-31T23:59:59-14:00"}), 422, {(None, "created_to")}),
    # every id in a path is shape-checked, on every route
    ("newline-after-a-well-shaped-job-id", lambda c: c.client.get(f"/v1/jobs/job_{ID}%0A"), 404, {(None, "path")}),
    ("nul-in-retried-batch-id", lambda c: c.client.post("/v1/batches/bat_%00/retry"), 404, {(None, "path")}),
    ("nul-in-deleted-batch-id", lambda c: c.client.delete("/v1/batches/bat_%00"), 404, {(None, "path")}),
    ("nul-in-webhook-id", lambda c: c.client.get("/v1/webhooks/whe_%00"), 404, {(None, "path")}),
    ("nul-in-delivery-id", lambda c: c.client.post(f"/v1/webhooks/whe_{ID}/deliveries/msg_%00/redeliver"),
     404, {(None, "path")}),
    # URLs httpx would refuse to send, refused when they arrive
    ("control-character-in-url-input", batch({"custom_id": "a", "kind": "upscale", "model": "lanczos-x4",
                                              "image": "http://127.0.0.1:9/a\x01b.png"}), 422, {("a", "image")}),
    ("line-break-in-webhook-url", lambda c: c.client.post(
        "/v1/webhooks", json={"url": "https://8.8.8.8/a\r\nX-Injected: 1"}), 422, {(None, "url")}),
]


def stored(settings: Settings) -> tuple[int, ...]:
    with session_scope(settings.database_url) as session:
        rows = tuple(int(session.scalar(select(func.count()).select_from(table)) or 0)
                     for table in (Job, Batch, File, IdempotencyKey))
    objects = Storage(settings).client.list_objects_v2(Bucket=settings.s3_bucket).get("KeyCount", 0)
    return (*rows, objects)


@pytest.fixture
def small(settings: Settings) -> Settings:
    return settings.model_copy(update=SMALL)


@pytest.fixture
def ctx(small: Settings) -> Ctx:
    client = api_client(small)
    full = image_bytes(Image.new("L", (64, 64), 255))
    return Ctx(client, upload(client, png((64, 64))), upload(client, mask_png((64, 64))),
               upload(client, mask_png((64, 64), empty=True)), upload(client, full))


def test_every_hostile_input_is_a_clear_4xx_and_stores_nothing(small: Settings, ctx: Ctx) -> None:
    before = stored(small)
    failures = []
    for name, send, status, expected in CASES:
        response = send(ctx)
        try:
            body = response.json()
            found = {(e["item"], e["field"]) for e in body["errors"]}
            messages = " ".join(e["message"] for e in body["errors"])
        except (ValueError, KeyError, TypeError):
            failures.append(f"{name}: {response.status_code} not in the error shape: {response.text[:200]}")
            continue
        if response.status_code != status or not expected <= found:
            failures.append(f"{name}: {response.status_code} {sorted(found, key=str)}, expected {status} "
                            f"{sorted(expected, key=str)}: {messages[:300]}")
        if "object at 0x" in messages or "Traceback" in messages or "sys." in messages:
            failures.append(f"{name}: a Python repr leaks into the message: {messages[:300]}")
        if stored(small) != before:
            failures.append(f"{name}: something was stored ({before} -> {stored(small)})")
            before = stored(small)
    assert not failures, "\n".join(failures)
    # the JSON error names the place in the body, not a character offset as a "field"
    message = raw_batch('{"items": [1,]}')(ctx).json()["errors"][0]["message"]
    assert "line 1, column 14" in message, message


def test_cmyk_photos_alpha_masks_nul_and_unicode_are_accepted_and_read_back(small: Settings, ctx: Ctx) -> None:
    cmyk = ctx.client.post("/v1/files", files={"file": ("c.jpg", image_bytes(
        Image.new("CMYK", (64, 64), (0, 255, 0, 0)), "JPEG"))})
    assert cmyk.status_code == 201 and cmyk.json()["content_type"] == "image/jpeg"
    # A phone's JPEG with a second picture after the first (MPF), which Pillow names MPO
    mpo = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(mpo, format="MPO", save_all=True, append_images=[Image.new("RGB", (8, 8))])
    described = ctx.client.post("/v1/files", files={"file": ("phone.jpg", mpo.getvalue())})
    assert described.status_code == 201 and described.json()["content_type"] == "image/jpeg", described.text
    alpha = Image.new("RGBA", (64, 64), (255, 255, 255, 0))
    alpha.paste((255, 255, 255, 255), (0, 0, 16, 16))  # the region is drawn in the alpha channel
    described = ctx.client.post("/v1/files", files={"file": ("m.png", image_bytes(alpha))}).json()
    assert described["mask_coverage"] == pytest.approx(16 * 16 / 64 / 64)
    text = "chaussure d'été 👟 \x00 \\ \""
    response = ctx.client.post("/v1/batches", json={"items": [gen(custom_id="été \"1\" \\ 👟", prompt=text)],
                                                    "metadata": {"note": text, "big": 2**70}})
    assert response.status_code == 202, response.text
    assert response.json()["metadata"] == {"note": text, "big": 2**70}
    page = ctx.client.get(f"/v1/batches/{response.json()['id']}/jobs").json()
    assert page["data"][0]["spec"]["prompt"] == text


def test_a_manifest_saved_by_a_windows_editor_is_read_like_any_other(small: Settings, ctx: Ctx) -> None:
    body = "\ufeff" + GOOD + "\r\n" + GOOD.replace('"a"', '"b"') + "\r\n"  # a byte-order mark and CRLF
    response = ctx.client.post("/v1/batches/manifest", content=body.encode(),
                               headers={"Content-Type": "application/x-ndjson"})
    assert response.status_code == 202, response.text
    assert response.json()["counts"]["queued"] == 2


def test_a_conflict_names_what_clashes(small: Settings, ctx: Ctx) -> None:
    running = ctx.client.post("/v1/batches", json={"items": [gen()]}).json()["id"]
    refused = ctx.client.delete(f"/v1/batches/{running}")
    assert refused.status_code == 409 and refused.json()["errors"][0]["field"] == "status", refused.text
    first = ctx.client.post("/v1/batches", json={"items": [gen()]}, headers={"Idempotency-Key": "k1"})
    assert first.status_code == 202
    clash = ctx.client.post("/v1/batches", json={"items": [gen(prompt="other")]}, headers={"Idempotency-Key": "k1"})
    assert clash.status_code == 409 and clash.json()["errors"][0]["field"] == "Idempotency-Key", clash.text


def test_odd_custom_ids_are_safe_in_download_urls_and_step1x_results_gets_them(
        small: Settings, live: tuple[str, int, str], tmp_path) -> None:
    settings = small
    host, port, key = live
    client = TestClient(create_app(settings, migrate=False), headers={"Authorization": key})
    image = upload(client, png((16, 16)))
    names = ['quote " and \\ back', "été/../👟", "a;b=c,d"]
    response = client.post("/v1/batches", json={"items": [
        {"custom_id": name, "kind": "upscale", "image": image, "model": "lanczos-x4"} for name in names]})
    assert response.status_code == 202, response.text
    batch_id = response.json()["id"]
    with session_scope(settings.database_url) as session:
        ids = list(session.scalars(select(Job.id).where(Job.batch_id == batch_id)))
    MicroBatch(settings, Storage(settings), Registry(settings).get, worker="test@host").run(ids)
    lines = [json.loads(line) for line in client.get(f"/v1/batches/{batch_id}/results").text.splitlines()]
    for line in lines:
        disposition = parse_qs(urlsplit(line["url"]).query)["response-content-disposition"][0]
        fallback = disposition.split('filename="', 1)[1].split('"', 1)[0]
        assert all(32 <= ord(ch) < 127 for ch in disposition) and "/" not in fallback and "\\" not in fallback
        exact = unquote(disposition.split("filename*=UTF-8''", 1)[1])
        assert exact == line["custom_id"].replace("/", "_").replace("\\", "_") + ".png"
    sdk = Client(f"http://{host}:{port}", key.split()[1])
    paths = sdk.download_results(batch_id, tmp_path / "out")
    sdk.close()
    assert len(paths) == 3 and all(path.stat().st_size > 0 for path in paths)


def test_failed_keys_are_throttled_per_address_across_api_processes(settings: Settings) -> None:
    throttled = settings.model_copy(update={"auth_failure_limit": 3, "auth_failure_window": 60})
    first = api_client(throttled)
    second = TestClient(create_app(throttled, migrate=False))  # another API process, the same Redis
    wrong = {"Authorization": "Bearer sk_wrong"}
    assert [first.get(f"/v1/jobs/job_{ID}", headers=wrong).status_code for _ in range(3)] == [401] * 3
    response = second.get(f"/v1/jobs/job_{ID}", headers=wrong)
    assert response.status_code == 429 and 0 < int(response.headers["Retry-After"]) <= 60
    assert response.json()["errors"][0]["field"] == "Authorization"
    assert first.get(f"/v1/jobs/job_{ID}").status_code == 404  # a valid key from the same address passes
    # The dashboard's login form checks keys too: it answers from the same count.
    login = second.post("/dashboard/login", data={"key": "sk_wrong"}, follow_redirects=False)
    assert login.status_code == 429 and 0 < int(login.headers["Retry-After"]) <= 60
    assert "too many failed API-key checks" in login.text


@pytest.fixture
def live(small: Settings) -> Iterator[tuple[str, int, str]]:
    """The app under uvicorn on a loopback port, for bodies a test client would buffer whole."""
    key = api_client(small).headers["Authorization"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(small, migrate=False), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield "127.0.0.1", port, key
    server.should_exit = True
    thread.join(10)


def _post_streaming(address: tuple[str, int], head: bytes, preamble: bytes, total: int) -> tuple[bytes, int]:
    """Send `head` and the body's `preamble`, then up to `total` body bytes in chunks until the server
    answers; (answer, bytes sent)."""
    sent = 0
    chunked = b"chunked" in head
    with socket.create_connection(address, timeout=30) as sock:
        sock.sendall(head + (b"%x\r\n%s\r\n" % (len(preamble), preamble) if chunked else preamble))
        chunk = b"%x\r\n%s\r\n" % (65536, bytes(65536)) if chunked else bytes(65536)
        sock.setblocking(False)
        answer = b""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and b"\r\n\r\n" not in answer:
            try:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
                continue
            except BlockingIOError:
                pass
            except ConnectionError:
                break
            if sent < total:
                try:
                    sent += sock.send(chunk)
                except BlockingIOError:
                    time.sleep(0.001)
                except (BrokenPipeError, ConnectionError):
                    break
            else:
                time.sleep(0.01)
        sock.settimeout(2)  # the rest of the answer (its body), if the server has not closed yet
        with contextlib.suppress(OSError):
            answer += sock.recv(65536)
    return answer, sent


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_1gb_upload_is_refused_without_reading_it(live: tuple[str, int, str], framing: str) -> None:
    host, port, key = live
    size = 1 << 30
    length = f"Content-Length: {size}" if framing == "content-length" else "Transfer-Encoding: chunked"
    head = (f"POST /v1/files HTTP/1.1\r\nHost: {host}\r\nAuthorization: {key}\r\n"
            f"Content-Type: multipart/form-data; boundary=xyz\r\n{length}\r\n\r\n").encode()
    preamble = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n\x89PNG'
    answer, sent = _post_streaming((host, port), head, preamble, size)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b'"field":"body"' in answer
    print(f"1 GiB upload ({framing}) refused after {sent} bytes sent (limit {LIMIT})")
    # refused after about the limit: what was sent is the limit plus socket buffers, not the gigabyte
    assert sent < 32 * LIMIT + 8 * 1024 * 1024, sent
