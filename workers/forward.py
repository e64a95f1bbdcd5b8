"""One micro-batch's forward pass: each job's requests checked, the valid ones run in one pass, and
a failing item isolated so the rest still succeed. Runs in the worker's task thread, or in the
engine process (`workers.engine_host`) while the task thread goes on to the next message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from core.errors import Step1XError
from models.engine import Canceled, Engine, ImageRequest, ImageResult, Progress
from workers.progress import throttled

log = logging.getLogger(__name__)

# Per job: one result per request (an Exception where that request failed), or the error (a
# Step1XError) its requests were refused with before any compute.
JobResult = list[ImageResult | Exception] | Exception


@dataclass
class Forward:
    results: list[JobResult]
    seconds: float  # the forward pass itself, without the checks


def forward(engine: Engine, jobs: Sequence[list[ImageRequest]]) -> Forward:
    """Check each job's requests, then run every valid one in one pass. Raises Canceled."""
    refused: dict[int, Step1XError] = {}
    for i, requests in enumerate(jobs):
        try:
            engine.check_inputs(requests)
        except Step1XError as exc:
            refused[i] = exc
    flat = [request for i, requests in enumerate(jobs) if i not in refused for request in requests]
    started = time.perf_counter()
    ran = run_isolating(engine, flat) if flat else []
    seconds = time.perf_counter() - started
    results: list[JobResult] = []
    cursor = 0
    for i, requests in enumerate(jobs):
        if i in refused:
            results.append(refused[i])
        else:
            results.append(ran[cursor:cursor + len(requests)])
            cursor += len(requests)
    return Forward(results, seconds)


def run_isolating(engine: Engine, requests: list[ImageRequest]) -> list[ImageResult | Exception]:
    """Run the micro-batch in one pass; if it fails, split it to find the bad items, so one broken
    item fails alone and the rest still succeed."""
    try:
        return list(engine.run(requests))
    except Canceled:
        raise
    except Exception as exc:  # any engine failure is isolated; infrastructure errors come later
        if len(requests) == 1:
            log.warning("item %s failed: %s", requests[0].label, exc)
            return [exc]
        mid = len(requests) // 2
        return run_isolating(engine, requests[:mid]) + run_isolating(engine, requests[mid:])


class Running(Protocol):
    """A forward pass handed over: `result` waits for it (and raises Canceled if it was stopped)."""

    def add_done_callback(self, callback: Callable[[], None]) -> None: ...

    def result(self) -> Forward: ...


class Ran:
    """A forward pass run in this thread: over before anyone waits."""

    def __init__(self, forward: Forward | None, canceled: Canceled | None = None) -> None:
        self._forward, self._canceled = forward, canceled

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        callback()

    def result(self) -> Forward:
        if self._canceled is not None:
            raise self._canceled
        assert self._forward is not None
        return self._forward


def submit(engine: Engine, jobs: list[list[ImageRequest]], progress: Progress, interactive: bool,
           interval: float) -> Running:
    """Start the forward pass. An engine in the worker process runs it now, in this thread; one in
    the engine process runs it there (interactive micro-batches before bulk ones waiting), and
    this thread goes on. Either way `progress` hears of the steps at most once per `interval`."""
    from workers.engine_host import HostedEngine

    if isinstance(engine, HostedEngine):
        return engine.submit(jobs, progress, interactive)  # the engine process thins the steps
    try:
        with engine.watched(throttled(progress, interval)):
            return Ran(forward(engine, jobs))
    except Canceled as exc:
        return Ran(None, exc)
