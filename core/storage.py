"""Object storage: any S3-compatible service (SeaweedFS, MinIO, AWS S3).

Keys are deterministic (`outputs/{tenant}/{batch}/{job}.png`), so a job that runs twice overwrites
its output instead of leaving a duplicate. Writes and reads of whole objects, the workers' hot
path, go through `ObjectClient` (signed requests on a connection pool; a micro-batch's outputs all
at once through libcurl); everything else through boto3.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import re
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from datetime import UTC, datetime
from functools import cached_property
from typing import Any
from urllib.parse import quote, urlsplit

import boto3
import pycurl
import urllib3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from core.errors import NotFound, ServiceUnavailable
from core.formats import CONTENT_TYPES, EXTENSIONS
from core.settings import Settings


def input_key(tenant: str, file_id: str) -> str:
    return f"inputs/{tenant}/{file_id}"


def output_prefix(tenant: str, batch_id: str | None) -> str:
    return f"outputs/{tenant}/{batch_id or 'single'}/"


def output_key(tenant: str, batch_id: str | None, job_id: str, index: int = 0, output_format: str = "png") -> str:
    suffix = "" if index == 0 else f"-{index}"
    return f"{output_prefix(tenant, batch_id)}{job_id}{suffix}.{EXTENSIONS[output_format]}"


def format_of(key: str) -> str:
    """The output format a stored key was written in (its extension)."""
    extension = key.rsplit(".", 1)[-1]
    return next((f for f, ext in EXTENSIONS.items() if ext == extension), "png")


def attachment(filename: str) -> str:
    """A Content-Disposition for a download named after user text (RFC 6266): an ASCII `filename`
    for old clients, and the exact name percent-encoded in UTF-8 as `filename*` (RFC 5987).
    Quotes, backslashes, path separators and control characters never reach the header."""
    name = re.sub(r'[\x00-\x1f\x7f-\x9f/\\]', "_", filename) or "download"
    fallback = re.sub(r'[^ -~]|["%]', "_", name)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='!#$&+-.^_`|~')}"


class ObjectError(Exception):
    """A request the service refused, or could not take, after the retries."""


class ObjectClient:
    """PutObject and GetObject signed with AWS Signature Version 4 and sent on a urllib3 pool, or
    many PUTs at once through libcurl (`put_many`): what boto3 sends, for a quarter of its CPU
    (`python -m bench.objects`). A worker's upload and
    input-reading threads share the interpreter with the forward pass, so every millisecond holding
    the GIL here is one the engine waits. Path-style addressing, as the boto3 client is configured;
    retries on connection errors and 5xx like botocore's standard mode (both requests are idempotent)."""

    def __init__(self, endpoint: str, region: str, access_key: str, secret_key: str, connections: int,
                 attempts: int, ca_bundle: str | None = None) -> None:
        """`ca_bundle`: PEM file of the CAs to trust over https (default: the system's store)."""
        url = urlsplit(endpoint)
        default_port = 443 if url.scheme == "https" else 80
        # The Host header as signed: without the port when it is the scheme's default (as botocore does).
        self.host = (url.hostname or "") if url.port in (None, default_port) else f"{url.hostname}:{url.port}"
        self.base = url.path.rstrip("/")
        self.region, self.access_key, self.secret_key = region, access_key, secret_key
        retries = urllib3.Retry(total=attempts - 1, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504),
                                allowed_methods=None, raise_on_status=False)
        timeout = urllib3.Timeout(connect=10, read=60)
        tls = {"ca_certs": ca_bundle} if ca_bundle and url.scheme == "https" else {}
        self.pool = urllib3.connectionpool.connection_from_url(endpoint, maxsize=connections, retries=retries,
                                                                timeout=timeout, **tls)
        self.endpoint, self.attempts, self.ca_bundle = f"{url.scheme}://{url.netloc}", attempts, ca_bundle
        self._keys: dict[str, bytes] = {}
        self._local = threading.local()  # each thread's `_Transfers`

    def put(self, bucket: str, key: str, data: bytes, content_type: str) -> None:
        self._send("PUT", bucket, key, data, content_type)

    def put_many(self, bucket: str, objects: Iterable[StoredObject | Future[StoredObject]], at_once: int,
                 stored: Callable[[str, float], None] | None = None) -> None:
        """PUT every (key, data, content type), `at_once` at a time, all from this thread through
        libcurl's multi interface: the requests are built here (signing is a few hashes), libcurl
        sends them and parses the replies in C, outside the GIL. Threads each sending one request
        through urllib3 cost four times the CPU per object, and a worker's CPU is shared with its
        engine and the storage service (`python -m bench.objects`). An object may be a future (its
        encode still running elsewhere): it is sent once done, while the transfers already
        started go on. `stored(key, seconds)` is called as each one is stored. Connection errors,
        timeouts and 500/502/503/504 are retried like `put`; on a refusal, retries spent, or an
        object that could not be made, what is in flight is dropped and the error names the key."""
        transfers = self._transfers()
        waiting = deque(objects)
        retries: list[tuple[float, int, StoredObject]] = []  # (not before, attempt, object)
        active: dict[Any, tuple[int, StoredObject, io.BytesIO]] = {}
        at_once = max(1, at_once)
        watched: Future[StoredObject] | None = None
        try:
            while waiting or retries or active:
                now = time.monotonic()
                while len(active) < at_once:
                    due = next((retry for retry in retries if retry[0] <= now), None)
                    if due is not None:
                        retries.remove(due)
                    elif waiting and (_ready(waiting[0]) or not active):
                        due = (now, 1, _made(waiting.popleft()))
                    else:
                        break
                    curl, reply = transfers.start(self._put_request(bucket, *due[2]))
                    active[curl] = (due[1], due[2], reply)
                if waiting and isinstance(waiting[0], Future) and waiting[0] is not watched:
                    watched = waiting[0]  # not done, or it would have started: its end wakes the wait
                    transfers.wake_when_done(watched)
                # A retry waits for its time and a free slot; with none, libcurl's sockets and
                # timer (at most a second, to look again) say when.
                due_at = min((retry[0] for retry in retries), default=now + 1.0) if len(active) < at_once else now + 1.0
                for curl, code, error in transfers.step(max(0.0, due_at - now)):
                    attempt, item, reply = active.pop(curl)
                    try:
                        status = 0 if error else curl.getinfo(pycurl.RESPONSE_CODE)
                        if error is None and status < 300:
                            if stored is not None:
                                stored(item[0], curl.getinfo(pycurl.TOTAL_TIME))
                        elif (status in _RETRIED_STATUSES or code in _RETRIED_ERRORS) and attempt < self.attempts:
                            retries.append((time.monotonic() + 0.2 * 2 ** (attempt - 1), attempt + 1, item))
                        else:
                            cause = error or f"HTTP {status}: {reply.getvalue()[:300]!r}"
                            raise ObjectError(f"PUT {item[0]!r} to {self.host}: {cause}")
                    finally:
                        transfers.end(curl)
        finally:
            for curl in active:  # a refusal, or an object that could not be made: drop what is in flight
                transfers.end(curl)

    def get(self, bucket: str, key: str) -> bytes:
        """The object's bytes; NotFound if there is no such object."""
        return self._send("GET", bucket, key)

    def _send(self, method: str, bucket: str, key: str, data: bytes = b"", content_type: str | None = None) -> bytes:
        path = self._path(bucket, key)
        try:
            response = self.pool.urlopen(method, path, body=data if method == "PUT" else None,
                                         headers=self.headers(method, path, data, content_type))
        except urllib3.exceptions.HTTPError as exc:
            raise ObjectError(f"{method} {key!r} to {self.host}: {exc}") from exc
        if response.status == 404 and method == "GET" and b"NoSuchBucket" not in response.data:
            raise NotFound(f"object {key!r} is not in bucket {bucket!r}")
        if response.status >= 300:
            raise ObjectError(f"{method} {key!r} to {self.host}: HTTP {response.status}: {response.data[:300]!r}")
        return bytes(response.data)

    def headers(self, method: str, path: str, data: bytes = b"", content_type: str | None = None,
                now: datetime | None = None) -> dict[str, str]:
        stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
        day = stamp[:8]
        digest = hashlib.sha256(data).hexdigest()
        headers = {"content-type": content_type} if content_type else {}
        headers |= {"host": self.host, "x-amz-content-sha256": digest, "x-amz-date": stamp}
        signed = ";".join(headers)  # already in the sorted order SigV4 wants
        lines = "".join(f"{name}:{value}\n" for name, value in headers.items())
        canonical = f"{method}\n{path}\n\n{lines}\n{signed}\n{digest}"
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        signature = hmac.new(self._key(day), to_sign.encode(), hashlib.sha256).hexdigest()
        return {**headers, "authorization": f"AWS4-HMAC-SHA256 Credential={self.access_key}/{scope}, "
                                            f"SignedHeaders={signed}, Signature={signature}"}

    def _key(self, day: str) -> bytes:
        """The signing key, derived once a day."""
        key = self._keys.get(day)
        if key is None:
            key = f"AWS4{self.secret_key}".encode()
            for part in (day, self.region, "s3", "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            self._keys = {day: key}
        return key

    def _path(self, bucket: str, key: str) -> str:
        """The request path, as sent and as signed: one quoting for both clients."""
        return quote(f"{self.base}/{bucket}/{key}", safe="/~")

    def _put_request(self, bucket: str, key: str, data: bytes, content_type: str) -> tuple[str, bytes, list[str]]:
        path = self._path(bucket, key)
        headers = [f"{name}: {value}" for name, value in self.headers("PUT", path, data, content_type).items()]
        # "Expect:" drops libcurl's 100-continue wait, a round trip per large object.
        return f"{self.endpoint}{path}", data, [*headers, "Expect:"]

    def _transfers(self) -> _Transfers:
        local = self._local
        if not hasattr(local, "transfers"):
            local.transfers = _Transfers(self.endpoint, self.ca_bundle)
        return local.transfers


class _Transfers:
    """One thread's libcurl multi handle and its easy handles, whose connections stay open between
    calls. Sockets are watched with the platform's selector (epoll) on libcurl's socket and timer
    callbacks, not select(2), which cannot watch a descriptor numbered over 1023; a socket pair in
    the same selector wakes the wait when an object being made elsewhere is done."""

    def __init__(self, endpoint: str, ca_bundle: str | None) -> None:
        self.endpoint, self.ca_bundle = endpoint, ca_bundle
        self.multi = pycurl.CurlMulti()
        self.multi.setopt(pycurl.M_SOCKETFUNCTION, self._watch)
        self.multi.setopt(pycurl.M_TIMERFUNCTION, self._timer)
        self.selector = selectors.DefaultSelector()
        self._woken, self._waker = socket.socketpair()
        for end in (self._woken, self._waker):
            end.setblocking(False)
        self.selector.register(self._woken, selectors.EVENT_READ)
        self.idle: list[Any] = []
        self.deadline: float | None = None  # when libcurl wants to be called whatever the sockets do

    def start(self, request: tuple[str, bytes, list[str]]) -> tuple[Any, io.BytesIO]:
        url, data, headers = request
        curl = self.idle.pop() if self.idle else _curl(self.endpoint, self.ca_bundle)
        reply = io.BytesIO()
        curl.setopt(pycurl.URL, url)
        curl.setopt(pycurl.POSTFIELDS, data)
        curl.setopt(pycurl.CUSTOMREQUEST, "PUT")
        curl.setopt(pycurl.HTTPHEADER, headers)
        curl.setopt(pycurl.WRITEDATA, reply)
        self.multi.add_handle(curl)
        return curl, reply

    def end(self, curl: Any) -> None:
        self.multi.remove_handle(curl)
        curl.setopt(pycurl.POSTFIELDS, b"")  # an idle handle does not keep the last output alive
        self.idle.append(curl)

    def wake_when_done(self, future: Future[Any]) -> None:
        future.add_done_callback(lambda _: self._wake())

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # a wake-up already waiting is enough
            self._waker.send(b"\0")

    def step(self, longest: float) -> list[tuple[Any, int, str | None]]:
        """Wait up to `longest` seconds (less if libcurl's timer says so) for a socket to be ready
        or a wake-up, let libcurl act; the transfers that ended, with their error codes and texts."""
        wait = longest if self.deadline is None else max(0.0, min(longest, self.deadline - time.monotonic()))
        for key, mask in self.selector.select(wait):
            if key.fileobj is self._woken:
                with contextlib.suppress(BlockingIOError):
                    self._woken.recv(4096)
                continue
            self.multi.socket_action(key.fd, (pycurl.CSELECT_IN if mask & selectors.EVENT_READ else 0)
                                     | (pycurl.CSELECT_OUT if mask & selectors.EVENT_WRITE else 0))
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.deadline = None  # before the call: libcurl may set the next one in it
            self.multi.socket_action(pycurl.SOCKET_TIMEOUT, 0)
        ended: list[tuple[Any, int, str | None]] = []
        while True:
            queued, ok, failed = self.multi.info_read()
            ended += [(curl, 0, None) for curl in ok] + [(curl, code, text) for curl, code, text in failed]
            if not queued:
                return ended

    def _watch(self, what: int, fd: int, _multi: Any, _data: Any) -> None:
        events = {pycurl.POLL_IN: selectors.EVENT_READ, pycurl.POLL_OUT: selectors.EVENT_WRITE,
                  pycurl.POLL_INOUT: selectors.EVENT_READ | selectors.EVENT_WRITE}.get(what)
        watched = fd in self.selector.get_map()
        if events is None:  # POLL_REMOVE
            if watched:
                self.selector.unregister(fd)
        elif watched:
            self.selector.modify(fd, events)
        else:
            self.selector.register(fd, events)

    def _timer(self, milliseconds: int) -> None:
        self.deadline = None if milliseconds < 0 else time.monotonic() + milliseconds / 1000


StoredObject = tuple[str, bytes, str]  # key, data, content type
# What `put` retries (urllib3's status list), and libcurl's errors of a connection that failed or
# broke: resolving, connecting, sending, receiving, nothing received, timed out.
_RETRIED_STATUSES = frozenset({500, 502, 503, 504})
_RETRIED_ERRORS = frozenset({pycurl.E_COULDNT_RESOLVE_HOST, pycurl.E_COULDNT_CONNECT, pycurl.E_SEND_ERROR,
                             pycurl.E_RECV_ERROR, pycurl.E_GOT_NOTHING, pycurl.E_OPERATION_TIMEDOUT})


def _ready(item: StoredObject | Future[StoredObject]) -> bool:
    return not isinstance(item, Future) or item.done()


def _made(item: StoredObject | Future[StoredObject]) -> StoredObject:
    return item.result() if isinstance(item, Future) else item


def _system_cas() -> str | None:
    """The system's CA store, as Python's ssl finds it (SSL_CERT_FILE / SSL_CERT_DIR, else OpenSSL's
    default paths): what urllib3's default context loads."""
    paths = ssl.get_default_verify_paths()
    return paths.cafile or paths.capath


def _curl(endpoint: str, ca_bundle: str | None) -> Any:
    curl = pycurl.Curl()
    curl.setopt(pycurl.NOSIGNAL, 1)  # libcurl in threads: no SIGALRM for timeouts
    curl.setopt(pycurl.PROXY, "")  # as `put`: straight to the endpoint, whatever http_proxy says
    curl.setopt(pycurl.CONNECTTIMEOUT, 10)
    curl.setopt(pycurl.LOW_SPEED_LIMIT, 1)  # under a byte a second for a minute: as `put`'s read timeout
    curl.setopt(pycurl.LOW_SPEED_TIME, 60)
    curl.setopt(pycurl.PATH_AS_IS, 1)  # the path as signed: no "." or ".." segments folded away
    curl.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)  # as `put`: a connection per transfer
    if endpoint.startswith("https:") and ca_bundle:
        curl.setopt(pycurl.CAINFO, ca_bundle)
    elif endpoint.startswith("https:"):
        # The CAs Python's ssl trusts, as for `put`: libcurl's own default path differs per build.
        paths = ssl.get_default_verify_paths()
        if paths.cafile:
            curl.setopt(pycurl.CAINFO, paths.cafile)
        if paths.capath:
            curl.setopt(pycurl.CAPATH, paths.capath)
    return curl


