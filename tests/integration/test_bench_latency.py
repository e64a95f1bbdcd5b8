"""`bench.latency`, the proxy `bench.prefetch` puts between a worker and S3: every byte arrives, in
order, each way later by the delay (a round trip by twice it), and a burst is not delayed twice."""

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from bench.latency import delayed

pytestmark = pytest.mark.integration
BODY = bytes(range(256)) * 4096  # 1 MiB: many chunks


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *_):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_every_byte_arrives_a_round_trip_later(server):
    with delayed(server, 50) as proxied, httpx.Client() as client:
        assert client.get(proxied).content == BODY  # the connection is open: what follows is one round trip
        started = time.perf_counter()
        response = client.get(proxied)
        elapsed = time.perf_counter() - started
    assert response.content == BODY
    # Two 50 ms legs; delayed chunk after chunk, its 16 chunks of 64 KiB would take 0.85 s.
    assert 0.1 <= elapsed < 0.7
