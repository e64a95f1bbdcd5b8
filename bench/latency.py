"""A TCP proxy that delays every byte by a fixed time each way, standing in for an S3 endpoint that
is not on this machine: `python -m bench.latency PORT HOST:PORT ONE_WAY_MS`. Order is kept and a
burst is not delayed twice: each chunk leaves at its arrival time plus the delay, like a link.
It runs as its own process, so its work never shares an interpreter with what it measures."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx

from core.services import free_port


async def _carry(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def send() -> None:
        while (chunk := await chunks.get())[1]:
            await asyncio.sleep(chunk[0] - loop.time())
            writer.write(chunk[1])
            await writer.drain()
        writer.close()

    sender = asyncio.create_task(send())
    try:
        while data := await reader.read(65536):
            chunks.put_nowait((loop.time() + delay, data))
    except ConnectionError:
        pass
    finally:
        chunks.put_nowait((0.0, b""))
        with contextlib.suppress(ConnectionError):
            await sender


async def _serve(port: int, host: str, target: int, delay: float) -> None:
    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(host, target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_carry(reader, upstream_writer, delay), _carry(upstream_reader, writer, delay))

    server = await asyncio.start_server(connection, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


@contextlib.contextmanager
def delayed(url: str, one_way_ms: float) -> Iterator[str]:
    """The URL of a proxy to `url` (http://host:port) adding `one_way_ms` each way."""
    host, _, target = url.removeprefix("http://").partition(":")
    port = free_port()
    proxy = subprocess.Popen([sys.executable, "-m", "bench.latency", str(port), f"{host}:{target}", str(one_way_ms)])
    try:
        proxied = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(proxied, timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the latency proxy did not start"
                time.sleep(0.05)
        yield proxied
    finally:
        proxy.terminate()
        proxy.wait()


if __name__ == "__main__":
    listen, upstream, one_way = sys.argv[1:4]
    upstream_host, _, upstream_port = upstream.partition(":")
    asyncio.run(_serve(int(listen), upstream_host, int(upstream_port), float(one_way) / 1000))
