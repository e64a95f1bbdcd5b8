"""The worker's engines in a process of their own (STEP1X_ENGINE_PROCESS): the forward pass runs
apart from the worker's claims, uploads and finishing transactions, and the task thread hands a
micro-batch over and goes on to the next message while it runs.

Why a process: a CPU engine's forward pass is Python dispatching small tensor operations, taking
the interpreter lock back after each one. In one process with the store pipeline's threads, every
millisecond those threads hold the lock lands on the forward pass (`python -m bench.tracing`: a
thread holding it 15% of the time cost the eager tiny-SD engine 14%; `python -m bench.interference`
measures the whole run both ways).

One host per worker pool process, started with it (`python -m workers.engine_host FD`) and killed
with it. Messages are pickled tuples on a socket pair: ("load", id, priority, name) and
("run", id, priority, name, jobs, interval) are answered ("ok", id, value) or ("error", id,
exception), in priority order (interactive micro-batches before bulk ones, then first come first
served); ("status", id) is answered at once, even during a run (device and memory, for the
workers table); ("cancel", id) stops a run. During a run the host sends ("step", id, done, total) at most
once per `interval` seconds; the worker passes it to the run's progress callback (on a thread of
its own: the callback writes to the database) and sends the cancel when it says stop, so cancels
and progress work as they do in process.

If the host dies, every call waiting on it raises `HostDied` and the next call starts a fresh one.
Each micro-batch it held is run again on the fresh host, whole, then in halves, until the job that
kills it fails alone (as `workers.forward.run_isolating` isolates a failing item). A host that
dies before it sends ("ready", -1) could not start: its micro-batches are handed back as
infrastructure trouble, not bisected into failed jobs.
"""

from __future__ import annotations

import contextlib
import copyreg
import functools
import itertools
import logging
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection
from types import SimpleNamespace
from typing import Any, TypeVar

from core import heap
from core.services import die_with_parent
from core.settings import Settings, get_settings
from models.caches import LRUCache
from models.engine import Engine, ImageRequest, ImageResult, Progress
from models.profiles import Registry
from workers.forward import Forward, forward
from workers.progress import throttled
from workers.registry import rss_bytes

log = logging.getLogger(__name__)
INTERACTIVE, BULK = 0, 1  # priorities: lower runs first
E = TypeVar("E", bound=BaseException)


class HostDied(RuntimeError):
    """The engine process exited (killed, out of memory, crashed) before answering."""


class _Host:
    """The child process, and the worker's side of the socket pair: calls return futures, which a
    reader thread resolves from the replies. The reader never waits on a sender: `_lock` guards
    the calls only, `_sending` the socket's writing end (the host reads all the time, so a send
    always ends)."""

    def __init__(self) -> None:
        parent, child = socket.socketpair()
        self.process = subprocess.Popen([sys.executable, "-m", "workers.engine_host", str(child.fileno())],
                                        pass_fds=[child.fileno()], preexec_fn=die_with_parent(signal.SIGKILL))
        child.close()
        self._conn = Connection(parent.detach())
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._sending = threading.Lock()
        self._calls: dict[int, tuple[Future[Any], Progress | None]] = {}
        # Why the host is gone, once it is: each caller then gets a HostDied of its own (one instance
        # raised in several threads would gather all their tracebacks).
        self._dead: str | None = None
        self.started = False  # whether it said it is ready: one that dies before failed to start
        # Steps are recorded on threads of their own: a progress callback writes to the database,
        # which must not hold up other calls' answers. A call's next step is dropped while its last
        # one is still being recorded (a slow database thins them further instead of queueing them),
        # and its own answer waits for that one. Only the reader touches `_stepping`.
        self._steps = ThreadPoolExecutor(4, thread_name_prefix="engine-progress")
        self._stepping: dict[int, Future[None]] = {}  # each call's last step sent to be recorded
        threading.Thread(target=self._read, name="engine-host", daemon=True).start()

    @property
    def alive(self) -> bool:
        return self._dead is None

    def call(self, kind: str, priority: int, *args: Any, progress: Progress | None = None) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            if self._dead is not None:
                raise HostDied(self._dead)
            call_id = next(self._ids)
            self._calls[call_id] = (future, progress)
        try:
            self._send((kind, call_id, priority, *args))
        except Exception as exc:  # not sent (a closed socket, or something that does not pickle)
            with self._lock:
                self._calls.pop(call_id, None)
            if isinstance(exc, OSError):
                self._die(exc)
                raise HostDied(self._dead or str(exc)) from exc
            raise
        return future

    def _send(self, message: tuple[Any, ...]) -> None:
        with self._sending:
            self._conn.send(message)

    def _read(self) -> None:
        try:
            self._answers()
        except BaseException as exc:  # EOF: the host exited; anything else leaves it unheard
            self._die(exc)
            if not isinstance(exc, EOFError | OSError):
                log.exception("reading the engine process's answers failed")

    def _answers(self) -> None:
        while True:
            kind, call_id, *rest = self._conn.recv()
            if kind == "ready":
                self.started = True
                continue
            with self._lock:
                call = self._calls.get(call_id) if kind == "step" else self._calls.pop(call_id, None)
            if call is None:
                continue
            future, progress = call
            if kind == "step":
                last = self._stepping.get(call_id)
                if progress is not None and (last is None or last.done()):
                    with contextlib.suppress(RuntimeError):  # shut down: the host died, or we exit
                        self._stepping[call_id] = self._steps.submit(self._step, call_id, progress, *rest)
                continue
            # After the call's last step is recorded: no progress write of a call outlives its
            # answer, after which the finishing transaction updates the same rows. At once if it is.
            last = self._stepping.pop(call_id, None)
            if last is None:
                _resolve(future, kind, rest[0])
            else:
                last.add_done_callback(functools.partial(_resolve, future, kind, rest[0]))

    def _step(self, call_id: int, progress: Progress, done: int, total: int) -> None:
        try:
            go_on = progress(done, total)
        except Exception:
            log.exception("recording a step of the engine process failed")
            go_on = True
        if not go_on:
            with contextlib.suppress(OSError):  # the host is gone: the reader hears of it
                self._send(("cancel", call_id))

    def _die(self, exc: BaseException) -> None:
        """Fail every waiting call, and make sure the process is gone."""
        with self._lock:
            if self._dead is not None:
                return
            self._dead = f"the engine process exited ({exc or type(exc).__name__})"
            calls, self._calls = list(self._calls.values()), {}
        for future, _ in calls:
            future.set_exception(HostDied(self._dead))
        self._steps.shutdown(wait=False)  # what waits there still runs: answers held behind a step
        with self._sending:  # not in the middle of a cancel sent from the steps thread
            self._conn.close()
        if self.process.poll() is None:
            self.process.kill()

    def close(self) -> None:
        self._die(EOFError("closed by the worker"))
        self.process.wait()