class Storage:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.bucket = settings.s3_bucket

    def _client(self, endpoint: str | None) -> Any:
        s = self.settings
        return boto3.client(
            "s3", endpoint_url=endpoint, region_name=s.s3_region,
            aws_access_key_id=s.s3_access_key, aws_secret_access_key=s.s3_secret_key,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                          retries={"max_attempts": s.s3_max_attempts, "mode": "standard"},
                          # whole-object reads and writes go through `objects`; what is left here
                          # (copies of cached outputs, deletes, presigning) runs a few threads at most
                          max_pool_connections=s.upload_concurrency + 2),
            verify=s.s3_ca_bundle or _system_cas(),  # not certifi's, which urllib3 and libcurl do not read
        )

    @cached_property
    def client(self) -> Any:
        return self._client(self.settings.s3_endpoint_url)

    @cached_property
    def public_client(self) -> Any:
        """Signs URLs for the address clients see, which may differ from the workers' address."""
        public = self.settings.s3_public_endpoint_url
        return self._client(public) if public else self.client

    def ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)

    @cached_property
    def objects(self) -> ObjectClient:
        s = self.settings
        # Connections for the micro-batch's input reads, the lookahead's and single PUTs (a
        # micro-batch's uploads, `put_many`, hold their own).
        return ObjectClient(self.client.meta.endpoint_url, s.s3_region, s.s3_access_key, s.s3_secret_key,
                            connections=2 * s.upload_concurrency + 2, attempts=s.s3_max_attempts,
                            ca_bundle=s.s3_ca_bundle)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self.objects.put(self.bucket, key, data, content_type)

    def put_many(self, objects: Iterable[StoredObject | Future[StoredObject]],
                 stored: Callable[[str, float], None] | None = None) -> None:
        self.objects.put_many(self.bucket, objects, self.settings.upload_concurrency, stored)

    def get(self, key: str) -> bytes:
        return self.objects.get(self.bucket, key)

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return False
            raise
        return True

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=key)

    def copy(self, source_key: str, key: str) -> None:
        self.client.copy_object(Bucket=self.bucket, Key=key,
                                CopySource={"Bucket": self.bucket, "Key": source_key})

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under `prefix`; returns how many there were."""
        deleted = 0
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
                deleted += len(keys)
        return deleted

    def presign_get(self, key: str, filename: str | None = None) -> str:
        """A GET URL that serves the object with its image type and, given a file name, as a
        download under that name (any characters, safely encoded)."""
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key,
                                  "ResponseContentType": CONTENT_TYPES[format_of(key)]}
        if filename:
            params["ResponseContentDisposition"] = attachment(filename)
        url: str = self.public_client.generate_presigned_url(
            "get_object", Params=params, ExpiresIn=self.settings.presign_seconds
        )
        return url

    def ping(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            raise ServiceUnavailable(f"S3 bucket {self.bucket!r} at {self.settings.s3_endpoint_url} "
                                     f"is unreachable: {exc}") from exc
