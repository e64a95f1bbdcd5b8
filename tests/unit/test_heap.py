"""The collector's state is the whole interpreter's: each check runs in a Python of its own."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_what_lives_at_freeze_is_out_of_full_collections_and_what_comes_later_is_not() -> None:
    run_python("""
        import gc, weakref
        from core import heap

        kept = [[i] for i in range(10_000)]  # what a process imports and keeps
        heap.freeze()
        assert not any(obj is kept for obj in gc.get_objects())  # a full collection no longer walks it

        class Model:  # loaded after the freeze, evicted later: its cycles are still collected
            pass

        model = Model()
        model.self = model
        gone = weakref.ref(model)
        del model
        gc.collect()
        assert gone() is None
    """)


def test_a_collection_longer_than_the_limit_is_logged_with_its_generation_and_the_objects_tracked() -> None:
    result = run_python("""
        import gc, logging, os, sys
        from core import heap

        logging.basicConfig(level=logging.WARNING)
        heap.PAUSE_SECONDS = -1.0  # every collection counts as long
        heap.report_pauses()
        heap.report_pauses()  # once per process: one line per collection, not two
        gc.collect()
        sys.stderr.flush()
        os._exit(0)  # before the interpreter's own collection on the way out
    """)
    lines = [line for line in result.stderr.splitlines() if "garbage collection" in line]
    assert len(lines) == 1, result.stderr
    assert "(generation 2) held the process for" in lines[0] and "objects tracked" in lines[0]


def test_the_worker_state_is_built_after_the_freeze_so_a_dead_engine_process_handle_can_be_collected() -> None:
    result = run_python("""
        import gc
        from workers import tasks

        tasks._freeze()  # the main process, before the fork
        tasks._warm()  # the pool process
        _, engines, _, _ = tasks._worker_state()
        host = engines.host()  # the engine process's handle: replaced, it must be collectable
        try:
            print("tracked" if any(obj is host for obj in gc.get_objects()) else "frozen")
            assert gc.get_freeze_count() > 10_000  # the imports (torch among them) are frozen
        finally:
            engines.close()
    """)
    assert result.stdout.split() == ["tracked"]


FAULTS_PER_CYCLE = """
    import platform, resource, sys
    import numpy as np
    from core import heap

    if platform.libc_ver()[0] != "glibc":
        print("not glibc")
        raise SystemExit
    if sys.argv[1] == "held":
        assert heap.hold_freed_memory()

    def cycle():  # a forward pass's working set: tensors of 256 KiB to 8 MiB, written, then freed
        arrays = [np.ones(2**k // 4, dtype=np.float32) for k in range(18, 24) for _ in range(3)]
        del arrays

    cycle()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        cycle()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def faults_per_cycle(way: str) -> float | None:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(FAULTS_PER_CYCLE), way], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout.strip()
    return None if out == "not glibc" else float(out)


def test_held_freed_memory_is_reused_without_faulting_it_in_again() -> None:
    default, held = faults_per_cycle("default"), faults_per_cycle("held")
    if default is None or held is None:
        pytest.skip("mallopt's thresholds are glibc's")
    # 48 MiB written per cycle, 12,000 pages: by default glibc hands part of it back each time and
    # faults it in again (about 2,700 pages here); held, it reuses all of it.
    assert default > 1_000
    assert held < 10