def _resolve(future: Future[Any], kind: str, value: Any, _step: Future[None] | None = None) -> None:
    """Answer a call; `_step`: the step it waited for, when it is a done-callback of one."""
    if kind == "ok":
        future.set_result(value)
    else:
        future.set_exception(value)


class HostedEngine(Engine):
    """An engine loaded in the host process. `submit` is how the worker runs it."""

    def __init__(self, registry: HostedRegistry, name: str, info: dict[str, Any]) -> None:
        super().__init__(name, registry.settings.models[name])
        self._registry = registry
        self.task = info["task"]
        self.model_hash = info["model_hash"]
        self.device = SimpleNamespace(type=info["device"])  # what `workers.batch.device_kind` reads

    def run(self, requests: Any) -> list[ImageResult]:
        raise NotImplementedError("a hosted engine runs micro-batches through submit()")

    def submit(self, jobs: list[list[ImageRequest]], progress: Progress, interactive: bool) -> _Running:
        priority = INTERACTIVE if interactive else BULK
        host = self._registry.host()
        try:
            future = self._call(host, jobs, progress, priority)
        except HostDied as exc:
            future = Future()
            future.set_exception(exc)
        return _Running(self, host, future, jobs, progress, priority)

    def _call(self, host: _Host, jobs: list[list[ImageRequest]], progress: Progress, priority: int) -> Future[Forward]:
        return host.call("run", priority, self.name, jobs, self._registry.settings.progress_interval,
                         progress=progress)

    def _isolating(self, jobs: list[list[ImageRequest]], progress: Progress, priority: int) -> Forward:
        host = self._registry.host()
        try:
            return self._call(host, jobs, progress, priority).result()
        except HostDied as exc:
            if not host.started:  # a fresh one that never started: infrastructure, not these items
                raise
            if len(jobs) == 1:
                return Forward([[exc] * len(jobs[0])], 0.0)
            mid = len(jobs) // 2
            first, second = (self._isolating(half, progress, priority) for half in (jobs[:mid], jobs[mid:]))
            return Forward(first.results + second.results, first.seconds + second.seconds)


class _Running:
    """A micro-batch's forward pass in the host: done once the host answered (or died)."""

    def __init__(self, engine: HostedEngine, host: _Host, future: Future[Forward], jobs: list[list[ImageRequest]],
                 progress: Progress, priority: int) -> None:
        self._engine, self._host, self._future, self._jobs, self._progress, self._priority = (
            engine, host, future, jobs, progress, priority)

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        self._future.add_done_callback(lambda _: callback())

    def result(self) -> Forward:
        try:
            return self._future.result()
        except HostDied:
            if not self._host.started:  # it never started: no item's fault, the micro-batch is handed back
                raise
            log.warning("the engine process died on a micro-batch of %d jobs of %s; running it again in halves",
                        len(self._jobs), self._engine.name)
            return self._engine._isolating(self._jobs, self._progress, self._priority)


