import pytest

from core.status import (
    TERMINAL,
    BatchStatus,
    JobStatus,
    batch_status,
    can_transition,
    sources_of,
)


def test_terminal_statuses_never_move():
    for status in TERMINAL:
        for target in JobStatus:
            assert not can_transition(status, target)


def test_the_lifecycle():
    assert can_transition(JobStatus.QUEUED, JobStatus.RUNNING)
    assert can_transition(JobStatus.RUNNING, JobStatus.QUEUED)  # lost worker, retried
    assert can_transition(JobStatus.RUNNING, JobStatus.SUCCEEDED)
    assert not can_transition(JobStatus.SUCCEEDED, JobStatus.RUNNING)
    assert not can_transition(JobStatus.QUEUED, JobStatus.SUCCEEDED)  # only a run produces outputs


def test_sources_feed_conditional_updates():
    assert set(sources_of(JobStatus.CANCELED)) == {JobStatus.QUEUED, JobStatus.RUNNING}
    assert sources_of(JobStatus.RUNNING) == [JobStatus.QUEUED]


@pytest.mark.parametrize(("counts", "canceled", "expected"), [
    ({"queued": 3}, False, BatchStatus.QUEUED),
    ({"queued": 2, "succeeded": 1}, False, BatchStatus.RUNNING),
    ({"running": 1}, False, BatchStatus.RUNNING),
    ({"succeeded": 2, "failed": 1}, False, BatchStatus.COMPLETED),
    ({"failed": 3}, False, BatchStatus.FAILED),
    ({"canceled": 2, "succeeded": 1}, True, BatchStatus.CANCELED),
    ({"queued": 1, "canceled": 2}, True, BatchStatus.RUNNING),
])
def test_batch_status_is_derived_from_counts(counts, canceled, expected):
    assert batch_status(counts, canceled) == expected
