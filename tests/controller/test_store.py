"""The store against a real Redis: starts made together share one round trip."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from contracts import naming
from contracts.definitions import ORDER_SAGA
from contracts.envelope import utcnow
from controller.instance import Instance, WorkflowStatus
from controller.store import IdempotencyConflict, WorkflowStore, mark, workflow_id_for
from participants.sdk.commit import Commit, CommitResult, CommitScript
from tests.controller.test_correlator import ORDER, P


class CountingScript(CommitScript):
    """The real commit script, remembering how many commits each call (one round trip) carried."""

    def __init__(self) -> None:
        super().__init__()
        self.runs: list[int] = []

    async def run_each(self, redis: Redis, commits: list[Commit]) -> list[CommitResult | ResponseError]:
        self.runs.append(len(commits))
        return await super().run_each(redis, commits)


@pytest.fixture
def script() -> CountingScript:
    return CountingScript()


@pytest.fixture
def store(redis: Redis, script: CountingScript) -> WorkflowStore:
    return WorkflowStore(redis, P, script=script)


def started(outcome: tuple[Instance, bool] | BaseException) -> tuple[Instance, bool]:
    assert not isinstance(outcome, BaseException), outcome
    return outcome


async def start_events(store: WorkflowStore) -> list[str]:
    """The workflow ids of every start event published, in all partitions."""
    ids = []
    for p in range(P):
        entries: Any = await store.redis.xrange(naming.message_stream(p, ORDER_SAGA.start))
        ids += [fields[b"correlation_id"].decode() for _, fields in entries]
    return ids


async def test_starts_made_in_one_tick_share_one_round_trip_and_each_gets_its_own_outcome(
    store: WorkflowStore, script: CountingScript
) -> None:
    order, other = {"order": ORDER}, {"order": {**ORDER, "currency": "EUR"}}
    outcomes = await asyncio.gather(
        *(store.start(ORDER_SAGA, order, utcnow()) for _ in range(8)),
        store.start(ORDER_SAGA, order, utcnow(), idempotency_key="k"),
        store.start(ORDER_SAGA, order, utcnow(), idempotency_key="k"),  # the same request again
        store.start(ORDER_SAGA, other, utcnow(), idempotency_key="k"),  # the key with another body
        return_exceptions=True,
    )

    assert script.runs == [11]
    fresh = [started(outcome) for outcome in outcomes[:8]]
    assert all(created for _, created in fresh)
    assert len({instance.id for instance, _ in fresh}) == 8
    (first, first_created), (again, again_created) = started(outcomes[8]), started(outcomes[9])
    assert (first_created, again_created) == (True, False)
    assert again.id == first.id
    assert isinstance(outcomes[10], IdempotencyConflict)
    assert outcomes[10].workflow_id == first.id
    for instance, _ in [*fresh, (first, True)]:
        assert await store.load(instance.id) == instance
    assert sorted(await start_events(store)) == sorted([instance.id for instance, _ in fresh] + [first.id])

    await store.start(ORDER_SAGA, order, utcnow())  # a later tick: a round trip of its own
    assert script.runs == [11, 1]


async def test_a_start_whose_commit_fails_fails_alone(store: WorkflowStore, script: CountingScript) -> None:
    broken = workflow_id_for(ORDER_SAGA.name, "broken")
    # its dedupe set is not a set: its commit script call fails with WRONGTYPE
    await store.redis.set(naming.seen_key(store.partition(broken), broken), "not a set")

    outcomes = await asyncio.gather(
        store.start(ORDER_SAGA, {"order": ORDER}, utcnow()),
        store.start(ORDER_SAGA, {"order": ORDER}, utcnow(), idempotency_key="broken"),
        store.start(ORDER_SAGA, {"order": ORDER}, utcnow()),
        return_exceptions=True,
    )

    assert isinstance(outcomes[1], ResponseError)
    assert "WRONGTYPE" in str(outcomes[1])
    (first, first_created), (last, last_created) = started(outcomes[0]), started(outcomes[2])
    assert (first_created, last_created) == (True, True)  # started, not replayed
    assert script.runs == [3]  # one round trip, each caller told its own outcome
    good = [first, last]
    for instance in good:
        assert await store.load(instance.id) == instance
    assert await store.load(broken) is None
    assert sorted(await start_events(store)) == sorted(instance.id for instance in good)  # each published once


async def test_starts_cache_the_instance_they_created(store: WorkflowStore) -> None:
    instance, _ = await store.start(ORDER_SAGA, {"order": ORDER}, utcnow())

    assert store.cache.get(instance.id) is instance
    assert await store.load_for_update([instance.id]) == {instance.id: instance}


async def test_statuses_says_each_workflows_status_and_none_for_one_it_does_not_have(redis: Redis) -> None:
    store = WorkflowStore(redis, P)
    started, _ = await store.start(ORDER_SAGA, {"order": ORDER}, utcnow())

    found = await store.statuses([started.id, "no-such-workflow"])

    assert found == {started.id: WorkflowStatus.RUNNING, "no-such-workflow": None}


async def test_the_progress_stream_keeps_about_as_many_records_as_asked(redis: Redis) -> None:
    capped = WorkflowStore(redis, 1, progress_maxlen=10)
    await asyncio.gather(*(capped.start(ORDER_SAGA, {"order": ORDER}, utcnow()) for _ in range(300)))
    # one record per start; trimming drops whole stream nodes (100 entries each) only
    assert 10 <= await redis.xlen(naming.progress_stream(0)) <= 110


async def test_an_instance_keeps_the_mark_controllers_of_earlier_versions_compare(store: WorkflowStore) -> None:
    instance, _ = await store.start(ORDER_SAGA, {"order": ORDER}, utcnow())
    fields: Any = await store.redis.hmget(naming.instance_key(store.partition(instance.id), instance.id), "m", "c")
    assert fields == [mark(instance).encode(), instance.commit.encode()]