class HostedRegistry:
    """`models.profiles.Registry`'s interface, with the engines loaded in the host process (which
    keeps its own LRU of the same size)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._engines: LRUCache[str, HostedEngine] = LRUCache(settings.pipeline_cache_size)
        self._host: _Host | None = None
        self._lock = threading.Lock()

    def host(self) -> _Host:
        """The live host, started afresh if there is none (a new one loads its engines again)."""
        with self._lock:
            if self._host is None or not self._host.alive:
                self._host = _Host()
            return self._host

    def get(self, name: str) -> Engine:
        return self._engines.get_or_create(
            name, lambda: HostedEngine(self, name, self.host().call("load", INTERACTIVE, name).result()))

    def loaded(self) -> list[str]:
        return self._engines.keys()

    def status(self) -> dict[str, Any] | None:
        """The engine process's device and memory (`status`), None while none runs."""
        with self._lock:
            host = self._host if self._host is not None and self._host.alive else None
        return None if host is None else host.call("status", INTERACTIVE).result(timeout=10)

    def close(self) -> None:
        with self._lock:
            if self._host is not None:
                self._host.close()
                self._host = None


def _rebuilt(cls: type[BaseException], args: tuple[Any, ...], attributes: dict[str, Any]) -> BaseException:
    exc = cls.__new__(cls)
    exc.args = args
    vars(exc).update(attributes)
    return exc


def _reduce(exc: BaseException) -> tuple[Any, ...]:
    return _rebuilt, (type(exc), exc.args, vars(exc))


def _portable(exc: E) -> E | RuntimeError:
    """The exception, pickled as (class, args, attributes) and rebuilt without calling __init__:
    pickle's own way calls it with `args`, which for `InvalidInput` words the message anew. A
    RuntimeError with its text if even that does not pickle."""
    copyreg.pickle(type(exc), _reduce)
    try:
        pickle.dumps(exc)
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def status() -> dict[str, Any]:
    """What the worker's row in the workers table reports of the engine process."""
    from models.device import allocated_bytes, describe_device

    device, memory = describe_device()
    return {"device": device, "device_memory_bytes": memory, "gpu_memory_bytes": allocated_bytes(),
            "rss_bytes": rss_bytes()}


def serve(conn: Connection, settings: Settings) -> None:
    """Runs the calls in priority order on this thread. A reader thread takes messages in and a
    writer thread sends answers out, so neither waits on the other: the worker's sends always end,
    even while a large answer waits for the worker to read it. Either one failing ends the process,
    which the worker sees as its death, rather than leaving calls unanswered."""
    registry = Registry(settings)
    heap.hold_freed_memory()  # a micro-batch's activations reuse the last one's memory
    if settings.freeze_heap:
        # Before any model loads: an evicted model's cycles must stay collectable (its `close`
        # collects them to give its GPU memory back).
        heap.freeze()
    heap.report_pauses()
    work: queue.PriorityQueue[tuple[int, int, tuple[Any, ...]]] = queue.PriorityQueue()
    outbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
    active: set[int] = set()  # calls queued or running: a cancel for any other is dropped
    canceled: set[int] = set()

    def read() -> None:
        arrival = itertools.count()
        while True:
            message = conn.recv()
            if message[0] == "cancel":
                if message[1] in active:
                    canceled.add(message[1])
            elif message[0] == "status":  # answered at once, even while a run goes on
                try:
                    outbox.put(("ok", message[1], status()))
                except Exception as exc:
                    outbox.put(("error", message[1], _portable(exc)))
            else:
                active.add(message[1])
                work.put((message[2], next(arrival), message))

    def write() -> None:
        while True:
            conn.send(outbox.get())

    def ending(loop: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                loop()
            except (EOFError, OSError):  # the worker is gone: so is its work
                os._exit(0)
            except BaseException:
                log.exception("the engine process's %s failed", loop.__name__)
                os._exit(1)
        return run

    def answer(kind: str, call_id: int, name: str, *args: Any) -> Any:
        engine = registry.get(name)
        if kind == "load":
            device = getattr(getattr(engine, "device", None), "type", "cpu")
            return {"task": engine.task, "model_hash": engine.model_hash, "device": str(device)}
        jobs, interval = args
        def send(done: int, total: int) -> bool:
            outbox.put(("step", call_id, done, total))
            return True

        step = throttled(send, interval)

        def progress(done: int, total: int) -> bool:
            step(done, total)
            return call_id not in canceled  # looked at every step: a cancel is a set lookup here

        with engine.watched(progress):
            done = forward(engine, jobs)
        done.results = [[_portable(r) if isinstance(r, Exception) else r for r in result]
                        if isinstance(result, list) else _portable(result) for result in done.results]
        return done

    for loop in (read, write):
        threading.Thread(target=ending(loop), name=f"engine-host-{loop.__name__}", daemon=True).start()
    outbox.put(("ready", -1))
    while True:
        _, _, (kind, call_id, _, *args) = work.get()
        try:
            reply: tuple[Any, ...] = ("ok", call_id, answer(kind, call_id, *args))
        except Exception as exc:
            reply = ("error", call_id, _portable(exc))
        active.discard(call_id)
        canceled.discard(call_id)
        outbox.put(reply)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(Connection(int(sys.argv[1])), get_settings())


if __name__ == "__main__":
    # From the module, not __main__: what the host pickles (exceptions rebuilt by `_rebuilt`) must
    # name functions the worker can import.
    from workers.engine_host import main as serve_module

    serve_module()
