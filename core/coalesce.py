"""Coalescing of single interactive jobs into shared micro-batches.

A user clicking "generate" in a shop back-office sends one job at a time; sent one message each,
they would each take a forward pass of their own. The API holds a just-stored job for at most
`STEP1X_COALESCE_MS` so that jobs arriving together leave as one micro-batch. The job is already
committed when it waits here: if the process dies in that window, the reconciler sends it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from core.dispatch import Planned

log = logging.getLogger(__name__)

Sink = Callable[[Sequence[Planned]], object]


class Coalescer:
    def __init__(self, sink: Sink, window_seconds: float) -> None:
        self.sink = sink
        self.window = window_seconds
        self._queue: queue.Queue[Planned | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="coalescer", daemon=True)
        self._thread.start()

    def add(self, jobs: Sequence[Planned]) -> None:
        for job in jobs:
            self._queue.put(job)

    def close(self) -> None:
        """Send what is waiting, then stop."""
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            held, closing = [first], False
            deadline = time.monotonic() + self.window
            while (left := deadline - time.monotonic()) > 0:
                try:
                    job = self._queue.get(timeout=left)
                except queue.Empty:
                    break
                if job is None:
                    closing = True
                    break
                held.append(job)
            try:
                self.sink(held)
            except Exception as exc:  # stored jobs are safe: the reconciler sends them later
                log.warning("dispatch of %d interactive jobs failed: %s", len(held), exc)
            if closing:
                return
