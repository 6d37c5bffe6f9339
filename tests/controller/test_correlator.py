"""The correlator against a real Redis: exactly-once effect, takeover, dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from contracts import naming
from contracts.definitions import ORDER_SAGA, WorkflowDefinition
from contracts.envelope import Envelope, encode, utcnow
from contracts.messages import CANCEL_REQUESTED
from controller import state_machine
from controller.correlator import Correlator
from controller.definitions import Definitions
from controller.instance import Instance, WorkflowStatus
from controller.store import IdempotencyConflict, WorkflowStore
from participants.sdk.commit import Outcome
from participants.sdk.consumer import RetryPolicy, entry_order
from tests.conftest import eventually
from tests.faults import refusing_writes, through_proxy

P = 4
HAPPY = ("OrderSubmitted", "PaymentCaptured", "InventoryReserved", "ShipmentScheduled", "CustomerNotified")
ORDER = {
    "customer_id": "c-1",
    "items": [{"sku": "A", "quantity": 1, "unit_price": "5.00"}],
    "currency": "USD",
    "ship_to": {"country": "US"},
}


async def assert_happy_history(store: WorkflowStore, workflow_id: str) -> None:
    """The workflow's history is the order saga's happy path, each event once, in order."""
    history = await store.history(workflow_id)
    assert [h.type for h in history] == list(HAPPY)
    assert [h.seq for h in history] == list(range(len(HAPPY)))


VALID = {
    "PaymentCaptured": {"order": ORDER, "payment_id": "pay-1", "amount": "5.00"},
    "InventoryReserved": {"order": ORDER, "reservation_id": "res-1"},
    "ShipmentScheduled": {"order": ORDER, "shipment_id": "shp-1"},
    "CustomerNotified": {"customer_id": "c-1"},
}
FAST = RetryPolicy(max_deliveries=3, base_ms=50, max_ms=200, claim_idle_ms=100)


@pytest.fixture
def store(redis: Redis) -> WorkflowStore:
    return WorkflowStore(redis, P)


def correlator(store: WorkflowStore, consumer: str = "c-1", policy: RetryPolicy = FAST, batch: int = 200) -> Correlator:
    return Correlator(
        store.redis, store, Definitions(), consumer, batch=batch, block_ms=20, policy=policy, pending_interval_s=0.05
    )


@pytest.fixture
async def running(store: WorkflowStore) -> AsyncIterator[Correlator]:
    worker = correlator(store)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    await eventually(lambda: _groups_ready(store), bool, what="consumer groups")
    try:
        yield worker
    finally:
        stop.set()
        await task


async def _groups_ready(store: WorkflowStore) -> bool:
    stream = naming.message_stream(0, "PaymentCaptured")
    return bool(await store.redis.exists(stream)) and bool(await store.redis.xinfo_groups(stream))


async def start_order(store: WorkflowStore) -> Instance:
    instance, created = await store.start(ORDER_SAGA, {"order": ORDER}, utcnow())
    assert created
    return instance


def envelope(instance: Instance, message_type: str, payload: dict[str, Any] | None = None, mid: str = "") -> Envelope:
    return Envelope(
        message_id=mid or f"{instance.id}-{message_type}",
        type=message_type,
        correlation_id=instance.id,
        workflow=instance.workflow,
        producer="test",
        occurred_at=utcnow(),
        payload=VALID.get(message_type, {}) if payload is None else payload,
    )


def fields_of(message: Envelope) -> dict[Any, Any]:
    return dict(encode(message))


async def emit(store: WorkflowStore, message: Envelope) -> None:
    partition = store.partition(message.correlation_id)
    await store.redis.xadd(naming.message_stream(partition, message.type), fields_of(message))


def status_is(*wanted: WorkflowStatus) -> Callable[[Instance | None], bool]:
    return lambda instance: instance is not None and instance.status in wanted


async def counter(correlator: Correlator, name: str) -> int:
    value: int = getattr(correlator, name)
    return value


async def dead_letters(redis: Redis) -> list[dict[str, str]]:
    rows = []
    for p in range(P):
        entries: Any = await redis.xrange(naming.dead_letter_stream(p))
        for _, fields in entries:
            rows.append({k.decode(): v.decode() for k, v in fields.items()})
    return rows


async def test_a_full_saga_is_correlated_to_completion(store: WorkflowStore, running: Correlator) -> None:
    instance = await start_order(store)
    for event in ("PaymentCaptured", "InventoryReserved", "ShipmentScheduled", "CustomerNotified"):
        await emit(store, envelope(instance, event))
    done = await eventually(lambda: store.load(instance.id), status_is(WorkflowStatus.COMPLETED))
    assert done is not None
    await assert_happy_history(store, instance.id)
    assert done.events == 5
    listed = await store.list(WorkflowStatus.COMPLETED)
    assert [w.id for w in listed] == [instance.id]
    assert await store.list(WorkflowStatus.RUNNING) == []
    # every correlated entry was acknowledged
    for p in range(P):
        for message_type in Definitions().event_types():
            pending = await store.redis.xpending(naming.message_stream(p, message_type), naming.CONTROLLER_GROUP)
            assert pending["pending"] == 0


async def test_a_duplicated_event_changes_nothing(store: WorkflowStore, running: Correlator) -> None:
    instance = await start_order(store)
    captured = envelope(instance, "PaymentCaptured", mid="dup-me")
    await emit(store, captured)
    await emit(store, captured)
    await emit(store, envelope(instance, "InventoryReserved"))
    await eventually(lambda: store.load(instance.id), lambda i: i is not None and i.events == 3)
    await eventually(lambda: counter(running, "duplicates"), lambda n: n == 1, what="the duplicate counted")
    history = await store.history(instance.id)
    assert [h.type for h in history].count("PaymentCaptured") == 1


async def test_commands_are_published_on_the_participants_stream(store: WorkflowStore, running: Correlator) -> None:
    instance = await start_order(store)
    await emit(store, envelope(instance, "PaymentCaptured"))
    await emit(store, envelope(instance, "InventoryUnavailable", {"reason": "short"}))
    await eventually(lambda: store.load(instance.id), status_is(WorkflowStatus.COMPENSATING))
    stream = naming.message_stream(store.partition(instance.id), "RefundPayment")
    entries: Any = await store.redis.xrange(stream)
    [(_, fields)] = entries
    assert fields[b"type"] == b"RefundPayment"
    assert fields[b"correlation_id"] == instance.id.encode()
    await emit(store, envelope(instance, "PaymentRefunded"))
    await eventually(lambda: store.load(instance.id), status_is(WorkflowStatus.COMPENSATED))


async def test_a_dead_controllers_batch_is_taken_over(store: WorkflowStore) -> None:
    instance = await start_order(store)
    dead = correlator(store, "dead")
    await dead.prepare()
    await emit(store, envelope(instance, "PaymentCaptured"))
    taken = await dead.reader.read(block_ms=100)
    assert taken  # read, never applied, never acked: the controller "crashed"
    live = correlator(store, "live")
    stop = asyncio.Event()
    task = asyncio.create_task(live.run(stop))
    try:
        done = await eventually(
            lambda: store.load(instance.id), lambda i: i is not None and i.step("payment").status == "completed"
        )
        assert done is not None
    finally:
        stop.set()
        await task


async def test_two_controllers_apply_each_event_exactly_once(store: WorkflowStore) -> None:
    instances = [await start_order(store) for _ in range(20)]
    stop = asyncio.Event()
    workers = [correlator(store, f"c-{i}") for i in range(2)]
    tasks = [asyncio.create_task(w.run(stop)) for w in workers]
    try:
        for event in ("PaymentCaptured", "InventoryReserved", "ShipmentScheduled", "CustomerNotified"):
            for instance in instances:
                await emit(store, envelope(instance, event))
        for instance in instances:
            await eventually(lambda i=instance: store.load(i.id), status_is(WorkflowStatus.COMPLETED))  # type: ignore[misc]
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    for instance in instances:
        assert [h.type for h in await store.history(instance.id)] == [
            "OrderSubmitted",
            "PaymentCaptured",
            "InventoryReserved",
            "ShipmentScheduled",
            "CustomerNotified",
        ]
    assert sum(w.applied for w in workers) == 20 * 4


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"type": "PaymentCaptured"}, "missing stream field 'correlation_id'"),
        ({"type": "PaymentCaptured", "correlation_id": "x", "message_id": "m", "envelope": "{"}, "invalid envelope"),
    ],
)
async def test_a_malformed_entry_is_dead_lettered_and_the_controller_goes_on(
    store: WorkflowStore, running: Correlator, fields: dict[str, str], reason: str
) -> None:
    await store.redis.xadd(naming.message_stream(0, "PaymentCaptured"), dict[Any, Any](fields))
    instance = await start_order(store)
    await emit(store, envelope(instance, "PaymentCaptured"))
    await eventually(
        lambda: store.load(instance.id), lambda i: i is not None and i.step("payment").status == "completed"
    )
    [letter] = await eventually(lambda: dead_letters(store.redis), lambda rows: len(rows) == 1)
    assert reason in letter["reason"]
    assert letter["source_stream"] == naming.message_stream(0, "PaymentCaptured")
    assert letter["group"] == naming.CONTROLLER_GROUP
    assert letter["deliveries"] == "1"
    assert letter["f:type"] == "PaymentCaptured"


async def test_events_of_unknown_workflows_and_bad_payloads_are_dead_lettered(
    store: WorkflowStore, running: Correlator
) -> None:
    instance = await start_order(store)
    ghost = instance.model_copy(update={"id": "no-such-workflow"})
    await emit(store, envelope(ghost, "PaymentCaptured"))
    await emit(store, envelope(instance, "PaymentDeclined", {"amount": "-1"}))  # reason missing, amount negative
    rows = await eventually(lambda: dead_letters(store.redis), lambda r: len(r) == 2)
    reasons = sorted(row["reason"] for row in rows)
    assert reasons[0].startswith("invalid PaymentDeclined payload at payload.")
    assert reasons[1] == "no such workflow 'no-such-workflow'"
    assert (await store.load(instance.id)).events == 1  # type: ignore[union-attr]


async def test_an_entry_on_the_wrong_stream_or_partition_is_dead_lettered(
    store: WorkflowStore, running: Correlator
) -> None:
    instance = await start_order(store)
    wrong_type = fields_of(envelope(instance, "PaymentCaptured"))
    await store.redis.xadd(naming.message_stream(store.partition(instance.id), "ShipmentFailed"), wrong_type)
    other = (store.partition(instance.id) + 1) % P
    await store.redis.xadd(naming.message_stream(other, "PaymentCaptured"), wrong_type)
    rows = await eventually(lambda: dead_letters(store.redis), lambda r: len(r) == 2)
    assert sorted(r["reason"] for r in rows) == [
        f"correlation_id {instance.id!r} belongs to another partition",
        "type 'PaymentCaptured' does not belong on the ShipmentFailed stream",
    ]


async def test_idempotency_key_maps_to_one_workflow(store: WorkflowStore) -> None:
    first, created = await store.start(ORDER_SAGA, {"order": ORDER}, utcnow(), idempotency_key="k")
    again, created_again = await store.start(ORDER_SAGA, {"order": ORDER}, utcnow(), idempotency_key="k")
    assert created
    assert not created_again
    assert again.id == first.id
    with pytest.raises(IdempotencyConflict):
        await store.start(ORDER_SAGA, {"order": {**ORDER, "currency": "EUR"}}, utcnow(), idempotency_key="k")
    stream = naming.message_stream(store.partition(first.id), "OrderSubmitted")
    assert await store.redis.xlen(stream) == 1  # the start event was published once


async def test_a_commit_chained_on_a_rejected_one_does_not_land(store: WorkflowStore) -> None:
    """Two events of one workflow decided on a snapshot that a cancel then overtook:
    the first commit fails its version check, and so must the second, chained on it —
    even though its expected version happens to be the one the cancel produced."""
    snapshot = await start_order(store)
    cancelled = await store.request(Definitions(), snapshot.id, CANCEL_REQUESTED, {"by": "op"}, utcnow())
    assert cancelled.version == snapshot.version + 1
    first = state_machine.transition(ORDER_SAGA, snapshot, envelope(snapshot, "PaymentCaptured"), utcnow())
    second_event = envelope(snapshot, "InventoryReserved")
    second = state_machine.transition(ORDER_SAGA, first.instance, second_event, utcnow())
    assert second.instance.version - 1 == cancelled.version  # the guard alone would let it through
    outcomes = await store.script.run(
        store.redis,
        [
            store.commit(snapshot, first),
            store.commit(first.instance, second, after=f"{snapshot.id}-PaymentCaptured"),
        ],
    )
    assert [o.outcome for o in outcomes] == [Outcome.CONFLICT, Outcome.CONFLICT]
    now = await store.load(snapshot.id)
    assert now is not None
    assert (now.status, now.error) == (WorkflowStatus.COMPENSATING, "cancelled by op")


async def test_a_finished_workflow_that_reopens_stops_expiring(store: WorkflowStore, running: Correlator) -> None:
    instance = await start_order(store)
    await emit(store, envelope(instance, "PaymentCaptured"))
    await emit(store, envelope(instance, "InventoryUnavailable", {"reason": "short"}))
    await eventually(lambda: store.load(instance.id), status_is(WorkflowStatus.COMPENSATING))
    await emit(store, envelope(instance, "PaymentRefunded"))
    await eventually(lambda: store.load(instance.id), status_is(WorkflowStatus.COMPENSATED))
    key = naming.instance_key(store.partition(instance.id), instance.id)
    assert await store.redis.ttl(key) > 0  # finished: kept for the retention time
    await emit(store, envelope(instance, "InventoryReserved"))  # a late success reopens it
    await eventually(lambda: store.load(instance.id), status_is(WorkflowStatus.COMPENSATING))
    p = store.partition(instance.id)
    for reopened in (key, naming.seen_key(p, instance.id), naming.history_key(p, instance.id)):
        assert await store.redis.ttl(reopened) == -1


# --- the instance cache ------------------------------------------------------------


@contextlib.asynccontextmanager
async def correlating(worker: Correlator) -> AsyncIterator[Correlator]:
    """``worker`` running until the block ends."""
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield worker
    finally:
        stop.set()
        await task


async def test_the_next_event_is_decided_on_the_instance_the_last_commit_left(
    store: WorkflowStore, running: Correlator
) -> None:
    instance = await start_order(store)
    hits, misses = store.cache.hits, store.cache.misses
    await emit(store, envelope(instance, "PaymentCaptured"))
    await eventually(lambda: counter(running, "applied"), lambda n: n == 1, what="the event applied")
    await emit(store, envelope(instance, "InventoryReserved"))
    await eventually(lambda: counter(running, "applied"), lambda n: n == 2, what="the event applied")

    assert (store.cache.hits - hits, store.cache.misses - misses) == (2, 0)  # no read from Redis
    cached = store.cache.get(instance.id)
    assert cached is not None
    assert cached == await store.load(instance.id)
    assert cached.version == 3
    await emit(store, envelope(instance, "ShipmentScheduled"))
    await emit(store, envelope(instance, "CustomerNotified"))
    # the correlator's count, not Redis: the commit lands before the correlator takes in its outcome
    await eventually(lambda: counter(running, "applied"), lambda n: n == 4, what="every event applied")
    assert status_is(WorkflowStatus.COMPLETED)(await store.load(instance.id))
    assert store.cache.get(instance.id) is None  # finished: it leaves the cache


async def test_a_controller_whose_cached_instance_another_controller_moved_on_reloads_and_decides_again(
    redis: Redis,
) -> None:
    first, second = WorkflowStore(redis, P), WorkflowStore(redis, P)
    a, b = correlator(first, "a"), correlator(second, "b")
    instance = await start_order(first)

    async def apply(worker: Correlator, event: str, version: int) -> None:
        async with correlating(worker):
            await emit(first, envelope(instance, event))
            await eventually(lambda: first.load(instance.id), lambda i: i is not None and i.version == version)

    await apply(a, "PaymentCaptured", 2)  # a caches version 2
    await apply(b, "InventoryReserved", 3)  # b moves the workflow on behind a's back
    assert first.cache.get(instance.id).version == 2  # type: ignore[union-attr]
    assert second.cache.get(instance.id) is None  # b read it from Redis: not a workflow b runs
    await apply(a, "ShipmentScheduled", 4)  # decided on version 2: refused, reloaded, decided again

    assert a.conflicts == 1
    assert (a.applied, b.applied) == (2, 1)
    done = await first.load(instance.id)
    assert done is not None
    assert [s.status for s in done.steps] == ["completed", "completed", "completed", "running"]
    history = await first.history(instance.id)
    assert [h.type for h in history] == ["OrderSubmitted", "PaymentCaptured", "InventoryReserved", "ShipmentScheduled"]
    assert [h.seq for h in history] == [0, 1, 2, 3]
    assert first.cache.get(instance.id) is None  # moved on elsewhere: read from Redis next time


async def test_a_message_that_cannot_be_applied_is_dead_lettered_once_when_its_workflow_is_decided_again(
    redis: Redis,
) -> None:
    # a definition changed under a running workflow: CustomerNotified now also starts a
    # step the workflow never had, so deciding it fails (a KeyError in the state machine)
    dumped = ORDER_SAGA.model_dump()
    audit = {"name": "audit", "participant": "auditor", "trigger": "CustomerNotified", "completed": "Audited"}
    changed = WorkflowDefinition.model_validate({**dumped, "steps": [*dumped["steps"], audit]})
    first, second = WorkflowStore(redis, P), WorkflowStore(redis, P)
    a = Correlator(redis, first, Definitions([changed]), "a", block_ms=20, policy=FAST)
    b = correlator(second, "b")
    await a.prepare()
    await b.prepare()
    instance = await start_order(first)  # `first` caches version 1
    await emit(first, envelope(instance, "PaymentCaptured"))
    await b.handle(await b.reader.read())  # b moves the workflow to version 2 behind a's cache
    await emit(first, envelope(instance, "InventoryReserved"))
    await emit(first, envelope(instance, "CustomerNotified"))

    await a.handle(await a.reader.read())  # refused on the stale copy, then decided again

    assert a.conflicts == 1
    letters = await dead_letters(redis)
    assert [letter["f:type"] for letter in letters] == ["CustomerNotified"]
    assert "KeyError" in letters[0]["reason"]
    assert a.dead_lettered == 1
    history = await first.history(instance.id)
    assert [h.type for h in history][-1] == "InventoryReserved"


async def test_two_controllers_with_caches_of_their_own_apply_each_event_exactly_once(redis: Redis) -> None:
    stores = [WorkflowStore(redis, P), WorkflowStore(redis, P)]
    # every other workflow started by each: each controller's cache holds half of them at first
    instances = [await start_order(stores[i % 2]) for i in range(20)]
    workers = [correlator(store, f"c-{i}") for i, store in enumerate(stores)]
    async with correlating(workers[0]), correlating(workers[1]):
        for event in ("PaymentCaptured", "InventoryReserved", "ShipmentScheduled", "CustomerNotified"):
            for instance in instances:
                await emit(stores[0], envelope(instance, event))
        for instance in instances:
            await eventually(lambda i=instance: stores[0].load(i.id), status_is(WorkflowStatus.COMPLETED))  # type: ignore[misc]
    for instance in instances:
        await assert_happy_history(stores[0], instance.id)
    assert sum(w.applied for w in workers) == 20 * 4
    assert sum(w.duplicates for w in workers) == 0


async def test_a_cached_workflow_that_expired_in_redis_is_not_brought_back(
    store: WorkflowStore, running: Correlator
) -> None:
    instance = await start_order(store)
    assert store.cache.get(instance.id) is not None
    p = store.partition(instance.id)
    keys = (naming.instance_key, naming.seen_key, naming.history_key)
    await store.redis.delete(*(key(p, instance.id) for key in keys))  # as retention expires them

    await emit(store, envelope(instance, "PaymentCaptured"))

    [letter] = await eventually(lambda: dead_letters(store.redis), lambda rows: len(rows) == 1)
    assert letter["reason"] == f"no such workflow {instance.id!r}"
    assert await store.load(instance.id) is None
    assert store.cache.get(instance.id) is None
    assert running.conflicts == 1


async def test_a_cached_instance_whose_workflow_took_another_course_at_the_same_version_is_refused(
    redis: Redis,
) -> None:
    first, second = WorkflowStore(redis, P), WorkflowStore(redis, P)
    old, _ = await first.start(ORDER_SAGA, {"order": ORDER}, utcnow(), idempotency_key="k-1")
    assert first.cache.get(old.id) is old  # first runs it, at version 1
    p = first.partition(old.id)
    await redis.delete(*(key(p, old.id) for key in (naming.instance_key, naming.seen_key, naming.history_key)))
    # expired, and started again with the same key elsewhere: the same id at the same version, another order
    other = {**ORDER, "customer_id": "c-2"}
    new, created = await second.start(ORDER_SAGA, {"order": other}, utcnow(), idempotency_key="k-1")
    assert (created, new.id, new.version) == (True, old.id, old.version)

    a = correlator(first, "a")
    async with correlating(a):
        await emit(first, envelope(new, "PaymentCaptured"))
        await eventually(lambda: first.load(new.id), lambda i: i is not None and i.version == 2)

    assert a.conflicts == 1  # decided on the stale copy: refused, reloaded, decided again
    done = await first.load(new.id)
    assert done is not None
    assert done.input["order"]["customer_id"] == "c-2"  # the new workflow's state, not the old one's
    assert [h.type for h in await first.history(new.id)] == ["OrderSubmitted", "PaymentCaptured"]


async def test_a_start_replaces_what_the_cache_kept_under_its_id(redis: Redis) -> None:
    store = WorkflowStore(redis, P)
    old, _ = await store.start(ORDER_SAGA, {"order": ORDER}, utcnow(), idempotency_key="k-2")
    a = correlator(store, "a")
    async with correlating(a):  # moves it to version 2, still cached
        await emit(store, envelope(old, "PaymentCaptured"))
        await eventually(lambda: store.load(old.id), lambda i: i is not None and i.version == 2)
    assert store.cache.get(old.id) is not None
    p = store.partition(old.id)
    await redis.delete(*(key(p, old.id) for key in (naming.instance_key, naming.seen_key, naming.history_key)))

    new, created = await store.start(ORDER_SAGA, {"order": ORDER}, utcnow(), idempotency_key="k-2")

    assert created
    assert store.cache.get(new.id) is new  # not the version-2 instance of the expired workflow


async def test_readiness_follows_redis_outages_and_an_outage_is_logged_once(
    redis: Redis, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="controller.correlator")
    async with through_proxy(redis_url) as (proxy, client):
        store = WorkflowStore(client, P)
        worker = correlator(store)
        stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(worker.run(stop, ready))
        try:
            await eventually(lambda: asyncio.sleep(0, ready.is_set()), bool, what="ready")
            proxy.go_down()  # every connection cut, new ones refused
            await eventually(lambda: asyncio.sleep(0, ready.is_set()), lambda is_set: not is_set, what="not ready")
            await eventually(lambda: asyncio.sleep(0, _failures(caplog)), lambda n: n >= 1, what="the outage logged")
            await eventually(
                lambda: asyncio.sleep(0, proxy.refused), lambda n: n >= 6, what="rounds failing"
            )  # 2 per round
            proxy.come_back()
            await eventually(lambda: asyncio.sleep(0, ready.is_set()), bool, what="ready again")
            instance = await start_order(WorkflowStore(redis, P))
            await emit(store, envelope(instance, "PaymentCaptured"))
            await eventually(lambda: counter(worker, "applied"), lambda n: n == 1, what="the event applied")
            await eventually(
                lambda: asyncio.sleep(0, sum("works again" in r.getMessage() for r in caplog.records)),
                bool,
                what="the recovery told, once it held for a second",
            )
        finally:
            stop.set()
            await task
    lines = [r.getMessage() for r in caplog.records if r.name == "controller.correlator"]
    assert sum("failed: ConnectionError" in line for line in lines) == 1, lines
    assert sum("works again" in line for line in lines) == 1, lines
    assert not [r for r in caplog.records if r.exc_info]  # no tracebacks for an outage


async def test_an_outage_spends_no_delivery_of_the_events_it_holds_up(redis: Redis) -> None:
    store = WorkflowStore(redis, P)
    instance = await start_order(store)
    worker = correlator(store)
    await worker.prepare()
    event = envelope(instance, "PaymentCaptured")
    await emit(store, event)
    stream = naming.message_stream(naming.partition_of(instance.id, P), "PaymentCaptured")
    stop = asyncio.Event()
    async with refusing_writes(redis):
        task = asyncio.create_task(worker.run(stop))
        try:
            # longer than FAST's three deliveries take: a retry through a claim would have
            # spent them and dead-lettered the event as "not applied after 3 deliveries"
            await eventually(lambda: counter(worker, "unavailable"), lambda n: n >= 4, what="commits refused")
            [entry] = await redis.xpending_range(stream, naming.CONTROLLER_GROUP, "-", "+", 1)
            assert entry["times_delivered"] == 1
        except BaseException:
            stop.set()
            await task
            raise
    try:
        await eventually(lambda: counter(worker, "applied"), lambda n: n == 1, what="the event applied")
    finally:
        stop.set()
        await task
    assert worker.dead_lettered == 0
    assert [h.type for h in await store.history(instance.id)] == ["OrderSubmitted", "PaymentCaptured"]
    assert int((await redis.xpending(stream, naming.CONTROLLER_GROUP))["pending"]) == 0


@pytest.mark.parametrize(
    "events", [["PaymentCaptured"], ["PaymentCaptured", "InventoryReserved"]], ids=["one commit", "a chain of two"]
)
async def test_commits_whose_reply_was_lost_are_applied_once_and_counted_as_applied(
    redis: Redis, redis_url: str, events: list[str]
) -> None:
    async with through_proxy(redis_url) as (proxy, client):
        store = WorkflowStore(client, P)
        instance = await start_order(store)
        worker = correlator(store)
        await worker.prepare()
        for event in events:
            await emit(store, envelope(instance, event))
        entries = await worker.reader.read(block_ms=100)
        assert len(entries) == len(events)  # one batch: chained commits in one pipeline
        # the connection's retry of the pipeline finds every commit made: each a duplicate
        proxy.drop_reply(b"EVALSHA", once=True)
        await worker.handle(entries)
    assert proxy.dropped == 1
    assert (worker.applied, worker.duplicates, worker.conflicts) == (len(events), 0, 0)
    assert store.cache.get(instance.id) is not None  # kept, as after any commit of its own
    history = await WorkflowStore(redis, P).history(instance.id)
    assert [h.type for h in history] == ["OrderSubmitted", *events]


def _failures(caplog: pytest.LogCaptureFixture) -> int:
    return sum("failed: " in r.getMessage() for r in caplog.records if r.name == "controller.correlator")


async def test_a_backlog_is_applied_in_time_order_across_streams(redis: Redis) -> None:
    store = WorkflowStore(redis, P)
    # a backlog of payments, and one workflow whose inventory answer came after its payment
    instances = [await start_order(store) for _ in range(24)]
    for instance in instances:
        await emit(store, envelope(instance, "PaymentCaptured"))
    late = instances[-1]
    # stream ids order entries across streams only to the millisecond (see Correlator._in_time):
    # the inventory answer comes in a later one, as a real one would
    payments = naming.message_stream(store.partition(late.id), "PaymentCaptured")
    newest: Any = await redis.xrevrange(payments, count=1)
    last_payment = newest[0][0]
    await eventually(redis.time, lambda now: now[0] * 1000 + now[1] // 1000 > entry_order(last_payment)[0])
    await emit(store, envelope(late, "InventoryReserved"))

    # small batches: the PaymentCaptured streams take several reads, InventoryReserved one
    worker = correlator(store, batch=4)
    async with correlating(worker):
        await eventually(lambda: counter(worker, "applied"), lambda n: n == 25, what="every event applied")

    assert [h.type for h in await store.history(late.id)] == ["OrderSubmitted", "PaymentCaptured", "InventoryReserved"]


async def test_a_backlog_applied_out_of_time_order_still_compensates_the_last_step_first(redis: Redis) -> None:
    store = WorkflowStore(redis, P)
    instances = [await start_order(store) for _ in range(30)]
    # as the workers produced them, but the shipping stream holds them newest workflow first:
    # a read takes an early workflow's payment and inventory with a late one's failure
    for message_type in ("PaymentCaptured", "InventoryReserved"):
        for instance in instances:
            await emit(store, envelope(instance, message_type))
    for instance in reversed(instances):
        await emit(store, envelope(instance, "ShipmentFailed", {"reason": "country XX not served"}))

    # one entry per stream per read: more than the few batches held back for time order
    worker = correlator(store, batch=1)
    async with correlating(worker):
        await eventually(lambda: counter(worker, "applied"), lambda n: n == 90, what="every event applied")

    early_failures = 0
    for instance in instances:
        history = [h.type for h in await store.history(instance.id)]
        early_failures += history.index("ShipmentFailed") < history.index("InventoryReserved")
    assert early_failures > 0  # the case under test did happen
    # every workflow undoes inventory first; the refund waits for InventoryReleased
    sent: dict[str, int] = {}
    for message_type in ("ReleaseInventory", "RefundPayment"):
        for p in range(P):
            sent[message_type] = sent.get(message_type, 0) + await redis.xlen(naming.message_stream(p, message_type))
    assert sent == {"ReleaseInventory": 30, "RefundPayment": 0}
