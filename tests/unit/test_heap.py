"""The collector's state is the whole interpreter's: each check runs in a Python of its own."""

from __future__ import annotations

import subprocess
import sys
import textwrap


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
