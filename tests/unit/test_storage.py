"""The workers' PUTs and GETs are signed exactly as botocore signs them (the reference implementation of
SigV4), and a micro-batch's PUTs are retried and reported one by one."""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote, unquote

import pytest
import trustme
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from core.errors import ConfigError
from core.settings import Settings
from core.storage import ObjectClient, ObjectError, Storage


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:8333", "https://s3.example.test", "http://s3.example.test:80/"])
@pytest.mark.parametrize("key", ["outputs/acme/bat_1/job_2.png", "outputs/a tenant/été+1=~x/job.webp"])
@pytest.mark.parametrize(("method", "data", "content_type"), [("PUT", b"\x89PNG payload", "image/png"),
                                                              ("GET", b"", None)])
def test_the_signature_is_botocores(endpoint: str, key: str, method: str, data: bytes,
                                    content_type: str | None) -> None:
    client = ObjectClient(endpoint, "eu-west-3", "AKIDEXAMPLE", "secret/with+chars", connections=1, attempts=1)
    path = quote(f"/bucket/{key}", safe="/~")
    digest = client.headers(method, path, data, content_type)["x-amz-content-sha256"]
    reference = AWSRequest(method, f"{endpoint.rstrip('/')}{path}", data=data, headers={
        **({"Content-Type": content_type} if content_type else {}), "X-Amz-Content-SHA256": digest})
    S3SigV4Auth(Credentials("AKIDEXAMPLE", "secret/with+chars"), "s3", "eu-west-3").add_auth(reference)
    signed_at = datetime.strptime(reference.headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)

    ours = client.headers(method, path, data, content_type, now=signed_at)

    assert ours["authorization"] == reference.headers["Authorization"]
    assert ours["x-amz-date"] == reference.headers["X-Amz-Date"]


def test_another_day_another_signing_key() -> None:
    client = ObjectClient("http://127.0.0.1:8333", "us-east-1", "AKIDEXAMPLE", "secret", connections=1, attempts=1)
    monday = client.headers("PUT", "/b/k", b"x", "image/png", now=datetime(2026, 12, 7, 23, 59, tzinfo=UTC))
    tuesday = client.headers("PUT", "/b/k", b"x", "image/png", now=datetime(2026, 12, 8, 0, 1, tzinfo=UTC))
    assert "20261207/us-east-1/s3" in monday["authorization"]
    assert "20261208/us-east-1/s3" in tuesday["authorization"]


