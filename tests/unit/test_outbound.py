"""The guarded client's address rules and the Standard Webhooks signature: every URL checked is an
IP literal, never connected to; the client's deadline and encoding rules talk to raw peers this
module starts on 127.0.0.1."""

from __future__ import annotations

import contextlib
import gzip
import ipaddress
import socket
import threading
import time
from collections.abc import Callable

import pytest
from standardwebhooks import Webhook

from core import fetch, outbound
from core.outbound import Refused, check_url, why_not_public
from core.settings import Settings
from core.webhooks import new_secret, sign


@pytest.mark.parametrize(("address", "category"), [
    ("127.0.0.1", "loopback"), ("10.1.2.3", "private"), ("192.168.0.1", "private"), ("172.16.0.1", "private"),
    ("169.254.169.254", "link-local"), ("100.64.0.1", "carrier-grade NAT"), ("224.0.0.1", "multicast"),
    ("233.1.1.1", "multicast"), ("240.0.0.1", "reserved"), ("0.0.0.0", "unspecified"), ("::1", "loopback"),
    ("::ffff:8.8.8.8", "IPv4-mapped"), ("fd00::1", "unique local"), ("fe80::1", "link-local"),
    ("2002:a00:1::1", "6to4"), ("::", "unspecified"),
])
def test_non_public_addresses_are_named(address: str, category: str) -> None:
    assert category in (why_not_public(ipaddress.ip_address(address)) or "")


def test_public_addresses_pass() -> None:
    assert why_not_public(ipaddress.ip_address("8.8.8.8")) is None
    assert why_not_public(ipaddress.ip_address("2606:4700::1111")) is None


def test_allow_list_and_scheme_rules() -> None:
    dev = Settings(outbound_allow="127.0.0.1/32")
    assert check_url("http://127.0.0.1:8080/hook", dev).host == "127.0.0.1"
    with pytest.raises(Refused, match=r"127\.0\.0\.2 .*loopback") as refused:
        check_url("http://127.0.0.2:8080/hook", dev, "webhook")
    assert refused.value.errors[0].field == "webhook"
    prod = Settings(environment="production", s3_secret_key="real", session_secret="s" * 32,
                    outbound_allow="127.0.0.1/32")
    check_url("http://127.0.0.1/hook", prod)  # allow-listed: plain http is fine
    check_url("https://8.8.8.8/hook", prod)
    with pytest.raises(Refused, match="https"):
        check_url("http://8.8.8.8/hook", prod)
    for bad in ("ftp://8.8.8.8/", "https://user:pw@8.8.8.8/", "not a url", "https:///nohost"):
        with pytest.raises(Refused):
            check_url(bad, prod)


def test_signatures_verify_with_the_standardwebhooks_library() -> None:
    old, new = new_secret(), new_secret()
    body, now = b'{"type":"job.succeeded"}', int(time.time())
    header = f"{sign(new, 'msg_1', now, body)} {sign(old, 'msg_1', now, body)}"
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(now), "webhook-signature": header}
    for secret in (old, new):
        assert Webhook(secret).verify(body, headers) == {"type": "job.succeeded"}
    with pytest.raises(Exception, match="signature"):
        Webhook(new_secret()).verify(body, headers)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/a\x01b.png", "https://8.8.8.8/a\r\nX-Injected: 1",
                                 "http://8.8.8.8\x00.example/", "https://8.8.8.8/\x7f"])
def test_control_characters_are_refused_naming_the_field(url: str) -> None:
    # httpx refuses to send such a URL; accepted, it would fail at every attempt, never as a clear error.
    with pytest.raises(Refused, match="control character") as refused:
        check_url(url, Settings(outbound_allow="127.0.0.1/32"), "image")
    assert refused.value.errors[0].field == "image"


def test_spaces_and_other_characters_httpx_percent_encodes_are_accepted() -> None:
    for url in ("http://127.0.0.1/my photo.png", "http://127.0.0.1/caf\u00e9\u00a0menu.png"):
        assert check_url(url, Settings(outbound_allow="127.0.0.1/32")).host == "127.0.0.1"


class _Peer:
    """A raw HTTP peer on loopback that answers every connection with `talk(socket)`."""

    def __init__(self, talk: Callable[[socket.socket], None]) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.requests: list[bytes] = []
        self.talk = talk
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                self.requests.append(conn.recv(65536))
                with contextlib.suppress(OSError):
                    self.talk(conn)

    def close(self) -> None:
        self.server.close()


