"""The per-output stage clock the worker uses for encode and upload timings."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from workers.stopwatch import Stopwatch


def test_sums_each_keys_time_per_stage_across_threads():
    clock = Stopwatch()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda key: clock.time("encode", key, lambda s: time.sleep(s) or key, 0.05),
                                ["a", "b", "a"]))
    assert results == ["a", "b", "a"]
    assert clock.total("encode", ["a"]) >= 0.1  # both calls of "a", however they overlapped
    assert clock.total("encode", ["b"]) >= 0.05
    assert clock.total("upload", ["a", "b"]) == 0.0  # another stage was never timed
    assert clock.total("encode", []) == 0.0


def test_a_failing_call_still_counts_and_raises():
    clock = Stopwatch()

    def broken() -> None:
        time.sleep(0.02)
        raise OSError("storage down")

    with pytest.raises(OSError, match="storage down"):
        clock.time("upload", "k", broken)
    assert clock.total("upload", ["k"]) >= 0.02
