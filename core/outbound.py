"""The one guarded HTTP client for everything this service fetches or calls (webhooks, URL inputs).

A URL is refused when its host resolves to any address that is not public: loopback, private,
link-local (169.254.0.0/16 holds the cloud metadata service), CGNAT, multicast, reserved,
unspecified, IPv4-mapped IPv6, 6to4, ULA. `STEP1X_OUTBOUND_ALLOW` lists CIDRs allowed anyway.
The check runs when a URL is submitted (`check_url`, no connection made) and again inside every
connection: the network backend resolves the host once, checks every address, and connects to the
checked one, so a DNS answer that changes between check and connect (rebinding) cannot slip past.
Redirects are never followed, and proxies from the environment are ignored (a proxy would connect
on our behalf, past the check).

Every connection also has an overall deadline, the client's timeout, from connect to the last byte:
httpx's timeouts bound each read, so a peer sending a byte at a time could otherwise hold a thread
for hours. Bodies are asked for uncompressed (`Accept-Encoding: identity`) and read raw: a few
hundred compressed bytes can inflate to gigabytes before any size check sees them.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

from core.errors import InvalidInput
from core.settings import Settings

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")
_ULA = ipaddress.ip_network("fc00::/7")


class Refused(InvalidInput):
    """A URL this service will not connect to; the message says why."""

    def __init__(self, reason: str, field: str = "url") -> None:
        self.reason = reason
        super().__init__(reason, field)


@lru_cache(maxsize=16)
def allowed_networks(spec: str) -> tuple[Network, ...]:
    try:
        return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in spec.split(",") if part.strip())
    except ValueError as exc:
        raise Refused(f"STEP1X_OUTBOUND_ALLOW is not a list of CIDRs: {exc}", "STEP1X_OUTBOUND_ALLOW") from None


def why_not_public(address: Address) -> str | None:
    """The category that makes an address off limits, or None for a public address."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return "an IPv4-mapped IPv6 address"
        if address in _SIX_TO_FOUR:
            return "a 6to4 address"
    checks = (("an unspecified", address.is_unspecified), ("a loopback", address.is_loopback),
              ("a link-local", address.is_link_local), ("a multicast", address.is_multicast),
              ("a carrier-grade NAT", address in _CGNAT), ("a unique local (ULA)", address in _ULA),
              ("a reserved", address.is_reserved), ("a private or special-purpose", address.is_private))
    for name, hit in checks:
        if hit:
            return f"{name} address"
    return None if address.is_global else "not a public address"


def is_allowed(address: Address, settings: Settings) -> bool:
    return any(address in net for net in allowed_networks(settings.outbound_allow))


def resolve(host: str, port: int) -> list[Address]:
    try:
        literal = ipaddress.ip_address(host.strip("[]"))
        return [literal]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise Refused(f"cannot resolve host {host!r} ({exc})") from None
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))


# Recent lookups of the check at submission, by host and port: a catalog names thousands of URLs on
# one host, and each lookup may be a DNS round trip. Only successful lookups are kept (a failed one
# may be a blip); the allow list is applied afresh each time, and every connection resolves anew.
_LOOKUPS: dict[tuple[str, int], tuple[float, list[Address]]] = {}
_LOOKUP_SECONDS, _LOOKUPS_KEPT = 60.0, 4096


def _submitted_host(host: str, port: int, settings: Settings) -> list[Address]:
    key, now = (host.lower(), port), time.monotonic()
    known = _LOOKUPS.get(key)
    if known is None or now - known[0] > _LOOKUP_SECONDS:
        known = (now, resolve(host, port))
        if len(_LOOKUPS) >= _LOOKUPS_KEPT:
            _LOOKUPS.clear()
        _LOOKUPS[key] = known
    return _allowed(host, known[1], settings)


def checked_addresses(host: str, port: int, settings: Settings) -> list[Address]:
    """Every address the host resolves to, if all are allowed; Refused naming the first that is not."""
    return _allowed(host, resolve(host, port), settings)


def _allowed(host: str, addresses: list[Address], settings: Settings) -> list[Address]:
    if not addresses:
        raise Refused(f"host {host!r} has no address")
    for address in addresses:
        if not is_allowed(address, settings) and (why := why_not_public(address)):
            raise Refused(f"{host} resolves to {address}, {why}: refused (STEP1X_OUTBOUND_ALLOW can allow it)")
    return addresses


@dataclass(frozen=True)
class Target:
    url: str
    host: str
    port: int


