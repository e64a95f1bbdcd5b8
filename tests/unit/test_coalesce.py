import threading
import time

from core.coalesce import Coalescer
from core.dispatch import Planned


def job(i: int) -> Planned:
    return Planned(f"j{i}", "tiny-sd|generate|64x64|4|7.5", 4096, "interactive")


def test_jobs_arriving_together_leave_together():
    sent: list[list[str]] = []
    coalescer = Coalescer(lambda jobs: sent.append([j.id for j in jobs]), window_seconds=0.5)
    for i in range(5):
        coalescer.add([job(i)])
    deadline = time.monotonic() + 10
    while not sent:  # the window closes with no more arrivals: sent without waiting for close()
        assert time.monotonic() < deadline, "the window never closed"
        time.sleep(0.05)
    coalescer.add([job(5)])  # after the window: a micro-batch of its own
    coalescer.close()  # sends what is still waiting
    assert sent == [["j0", "j1", "j2", "j3", "j4"], ["j5"]]


def test_a_failing_sink_does_not_stop_the_coalescer():
    calls = []
    done = threading.Event()

    def sink(jobs):
        calls.append(len(jobs))
        if len(calls) == 1:
            raise ConnectionError("redis down")
        done.set()

    coalescer = Coalescer(sink, window_seconds=0.01)
    coalescer.add([job(0)])
    time.sleep(0.1)
    coalescer.add([job(1)])
    assert done.wait(2)
    coalescer.close()
    assert calls == [1, 1]
