"""Each worker process records itself in the `workers` table every few seconds: who it is, what it
computes on, the micro-batch in hand, how much it has done and how much memory it holds.

The dashboard reads the rows; the reconciler reads `heartbeat_at` to tell a dead worker from a busy
one and takes a dead worker's running jobs back at once, without waiting for their lease.

The row is written from the pool process that runs the micro-batches (Celery's prefork child,
concurrency 1), so a killed child stops its heartbeat even while the parent lives on, and the
child that replaces it takes the row over under the same name.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

from celery.signals import celeryd_after_setup, worker_process_init
from sqlalchemy import insert, update

from core.db import session_scope
from core.settings import Settings, get_settings
from core.tables import WorkerRow, utcnow

log = logging.getLogger(__name__)


def rss_bytes() -> int | None:
    """Resident bytes of this process."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class Presence:
    """This process's row in the workers table, refreshed by a daemon thread."""

    def __init__(self, settings: Settings, name: str, queues: Sequence[str]) -> None:
        self.settings = settings
        self.name = name
        self.queues = list(queues)
        self.started_at = utcnow()
        self.images_done = 0
        self.current: dict[str, Any] | None = None
        # Set by the task module once the engine registry exists: the profiles loaded now, and
        # with an engine process (`workers.engine_host`), its device and memory.
        self.profiles: Callable[[], list[str]] = list
        self.engine_status: Callable[[], dict[str, Any] | None] | None = None
        self._device: tuple[str, int | None] | None = None
        # The worker's resident and GPU memory as the last beat found them (None: not known yet),
        # for this process's gauges (`workers.telemetry`): with an engine process, both processes'
        # RSS and that process's GPU memory, which this one cannot see.
        self.memory: tuple[int | None, int | None] = (None, None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="worker-heartbeat", daemon=True)

    def hold(self, job_ids: Sequence[str], model: str) -> dict[str, Any]:
        """The micro-batch in hand from now; `let_go` with what this returns."""
        self.current = {"job_ids": list(job_ids), "model": model, "since": utcnow().isoformat() + "Z"}
        return self.current

    def let_go(self, held: dict[str, Any]) -> None:
        """Its forward pass is over; with an engine process the next one may be in hand already."""
        if self.current is held:
            self.current = None

    def _fields(self) -> dict[str, Any]:
        engine = self._engine()
        self.memory = (engine.get("rss_bytes"), engine.get("gpu_memory_bytes"))
        return {"host": socket.gethostname(), "pid": os.getpid(), "queues": self.queues, "profiles": self.profiles(),
                "current": self.current, "images_done": self.images_done, **engine, "heartbeat_at": utcnow()}

    def _engine(self) -> dict[str, Any]:
        """Device and memory: of this process, or where the engines run in a process of their own,
        of that one (asked, so this process never sets up a GPU of its own), with both RSS added."""
        if self.settings.engine_process:
            engine = None
            try:
                engine = self.engine_status() if self.engine_status is not None else None
            except Exception as exc:  # the engine process is still starting, or gone: next beat
                log.debug("engine process status: %s", exc)
            if engine is None:
                return {"device": "starting", "rss_bytes": rss_bytes()}
            return {**engine, "rss_bytes": (rss_bytes() or 0) + (engine["rss_bytes"] or 0)}
        from models.device import allocated_bytes, describe_device  # torch: only in worker processes

        if self._device is None:
            self._device = describe_device()
        return {"device": self._device[0], "device_memory_bytes": self._device[1], "rss_bytes": rss_bytes(),
                "gpu_memory_bytes": allocated_bytes()}

    def beat(self, stopped: bool = False) -> None:
        """Upsert the row. `draining` is left alone: operators set it."""
        fields = {**self._fields(), "stopped_at": utcnow() if stopped else None}
        with session_scope(self.settings.database_url) as session:
            updated = session.execute(update(WorkerRow).where(WorkerRow.name == self.name)
                                      .values(**fields, started_at=self.started_at))
            if not updated.rowcount:  # type: ignore[attr-defined]
                session.execute(insert(WorkerRow).values(name=self.name, started_at=self.started_at,
                                                         draining=False, **fields))

    def _loop(self) -> None:
        while True:
            try:
                self.beat()
            except Exception as exc:  # the database is down: the next beat tries again
                log.warning("worker heartbeat of %s not recorded: %s", self.name, exc)
            if self._stop.wait(self.settings.heartbeat_interval):
                return

    def start(self) -> Presence:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        try:
            self.beat(stopped=True)
        except Exception as exc:
            log.warning("worker %s could not record its shutdown: %s", self.name, exc)


_node: dict[str, Any] = {}
_presence: Presence | None = None


def current() -> Presence | None:
    """This process's presence, when it is a worker's pool process."""
    return _presence


@celeryd_after_setup.connect
def _remember_node(sender: str, instance: Any, **_: Any) -> None:
    # In the worker's main process, before the pool forks: the children inherit it.
    _node["name"] = sender
    _node["queues"] = sorted(instance.app.amqp.queues.consume_from or instance.app.amqp.queues)


@worker_process_init.connect
def _start(**_: Any) -> None:
    global _presence
    if "name" in _node:
        _presence = Presence(get_settings(), _node["name"], _node["queues"]).start()


def stop() -> None:
    """Record this pool process stopped (workers.signals calls it on its way out)."""
    if _presence is not None:
        _presence.stop()
