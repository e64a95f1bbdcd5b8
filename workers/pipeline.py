"""The worker's store pipeline: while the engine runs micro-batch N+1, background threads encode
and upload micro-batch N and finish its jobs. The task returns once it has handed its
micro-batch over (its forward pass running in the engine process, or done in the task thread
with STEP1X_ENGINE_PROCESS=0), so the next message reaches the engine without waiting on storage.

Two stages, one thread each: uploading (each micro-batch's objects in parallel), then finishing
(one transaction). Micro-batch N's finishing overlaps N+1's uploads, which would otherwise stop
for it. The upload stage takes micro-batches as their forward passes end (in the engine process
an interactive one may end before bulk ones handed over earlier), the finishing stage in the
order they were uploaded.

Bounded: at most STEP1X_PIPELINE_DEPTH micro-batches are handed over and not yet stored; a task
that would hand over one more waits for room (back-pressure when storage falls behind) with its
forward pass already sent, so memory holds that many micro-batches of outputs and one more.

Nothing is lost on a crash: a job is finished only after its outputs are stored, and until then
it is running under a lease its heartbeat keeps renewing; if the process dies, the reconciler
recovers it like any run of a lost worker. Before a pool process exits (warm shutdown, recycling)
the pipeline is drained. A store interrupted by infrastructure trouble hands its jobs back and
sends their message again with backoff, as a failed task does (`workers.tasks`).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from workers.batch import Interrupted, Outcome, Staged

log = logging.getLogger(__name__)
_pipelines: list[Pipeline] = []  # this process's
_LEFT = object()  # a stage's step ended with the micro-batch leaving the pipeline


def drain_all() -> None:
    """Store what every pipeline of this process holds (a pool process on its way out)."""
    for pipeline in _pipelines:
        pipeline.drain()


class _Entry(NamedTuple):
    staged: Staged
    done: Callable[[list[Outcome]], None]
    interrupted: Callable[[Interrupted], None]


class Pipeline:
    def __init__(self, depth: int) -> None:
        self._room = threading.BoundedSemaphore(max(1, depth))
        self._entries: queue.Queue[_Entry] = queue.Queue()  # to upload; done when finished
        self._uploaded: queue.Queue[_Entry] = queue.Queue()  # to finish
        self._held: set[str] = set()  # job ids handed over and not stored yet
        self._arrived: list[_Entry] = []  # taken by the upload stage, forward pass not over yet
        self._ended: list[Staged] = []  # micro-batches whose forward passes are over, in that order
        self._wake = threading.Event()  # a micro-batch arrived, or its forward pass ended
        self._lock = threading.Lock()
        self._dead: BaseException | None = None  # what killed a stage: the process is going
        for stage, name in ((self._upload_loop, "store-upload"), (self._finish_loop, "store-finish")):
            threading.Thread(target=stage, name=name, daemon=True).start()
        _pipelines.append(self)

    def put(self, staged: Staged, done: Callable[[list[Outcome]], None],
            interrupted: Callable[[Interrupted], None]) -> None:
        """Hand a micro-batch over to be stored; waits while the pipeline is full."""
        with self._lock:
            self._held.update(staged.job_ids)
        self._room.acquire()
        with self._lock:
            self._entries.put(_Entry(staged, done, interrupted))
            self._wake.set()
            alive = self._dead is None
        if alive:  # outside the lock: a pass already over calls back at once
            staged.when_ready(lambda: self._ended_pass(staged))
            return
        self._abandon_waiting()

    def holding(self, job_ids: Sequence[str]) -> set[str]:
        """Which of these jobs this pipeline still has to store. A message naming them again (a
        re-send) must not claim them under this worker's name a second time while they wait."""
        with self._lock:
            return self._held.intersection(job_ids)

    def drain(self) -> None:
        """Wait until every micro-batch handed over is stored, handed back, or left to the
        reconciler after a stage died."""
        self._entries.join()

    def _ended_pass(self, staged: Staged) -> None:
        """Every forward pass of `staged` ended."""
        with self._lock:
            self._ended.append(staged)
        self._wake.set()

    def _next(self) -> _Entry:
        """The micro-batch whose forward pass ended first among those not stored yet: in the
        engine process an interactive one runs before bulk ones handed over earlier, and is stored
        as soon as it is done instead of after them. In hand-over order when the forward passes
        ran in the task thread."""
        while True:
            self._wake.clear()
            with self._lock:
                while True:
                    try:
                        self._arrived.append(self._entries.get_nowait())
                    except queue.Empty:
                        break
                for staged in self._ended:
                    entry = next((entry for entry in self._arrived if entry.staged is staged), None)
                    if entry is not None:
                        self._ended.remove(staged)
                        self._arrived.remove(entry)
                        return entry
            self._wake.wait()

    def _upload_loop(self) -> None:
        while True:
            entry = self._next()
            if self._step(entry, entry.staged.upload) is _LEFT:
                continue
            with self._lock:
                if self._dead is None:
                    self._uploaded.put(entry)
                    continue
            self._abandon(entry)

    def _finish_loop(self) -> None:
        while True:
            entry = self._uploaded.get()
            outcomes = self._step(entry, entry.staged.finish)
            if outcomes is not _LEFT:
                self._end(entry, None, outcomes)

    def _step(self, entry: _Entry, step: Callable[[], Any]) -> Any:
        """A stage's work on one micro-batch: its result, or _LEFT once the micro-batch has left
        the pipeline (handed back, or failed); the stage's thread dies with its process."""
        try:
            return step()
        except BaseException as exc:
            self._end(entry, exc)
            if not isinstance(exc, Exception):
                self._die(exc)
                raise
            return _LEFT

    def _die(self, exc: BaseException) -> None:
        """A stage's thread is dying with its process: nothing it would have taken gets stored, so
        every micro-batch still waiting, and any handed over later, is left as the crash leaves it
        (`Staged.abandon`) instead of holding its leases and `drain` forever."""
        with self._lock:
            self._dead = exc
        self._abandon_waiting()

    def _abandon_waiting(self) -> None:
        with self._lock:
            arrived, self._arrived, self._ended = self._arrived, [], []
        for entry in arrived:
            self._abandon(entry)
        for waiting in (self._entries, self._uploaded):
            while True:
                try:
                    self._abandon(waiting.get_nowait())
                except queue.Empty:
                    break

    def _abandon(self, entry: _Entry) -> None:
        entry.staged.abandon()
        self._end(entry, self._dead)

    def _end(self, entry: _Entry, error: BaseException | None, outcomes: list[Outcome] | None = None) -> None:
        """A micro-batch leaves the pipeline: stored (`outcomes`), handed back (Interrupted), or
        failed otherwise (logged; the reconciler recovers its jobs once their leases run out)."""
        try:
            if isinstance(error, Interrupted):
                entry.interrupted(error)
            elif error is None:
                entry.done(outcomes or [])
            elif isinstance(error, Exception):
                log.error("storing a micro-batch of %d failed", len(entry.staged.job_ids), exc_info=error)
        except Exception:  # a failing callback must not stop the stage; the jobs are recovered by lease
            log.exception("after storing a micro-batch of %d", len(entry.staged.job_ids))
        finally:
            with self._lock:
                self._held.difference_update(entry.staged.job_ids)
            self._room.release()
            self._entries.task_done()
