"""For the outbound tests: a real HTTP server on a loopback address that records every request and
answers what the test tells it to (it can be stopped and started again on the same port), and the
light control process that delivers webhooks and fetches URL inputs."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from core.settings import Settings, get_settings
from workers.launcher import QUIET, stop_all


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.time)


# (status, headers, body) for a request; the default answers 204.
Answer = Callable[[Seen], tuple[int, dict[str, str], bytes]]


class Receiver:
    def __init__(self, host: str, port: int, answer: Answer | None = None) -> None:
        self.host, self.port = host, port
        self.answer: Answer = answer or (lambda _: (204, {}, b""))
        self.seen: list[Seen] = []
        self.connections = 0
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Receiver:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                seen = Seen(self.command, self.path, dict(self.headers.items()), self.rfile.read(length))
                outer.seen.append(seen)
                status, headers, body = outer.answer(seen)
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                    pass

            do_GET = do_POST = _handle

            def log_message(self, *_: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

            def verify_request(self, request: object, client_address: object) -> bool:
                outer.connections += 1
                return True

        self._server = Server((self.host, self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def wait_for(check: Callable[[], object], timeout: float = 30, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def outbound(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Only 127.0.0.1 is allowed; the retry schedule shrunk 1000x; the due pass every 0.3 s."""
    for name, value in {"OUTBOUND_ALLOW": "127.0.0.1/32", "OUTBOUND_RETRY_SCALE": "0.001",
                        "OUTBOUND_DUE_INTERVAL": "0.3", "PUBLIC_URL": "http://api.example"}.items():
        monkeypatch.setenv(f"STEP1X_{name}", value)
    get_settings.cache_clear()
    return get_settings()


@pytest.fixture
def control(outbound: Settings, tmp_path: Path) -> Iterator[None]:
    """The light control process: deliveries and fetches on the control queue, plus the due pass."""
    log = (tmp_path / "control.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "workers.deliver", "worker", "-Q", "control", "-P", "threads",
         "-c", "8", "-B", "-s", str(tmp_path / "beat-schedule"), "-n", f"control-{uuid.uuid4().hex[:6]}@test",
         "--loglevel", "INFO", *QUIET], env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        yield
    finally:
        stop_all([proc])
        log.close()
