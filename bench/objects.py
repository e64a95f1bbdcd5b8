"""`python -m bench.objects`: CPU and wall time per object of the workers' S3 client
(`core.storage.ObjectClient`) against boto3, for PUTs and GETs of small images on SeaweedFS over
loopback, side by side, interleaved, repeated; and a micro-batch's PUTs as the worker sent them
before (a thread each from a pool of `upload_concurrency`) against `put_many` (libcurl's multi
interface, as many at once from one thread). CPU is this process's: on a worker it is time holding
the GIL, which the worker's other threads wait for; and SeaweedFS's, which shares the machine."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

from core.services import start_seaweedfs
from core.settings import Settings
from core.storage import Storage

REPEATS = 5
OBJECTS = 300
DATA = bytes(range(256)) * 12  # 3 kB: a small PNG


def each(call: Callable[[int], object]) -> Callable[[range], None]:
    def run(keys: range) -> None:
        for i in keys:
            call(i)

    return run


def per_object(call: Callable[[range], object], server: psutil.Process) -> tuple[float, float, float]:
    """(CPU ms here, CPU ms of the server, wall ms) per object of OBJECTS."""
    call(range(1))  # the connections are open
    cpu, served, wall = time.process_time(), sum(server.cpu_times()[:2]), time.perf_counter()
    call(range(OBJECTS))
    return ((time.process_time() - cpu) / OBJECTS * 1000, (sum(server.cpu_times()[:2]) - served) / OBJECTS * 1000,
            (time.perf_counter() - wall) / OBJECTS * 1000)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, start_seaweedfs(Path(tmp), "bench", "bench-secret") as s3:
        storage = Storage(Settings(data_dir=Path(tmp), s3_endpoint_url=s3.url, s3_access_key="bench",
                                   s3_secret_key="bench-secret", s3_bucket="bench-objects"))
        storage.ensure_bucket()
        bucket, boto3 = storage.bucket, storage.client
        server = psutil.Process(s3.process.pid)
        size = storage.settings.upload_concurrency
        threads = ThreadPoolExecutor(size)
        calls: dict[str, Callable[[range], object]] = {
            "PUT, boto3": each(lambda i: boto3.put_object(Bucket=bucket, Key=f"o/{i}", Body=DATA,
                                                          ContentType="image/png")),
            "PUT, ObjectClient.put": each(lambda i: storage.put(f"o/{i}", DATA, "image/png")),
            "GET, boto3": each(lambda i: boto3.get_object(Bucket=bucket, Key=f"o/{i}")["Body"].read()),
            "GET, ObjectClient.get": each(lambda i: storage.get(f"o/{i}")),
            f"PUT, ObjectClient.put in {size} threads":  # how the worker stored a micro-batch before
                lambda keys: list(threads.map(lambda i: storage.put(f"p/{i}", DATA, "image/png"), keys)),
            f"PUT, ObjectClient.put_many ({size} at once)":
                lambda keys: storage.put_many((f"p/{i}", DATA, "image/png") for i in keys),
        }
        runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in calls}
        for _ in range(REPEATS):
            for name, call in calls.items():
                runs[name].append(per_object(call, server))
        threads.shutdown()
    table = Table(title=f"S3 client per object ({OBJECTS} objects of {len(DATA)} bytes, medians of {REPEATS})")
    for column in ("request, client", "CPU ms", "SeaweedFS CPU ms", "wall ms"):
        table.add_column(column)
    for name, times in runs.items():
        table.add_row(name, *(f"{statistics.median(t[column] for t in times):.2f}" for column in range(3)))
    Console().print(table)


if __name__ == "__main__":
    main()
