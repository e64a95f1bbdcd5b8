from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from core import heap


@pytest.fixture
def collector() -> Iterator[None]:
    yield
    gc.unfreeze()


@pytest.mark.usefixtures("collector")
def test_what_lives_at_freeze_is_out_of_every_collection_and_what_comes_later_is_not() -> None:
    kept = [[i] for i in range(10_000)]  # a loaded model's or a connection pool's objects
    heap.freeze()
    assert not any(obj is kept for obj in gc.get_objects())  # a full collection no longer walks them
    # A model loaded after the freeze and evicted later: its cycles are still collected.
    model = Model()
    model.self = model
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None


class Model:
    self: Model
