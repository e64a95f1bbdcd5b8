"""`python -m bench.objects`: CPU and wall time per object of the workers' S3 client
(`core.storage.ObjectClient`) against boto3, for PUTs and GETs of small images on SeaweedFS over
loopback, side by side, interleaved, repeated. CPU is the calling thread's: on a worker it is time
holding the GIL the forward pass waits for."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from core.services import start_seaweedfs
from core.settings import Settings
from core.storage import Storage

REPEATS = 5
OBJECTS = 300
DATA = bytes(range(256)) * 12  # 3 kB: a small PNG


def per_object(call: Callable[[int], object]) -> tuple[float, float]:
    """(CPU ms, wall ms) per call of OBJECTS calls."""
    call(0)  # the connection is open
    cpu, wall = time.thread_time(), time.perf_counter()
    for i in range(OBJECTS):
        call(i)
    return (time.thread_time() - cpu) / OBJECTS * 1000, (time.perf_counter() - wall) / OBJECTS * 1000


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, start_seaweedfs(Path(tmp), "bench", "bench-secret") as s3:
        storage = Storage(Settings(data_dir=Path(tmp), s3_endpoint_url=s3.url, s3_access_key="bench",
                                   s3_secret_key="bench-secret", s3_bucket="bench-objects"))
        storage.ensure_bucket()
        bucket, boto3 = storage.bucket, storage.client
        calls: dict[str, Callable[[int], object]] = {
            "PUT, boto3": lambda i: boto3.put_object(Bucket=bucket, Key=f"o/{i}", Body=DATA, ContentType="image/png"),
            "PUT, ObjectClient": lambda i: storage.put(f"o/{i}", DATA, "image/png"),
            "GET, boto3": lambda i: boto3.get_object(Bucket=bucket, Key=f"o/{i}")["Body"].read(),
            "GET, ObjectClient": lambda i: storage.get(f"o/{i}"),
        }
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in calls}
        for _ in range(REPEATS):
            for name, call in calls.items():
                runs[name].append(per_object(call))
    table = Table(title=f"S3 client per object ({OBJECTS} objects of {len(DATA)} bytes, medians of {REPEATS})")
    for column in ("request, client", "CPU ms", "wall ms"):
        table.add_column(column)
    for name, times in runs.items():
        table.add_row(name, f"{statistics.median(t[0] for t in times):.2f}",
                      f"{statistics.median(t[1] for t in times):.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
