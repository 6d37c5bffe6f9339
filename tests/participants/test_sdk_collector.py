"""The garbage-collector settings of long-running consumers."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from participants.sdk import collector


@pytest.fixture
def restored() -> Iterator[None]:
    thresholds = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


@pytest.mark.usefixtures("restored")
def test_tune_freezes_what_exists_and_collects_young_objects_less_often() -> None:
    collector.tune()

    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[0] == collector.YOUNG_THRESHOLD


@pytest.mark.usefixtures("restored")
def test_cycles_made_after_tuning_are_still_collected() -> None:
    collector.tune()
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b

    gc.collect()

    assert gone() is None
