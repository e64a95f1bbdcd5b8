"""Cross-cutting concerns in Celery signals, not in task bodies: how long each task took."""

from __future__ import annotations

import logging
import time
from typing import Any

from celery.signals import task_postrun, task_prerun

log = logging.getLogger("workers.timing")
_started: dict[str, float] = {}


@task_prerun.connect
def _start(task_id: str | None = None, **_: Any) -> None:
    if task_id:
        _started[task_id] = time.perf_counter()


@task_postrun.connect
def _stop(task_id: str | None = None, task: Any = None, retval: Any = None, state: str | None = None,
          **_: Any) -> None:
    began = _started.pop(task_id or "", None)
    if began is not None:
        log.info("%s %s in %.3fs: %s", getattr(task, "name", "task"), state, time.perf_counter() - began, retval)

