"""The instance cache: bounded, least recently used out first, never back in time."""

from __future__ import annotations

import pytest

from contracts.definitions import ORDER_SAGA
from contracts.envelope import utcnow
from controller import state_machine
from controller.instance import Instance
from controller.instance_cache import InstanceCache


def instance(workflow_id: str, version: int = 1) -> Instance:
    started = state_machine.start(ORDER_SAGA, workflow_id, {"order": {}}, utcnow()).instance
    return started.model_copy(update={"version": version})


def test_the_least_recently_used_instance_leaves_first() -> None:
    cache = InstanceCache(2)
    cache.put(instance("a"))
    cache.put(instance("b"))
    assert cache.get("a") is not None  # "a" is now the most recently used
    cache.put(instance("c"))

    assert len(cache) == 2
    assert cache.get("b") is None
    assert cache.get("a") is not None
    assert cache.get("c") is not None


def test_a_later_version_is_not_replaced_by_an_earlier_one() -> None:
    cache = InstanceCache(10)
    cache.put(instance("a", version=3))
    cache.put(instance("a", version=2))
    assert cache.get("a").version == 3  # type: ignore[union-attr]
    cache.put(instance("a", version=4))
    assert cache.get("a").version == 4  # type: ignore[union-attr]


def test_it_holds_the_very_instance_it_was_given_not_an_equal_one() -> None:
    cache = InstanceCache(10)
    kept = instance("a")
    cache.put(kept)
    assert cache.holds(kept)
    assert not cache.holds(kept.model_copy())
    assert not cache.holds(instance("b"))


def test_a_forgotten_instance_is_gone_and_size_zero_keeps_nothing() -> None:
    cache = InstanceCache(10)
    cache.put(instance("a"))
    cache.forget("a")
    cache.forget("never-there")
    assert cache.get("a") is None

    off = InstanceCache(0)
    off.put(instance("a"))
    assert (len(off), off.get("a")) == (0, None)
    with pytest.raises(ValueError, match="must not be negative"):
        InstanceCache(-1)
