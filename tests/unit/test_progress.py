"""`workers.progress.throttled`: the steps an engine in the worker process reports reach the Watch at
most once per interval, and the calls in between let the run go on."""

from workers.progress import throttled


def test_calls_within_the_interval_go_on_without_asking():
    asked: list[int] = []

    def stop(done: int, total: int) -> bool:
        asked.append(done)
        return False

    progress = throttled(stop, interval=3600)
    assert [progress(done, 10) for done in range(1, 6)] == [True] * 5 and asked == []


def test_each_call_after_the_interval_asks_and_passes_the_answer_on():
    answers = iter([True, False])
    asked: list[int] = []

    def watch(done: int, total: int) -> bool:
        asked.append(done)
        return next(answers)

    progress = throttled(watch, interval=0.0)
    assert (progress(1, 10), progress(2, 10)) == (True, False) and asked == [1, 2]
