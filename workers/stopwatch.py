"""Seconds spent per stage and per output, measured in whichever thread did the work.

Encoding and uploading overlap across threads (and may overlap the next micro-batch's compute), so
a stage's share of the wall clock would say little about one job. Each call is timed where it runs
instead, and a job's figure is the sum over its outputs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


class Stopwatch:
    def __init__(self) -> None:
        self._seconds: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def time(self, stage: str, key: str, work: Callable[..., T], *args: object) -> T:
        """`work(*args)`, its seconds added to `stage` for `key` (an output key)."""
        started = time.perf_counter()
        try:
            return work(*args)
        finally:
            self.add(stage, key, time.perf_counter() - started)

    def add(self, stage: str, key: str, seconds: float) -> None:
        """Seconds measured elsewhere (an upload's, by libcurl)."""
        with self._lock:
            self._seconds[stage, key] = self._seconds.get((stage, key), 0.0) + seconds

    def total(self, stage: str, keys: Iterable[str]) -> float:
        with self._lock:
            return round(sum(self._seconds.get((stage, key), 0.0) for key in keys), 4)
