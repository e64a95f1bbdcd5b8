"""What a long-running process keeps for its whole life, left out of the cyclic garbage collector's
full collections, and the collections that still hold the process up, logged; and the memory its
forward passes free, kept for the next ones (`hold_freed_memory`).

Now and then Python's collector walks everything alive, holding the interpreter. In the worker's
pool process, which imports torch, SQLAlchemy and Celery, such a collection walked about 350,000
objects for about 200 ms while every upload thread waited; with what exists at start frozen, none
over 50 ms was seen (`python -m bench.collector` compares both, pauses included).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import platform
import time
from functools import cache
from typing import Any

log = logging.getLogger(__name__)

PAUSE_SECONDS = 0.05  # a collection longer than this is logged
HELD_BYTES = 32 * 2**20  # glibc's own ceiling for its sliding mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters, from glibc's malloc.h


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


@cache  # once per process
def hold_freed_memory() -> bool:
    """Keep the memory a forward pass frees for the next one, instead of handing it back to the
    kernel to fault in again, page by page, each zeroed. Returns whether it applied (glibc only).

    By default glibc serves each allocation of 128 KiB or more (a tiny-SD micro-batch's activations
    are many such tensors) with an mmap of its own and unmaps it when freed, and it gives the top
    of its heap back past twice the largest block freed so far: every micro-batch faulted in its
    working set again, about 190 faults per 64 px image, and a raw tiny-SD loop ran 1.08 times as
    fast held (`python -m bench.malloc`). Here allocations under 32 MiB come from the heap and up to
    64 MiB of free space stays at its top: what glibc's sliding threshold would settle at on its
    own once the process had freed a 32 MiB block (a process that happened to, such as one that
    had handled a large manifest, ran its forward passes faster than a fresh one). Larger blocks
    (a 4x upscale's output) are still mapped and unmapped each time. The worker's RSS growth over
    thousands of mixed jobs stays in `python -m bench`'s figures (`worker_rss_growth_pct`)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, HELD_BYTES) and libc.mallopt(_M_TRIM_THRESHOLD, 2 * HELD_BYTES))