def check_url(url: str, settings: Settings, field: str = "url") -> Target:
    """Refuse a URL this service must not call; resolves the host but connects to nothing."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise Refused(f"not a valid URL ({exc})", field) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Refused("must be an http(s) URL with a host", field)
    if parts.username or parts.password:
        raise Refused("credentials in the URL are not allowed", field)
    if len(url) > 2000:
        raise Refused("URL longer than 2000 characters", field)
    # httpx refuses ASCII control characters (it percent-encodes spaces and any other character).
    if bad := next((c for c in url if c.isascii() and not c.isprintable()), None):
        raise Refused(f"contains the control character {bad!r} at position {url.index(bad)}: "
                      "percent-encode it", field)
    try:
        # The host as httpx will connect to it (IDNA 2008), which the check must be about.
        host = httpx.URL(url).raw_host.decode("ascii")
    except (httpx.InvalidURL, UnicodeError) as exc:
        raise Refused(f"not a valid URL ({exc})", field) from None
    try:
        addresses = _submitted_host(host, port, settings)
    except Refused as exc:
        raise Refused(exc.reason, field) from None
    plain_allowed = settings.environment != "production" or all(is_allowed(a, settings) for a in addresses)
    if parts.scheme == "http" and not plain_allowed:
        raise Refused("must be https (plain http only to addresses in STEP1X_OUTBOUND_ALLOW)", field)
    return Target(url, host, port)


class _DeadlineStream(httpcore.NetworkStream):
    """A connection that ends at its deadline: each read and write waits at most what is left."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: float, budget: float) -> None:
        self.inner, self.deadline, self.budget = inner, deadline, budget

    def _left(self, timeout: float | None, expired: type[Exception]) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise expired(f"the exchange took longer than {self.budget:g} s in all")
        return left if timeout is None else min(timeout, left)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.inner.read(max_bytes, self._left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        # In pieces: the inner stream gives each send the whole timeout it is handed.
        for start in range(0, len(buffer), 65536):
            self.inner.write(buffer[start:start + 65536], self._left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self.inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        try:
            tls = self.inner.start_tls(ssl_context, server_hostname, self._left(timeout, httpcore.ConnectTimeout))
        except Exception:
            self.inner.close()
            raise
        return _DeadlineStream(tls, self.deadline, self.budget)

    def get_extra_info(self, info: str) -> Any:
        return self.inner.get_extra_info(info)


class _CheckedBackend(httpcore.NetworkBackend):
    """Resolves and checks at every connection, then connects to the checked address itself. A
    connection serves one request (no keep-alive), so its deadline is the request's."""

    def __init__(self, settings: Settings, budget: float) -> None:
        self.settings, self.budget = settings, budget
        self.inner = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        deadline = time.monotonic() + self.budget
        addresses = checked_addresses(host, port, self.settings)
        error: Exception | None = None
        for address in addresses:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                stream = self.inner.connect_tcp(str(address), port, min(timeout or left, left),
                                                local_address=local_address, socket_options=socket_options)
                return _DeadlineStream(stream, deadline, self.budget)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:  # try the next address
                error = exc
        raise error or httpcore.ConnectTimeout(f"could not connect within {self.budget:g} s")

    def sleep(self, seconds: float) -> None:
        self.inner.sleep(seconds)


@lru_cache(maxsize=1)
def _ssl_context() -> ssl.SSLContext:
    # Loading the CA bundle takes ~0.1 s: once per process, not once per delivery.
    return httpx.create_ssl_context(trust_env=False)


class _CheckedTransport(httpx.HTTPTransport):
    def __init__(self, settings: Settings, budget: float) -> None:
        super().__init__(verify=_ssl_context(), trust_env=False)
        # httpx builds its pool without a way to pass a network backend; rebuild it with ours. TLS
        # still verifies and sends SNI for the URL's host name: only the TCP address is ours.
        self._pool = httpcore.ConnectionPool(ssl_context=_ssl_context(),
                                             network_backend=_CheckedBackend(settings, budget),
                                             max_connections=8, max_keepalive_connections=0)


def client(settings: Settings, timeout: float) -> httpx.Client:
    """An httpx client that only reaches allowed addresses, never follows a redirect, asks for
    uncompressed bodies, and gives each request `timeout` seconds in all, connect to last byte. Read
    bodies with `iter_raw`: `iter_bytes` would still inflate a compressed one sent unasked."""
    return httpx.Client(transport=_CheckedTransport(settings, timeout), timeout=httpx.Timeout(timeout),
                        follow_redirects=False, trust_env=False,
                        headers={"User-Agent": "Step1X-Batch", "Accept-Encoding": "identity"})