def _trickle(conn: socket.socket) -> None:
    """Headers one byte at a time, each well inside a 1 s read timeout, for about 20 s."""
    for byte in b"HTTP/1.1 200 OK\r\n" + b"x-padding: " + b"a" * 100:
        conn.sendall(bytes([byte]))
        time.sleep(0.2)


def _empty_encoding(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-encoding: \r\ncontent-length: 5\r\n\r\nhello")


def _gzip_bomb(conn: socket.socket) -> None:
    body = gzip.compress(gzip.compress(b"\0" * (64 << 20)))  # 64 MiB of zeros in a few hundred bytes
    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip, gzip\r\ncontent-length: %d\r\n\r\n" % len(body) + body)


def test_an_exchange_ends_at_the_client_timeout_in_all_however_slowly_the_peer_talks() -> None:
    settings = Settings(outbound_allow="127.0.0.1/32", fetch_timeout=1)
    peer = _Peer(_trickle)
    try:
        started = time.monotonic()
        with outbound.client(settings, settings.fetch_timeout) as http, \
                pytest.raises(fetch.Transient, match="timed out"):
            fetch.download(http, f"{peer.url}/photo.png", settings)
        assert time.monotonic() - started < 10  # the peer would have gone on for 20 s
    finally:
        peer.close()


def test_bodies_are_asked_for_uncompressed_and_a_compressed_one_is_refused_unread() -> None:
    settings = Settings(outbound_allow="127.0.0.1/32", fetch_timeout=5, max_upload_bytes=1 << 20)
    peer = _Peer(_gzip_bomb)
    try:
        with outbound.client(settings, settings.fetch_timeout) as http, \
                pytest.raises(fetch.Permanent, match="sent compressed"):
            fetch.download(http, f"{peer.url}/photo.png", settings)
        assert b"\r\naccept-encoding: identity\r\n" in peer.requests[0].lower()
    finally:
        peer.close()


def test_an_empty_content_encoding_is_no_encoding() -> None:
    settings = Settings(outbound_allow="127.0.0.1/32", fetch_timeout=5)
    peer = _Peer(_empty_encoding)
    try:
        with outbound.client(settings, settings.fetch_timeout) as http:
            assert fetch.download(http, f"{peer.url}/photo.png", settings) == b"hello"
    finally:
        peer.close()


def test_a_url_the_client_cannot_send_fails_as_that_urls_own_failure() -> None:
    # A URL stored before the checks above would make httpx raise InvalidURL, which is no HTTPError:
    # it must fail its download, not escape and stop every other download of the pass.
    settings = Settings(outbound_allow="127.0.0.1/32", fetch_timeout=1)
    with outbound.client(settings, 1) as http, pytest.raises(fetch.Permanent, match="InvalidURL"):
        fetch.download(http, "http://127.0.0.1:9/a\x01b.png", settings)


def test_a_catalog_of_urls_on_one_host_looks_the_host_up_once(monkeypatch: pytest.MonkeyPatch) -> None:
    lookups: list[str] = []
    real = socket.getaddrinfo

    def counted(host: str, *args: object, **kwargs: object) -> object:
        lookups.append(host)
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", counted)
    settings = Settings(outbound_allow="127.0.0.0/8,::1/128")
    for i in range(500):
        check_url(f"http://localhost:8080/p/{i}.png", settings)  # /etc/hosts: no DNS query leaves
    assert lookups == ["localhost"]
    with pytest.raises(Refused, match="loopback"):  # the allow list is applied afresh
        check_url("http://localhost:8080/p/1.png", Settings(outbound_allow="10.0.0.0/8"))


def test_a_failed_lookup_is_not_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    real, failures = socket.getaddrinfo, [socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")]

    def flaky(host: str, *args: object, **kwargs: object) -> object:
        if failures:
            raise failures.pop()
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", flaky)
    settings = Settings(outbound_allow="127.0.0.0/8,::1/128")
    with pytest.raises(Refused, match="cannot resolve"):
        check_url("http://localhost:8081/a.png", settings)
    assert check_url("http://localhost:8081/a.png", settings).host == "localhost"  # the blip is over
