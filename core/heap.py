"""What a long-running process keeps for its whole life, left out of the cyclic garbage collector's
full collections, and the collections that still hold the process up, logged.

Now and then Python's collector walks everything alive, holding the interpreter. In the worker's
pool process, which imports torch, SQLAlchemy and Celery, such a collection walked about 350,000
objects for about 200 ms while every upload thread waited; with what exists at start frozen, none
over 50 ms was seen (`python -m bench.collector` compares both, pauses included).
"""

from __future__ import annotations

import gc
import logging
import time
from functools import cache
from typing import Any

log = logging.getLogger(__name__)

PAUSE_SECONDS = 0.05  # a collection longer than this is logged


def freeze() -> None:
    """Leave everything alive now (modules, pools) out of every later collection. Only where what is
    alive is what the process keeps: a frozen cycle is never collected, so a model loaded before
    the call and evicted later would keep its memory. Reference counting still frees acyclic
    garbage at once, and the collector still finds cycles made after the call."""
    gc.collect()
    gc.freeze()


@cache  # once per process
def report_pauses() -> None:
    """Log each collection that holds the process longer than PAUSE_SECONDS, with the number of
    objects the collector tracks (frozen ones aside): every thread of the process waited it out."""
    started = [0.0]

    def timed(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        held = time.perf_counter() - started[0]
        if held > PAUSE_SECONDS:
            log.warning("garbage collection (generation %d) held the process for %.0f ms; %d objects tracked",
                        info["generation"], held * 1000, len(gc.get_objects()))

    gc.callbacks.append(timed)