class _Recorder(ThreadingHTTPServer):
    """A loopback S3 stand-in for what SeaweedFS cannot be made to do on demand: fail, or answer
    slowly. `reply(key, attempt)` gives the status and the seconds before it; every request is
    recorded, and the most in progress at once counted."""

    def __init__(self, reply: Callable[[str, int], tuple[int, float]], tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[tuple[str, Any, bytes]] = []
        self.deleted: list[str] = []
        self.answered: list[str] = []
        self.most_at_once = self._at_once = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # kept-alive connections, as S3 services keep them

            def do_PUT(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                key = unquote(self.path.removeprefix("/bucket/"))
                with server.lock:
                    server.requests.append((key, self.headers, body))
                    attempt = sum(k == key for k, _, _ in server.requests)
                    server._at_once += 1
                    server.most_at_once = max(server.most_at_once, server._at_once)
                status, delay = reply(key, attempt)
                time.sleep(delay)
                with server.lock:
                    server._at_once -= 1
                    server.answered.append(key)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_DELETE(self) -> None:
                server.deleted.append(unquote(self.path.removeprefix("/bucket/")))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        if tls is not None:  # handshakes as each connection is accepted
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.server_address[1]}"
        self.daemon_threads = True
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def client(self, attempts: int, ca_bundle: str | None = None) -> ObjectClient:
        return ObjectClient(self.url, "us-east-1", "AKIDEXAMPLE", "secret", connections=1, attempts=attempts,
                            ca_bundle=ca_bundle)


@contextlib.contextmanager
def recorder(reply: Callable[[str, int], tuple[int, float]], tls: ssl.SSLContext | None = None) -> Iterator[_Recorder]:
    server = _Recorder(reply, tls)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def flaky() -> Iterator[_Recorder]:
    """Each key's first two PUTs get a 503."""
    with recorder(lambda key, attempt: (503 if attempt <= 2 else 200, 0.0)) as server:
        yield server


def test_put_many_sends_signed_puts_and_retries_each_5xx(flaky: _Recorder) -> None:
    objects = [(f"outputs/t/b/job {i}.png", f"image {i}".encode(), "image/png") for i in range(12)]
    objects.append(("outputs/t/b/large.png", bytes(2 * 1024 * 1024), "image/png"))  # libcurl's Expect threshold: 1 MiB
    stored: dict[str, float] = {}
    flaky.client(attempts=3).put_many("bucket", objects, 4, lambda key, seconds: stored.setdefault(key, seconds))

    assert sorted(stored) == sorted(key for key, _, _ in objects)
    assert len(flaky.requests) == 3 * len(objects)  # two 503s, then stored
    sent = {key: data for key, data, _ in objects}
    for key, headers, body in flaky.requests:
        assert body == sent[key]
        assert headers["x-amz-content-sha256"] == hashlib.sha256(body).hexdigest()
        assert headers["Content-Type"] == "image/png"
        assert headers["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
        assert "Expect" not in headers  # no 100-continue round trip


def test_put_many_keeps_at_once_transfers_going() -> None:
    with recorder(lambda key, attempt: (200, 0.2)) as server:
        server.client(attempts=1).put_many("bucket", [(f"outputs/{i}.png", b"x", "image/png") for i in range(12)], 4)
    assert len(server.answered) == 12
    assert server.most_at_once == 4


def test_an_object_still_being_made_does_not_hold_up_those_ready() -> None:
    later: Future[tuple[str, bytes, str]] = Future()
    seen_before_later: list[bool] = []
    with recorder(lambda key, attempt: (200, 0.0)) as server:
        threading.Timer(0.5, later.set_result, [("outputs/later.png", b"later", "image/png")]).start()
        server.client(attempts=1).put_many(
            "bucket", [("outputs/first.png", b"first", "image/png"), later], 4,
            lambda key, _: seen_before_later.append(later.done()) if key == "outputs/first.png" else None)
    assert seen_before_later == [False]  # stored while the other was still in the making
    assert server.answered == ["outputs/first.png", "outputs/later.png"]


def test_put_many_names_the_key_once_its_attempts_are_spent(flaky: _Recorder) -> None:
    with pytest.raises(ObjectError, match=r"PUT 'outputs/x.png' to 127\.0\.0\.1:\d+: HTTP 503"):
        flaky.client(attempts=2).put_many("bucket", [("outputs/x.png", b"x", "image/png")], 4)
    assert len(flaky.requests) == 2


def test_a_refusal_drops_what_is_in_flight_and_starts_nothing_more() -> None:
    def reply(key: str, attempt: int) -> tuple[int, float]:
        return (403, 0.0) if key == "outputs/refused.png" else (200, 1.0)

    objects = [("outputs/slow-1.png", b"1", "image/png"), ("outputs/refused.png", b"r", "image/png"),
               *[(f"outputs/never-{i}.png", b"n", "image/png") for i in range(5)]]
    with recorder(reply) as server:
        with pytest.raises(ObjectError, match=r"PUT 'outputs/refused.png' to .*HTTP 403"):
            server.client(attempts=3).put_many("bucket", objects, 2)
        assert "outputs/slow-1.png" not in server.answered  # not waited for
        # The two sent at once, in whichever order they arrived, and none of the rest.
        assert sorted(key for key, _, _ in server.requests) == ["outputs/refused.png", "outputs/slow-1.png"]


def test_a_retry_waiting_for_a_free_slot_does_not_spin() -> None:
    """One 503 while both slots hold slow transfers: its retry is due long before a slot frees."""
    def reply(key: str, attempt: int) -> tuple[int, float]:
        return (503, 0.0) if key == "outputs/retried.png" and attempt == 1 else (200, 1.0 if "slow" in key else 0.0)

    objects = [("outputs/retried.png", b"r", "image/png"), ("outputs/slow-1.png", b"1", "image/png"),
               ("outputs/slow-2.png", b"2", "image/png")]
    with recorder(reply) as server:
        cpu = time.thread_time()
        server.client(attempts=3).put_many("bucket", objects, 2)
        spent = time.thread_time() - cpu
    assert sorted(server.answered) == sorted(["outputs/retried.png"] * 2 + ["outputs/slow-1.png", "outputs/slow-2.png"])
    assert spent < 0.25  # of the second the slow transfers took


def test_put_many_names_the_key_when_nothing_listens() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    client = ObjectClient(f"http://127.0.0.1:{port}", "us-east-1", "AKIDEXAMPLE", "secret", connections=1, attempts=2)
    with pytest.raises(ObjectError, match=rf"PUT 'outputs/y.png' to 127\.0\.0\.1:{port}: .*onnect"):
        client.put_many("bucket", [("outputs/y.png", b"y", "image/png")], 4)


def test_an_object_that_cannot_be_made_stops_put_many_and_the_next_call_starts_clean(flaky: _Recorder) -> None:
    client = flaky.client(attempts=3)
    broken: Future[tuple[str, bytes, str]] = Future()
    broken.set_exception(ValueError("encoding failed"))

    with pytest.raises(ValueError, match="encoding failed"):
        client.put_many("bucket", [("outputs/a.png", b"a", "image/png"), broken], 4)
    stored: list[str] = []
    client.put_many("bucket", [("outputs/b.png", b"b", "image/png")], 4, lambda key, _: stored.append(key))
    assert stored == ["outputs/b.png"]


def test_put_many_waits_without_spinning_past_descriptor_1023() -> None:
    """A long-lived worker can hold many files and sockets; select(2) cannot watch a descriptor past
    1023, and a loop on it would spin through a slow reply instead of waiting."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the hard limit on open files is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        with recorder(lambda key, attempt: (200, 0.5)) as slow:
            stored: list[str] = []
            cpu = time.thread_time()
            slow.client(attempts=1).put_many("bucket", [("outputs/c.png", b"c", "image/png")], 4,
                                             lambda key, _: stored.append(key))
            assert stored == ["outputs/c.png"]
            assert time.thread_time() - cpu < 0.25  # of the half second the reply took
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_put_many_goes_straight_to_the_endpoint_whatever_http_proxy_says(
        flaky: _Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    with recorder(lambda key, attempt: (200, 0.0)) as proxy:
        for name in ("http_proxy", "HTTPS_PROXY", "ALL_PROXY"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{proxy.server_address[1]}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        flaky.client(attempts=3).put_many("bucket", [("outputs/d.png", b"d", "image/png")], 4)
        assert proxy.requests == []
        assert len(flaky.requests) == 3  # two 503s, then stored


@pytest.fixture
def private_ca(tmp_path: Any) -> Iterator[tuple[_Recorder, str]]:
    """An S3 stand-in over https whose certificate a private CA signed, and that CA's PEM file."""
    ca = trustme.CA()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(tls)
    bundle = tmp_path / "private-ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    with recorder(lambda key, attempt: (200, 0.0), tls) as server:
        yield server, str(bundle)


def test_https_behind_a_private_ca_takes_its_bundle_and_refuses_without_it(private_ca: tuple[_Recorder, str]) -> None:
    server, bundle = private_ca
    trusting = server.client(attempts=1, ca_bundle=bundle)
    trusting.put("bucket", "outputs/one.png", b"1", "image/png")
    trusting.put_many("bucket", [("outputs/two.png", b"2", "image/png")], 2)
    assert [key for key, _, _ in server.requests] == ["outputs/one.png", "outputs/two.png"]

    stranger = server.client(attempts=1)  # the system's store does not hold the private CA
    with pytest.raises(ObjectError, match=r"'outputs/three.png'.*(?i:certificate)"):
        stranger.put("bucket", "outputs/three.png", b"3", "image/png")
    with pytest.raises(ObjectError, match=r"'outputs/four.png'.*(?i:certificate)"):
        stranger.put_many("bucket", [("outputs/four.png", b"4", "image/png")], 2)
    assert len(server.requests) == 2


@pytest.mark.parametrize("where", ["STEP1X_S3_CA_BUNDLE", "AWS_CA_BUNDLE", "the system's store"])
def test_every_s3_client_of_the_service_trusts_the_same_cas(
        private_ca: tuple[_Recorder, str], where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Wherever the CA is configured, urllib3 (put), libcurl (put_many) and boto3 (delete) all trust
    it; left to itself, boto3 would read certifi's bundle and not the system's store."""
    server, bundle = private_ca
    for name in ("STEP1X_S3_CA_BUNDLE", "AWS_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)
    # SSL_CERT_FILE stands for a CA installed system-wide: Python's ssl, and so urllib3, reads it.
    monkeypatch.setenv("SSL_CERT_FILE" if where == "the system's store" else where, bundle)
    storage = Storage(Settings(s3_endpoint_url=server.url, s3_bucket="bucket"))
    storage.put("inputs/a.png", b"a", "image/png")
    storage.put_many([("outputs/b.png", b"b", "image/png")])
    storage.delete("outputs/b.png")
    assert [key for key, _, _ in server.requests] == ["inputs/a.png", "outputs/b.png"]
    assert server.deleted == ["outputs/b.png"]


def test_the_ca_bundle_setting_names_a_file(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    assert Settings(s3_ca_bundle="").s3_ca_bundle is None  # empty: unset, for every client alike
    with pytest.raises(ConfigError, match=r"STEP1X_S3_CA_BUNDLE.*no file at .*missing\.pem"):
        Settings(s3_ca_bundle=str(tmp_path / "missing.pem"))
