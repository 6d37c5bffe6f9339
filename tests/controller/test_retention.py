"""Retention against a real Redis: trimming keeps whatever any consumer still needs."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from redis.asyncio import Redis

from contracts import naming
from controller.definitions import Definitions
from controller.instance import WorkflowStatus
from controller.retention import (
    Retention,
    ensure_declared_groups,
    known_types,
    prune_status_indexes,
    trim_point,
    trim_streams,
)
from tests.conftest import eventually

P = 2
NO_AGE_FLOOR = -1.0  # the age floor a second ahead of the server clock: only the groups decide


async def ids(redis: Redis, stream: str) -> list[str]:
    entries: Any = await redis.xrange(stream)
    return [entry_id.decode() for entry_id, _ in entries]


async def add(redis: Redis, stream: str, count: int) -> list[str]:
    added: list[str] = []
    for i in range(count):
        entry_id: Any = await redis.xadd(stream, {"n": str(i)})
        added.append(entry_id.decode())
    return added


async def test_entries_every_group_received_and_acked_are_trimmed(redis: Redis) -> None:
    stream = naming.message_stream(0, "PaymentCaptured")
    added = await add(redis, stream, 10)
    for group in ("controller", "inventory"):
        await redis.xgroup_create(stream, group, id="0")
    # controller: read all 10, acked the first 6 (7..10 still pending)
    read: Any = await redis.xreadgroup("controller", "c", {stream: ">"}, count=10)
    await redis.xack(stream, "controller", *[entry_id for entry_id, _ in read[0][1][:6]])
    # inventory: read and acked the first 4 only; 5..10 not delivered yet
    read = await redis.xreadgroup("inventory", "i", {stream: ">"}, count=4)
    await redis.xack(stream, "inventory", *[entry_id for entry_id, _ in read[0][1]])
    assert await trim_streams(redis, [stream], min_age_s=NO_AGE_FLOOR) == 4
    assert await ids(redis, stream) == added[4:]
    # inventory catches up and acks: now the controller's pending entries bound the trim
    read = await redis.xreadgroup("inventory", "i", {stream: ">"}, count=10)
    await redis.xack(stream, "inventory", *[entry_id for entry_id, _ in read[0][1]])
    assert await trim_streams(redis, [stream], min_age_s=NO_AGE_FLOOR) == 2
    assert await ids(redis, stream) == added[6:]


async def test_young_entries_are_kept_for_consumers_nobody_declared(redis: Redis) -> None:
    stream = naming.message_stream(1, "PointsAwarded")
    await add(redis, stream, 5)
    assert await trim_streams(redis, [stream]) == 0  # nobody reads it, but it is young
    assert await trim_streams(redis, [stream], min_age_s=NO_AGE_FLOOR) == 5


async def test_a_group_that_read_nothing_keeps_everything(redis: Redis) -> None:
    stream = naming.message_stream(1, "ShipmentScheduled")
    added = await add(redis, stream, 3)
    await redis.xgroup_create(stream, "notification", id="0")
    assert await trim_streams(redis, [stream], min_age_s=NO_AGE_FLOOR) == 0
    assert await ids(redis, stream) == added


async def test_declared_participants_get_their_groups_before_they_first_run(redis: Redis) -> None:
    definitions = Definitions()
    await ensure_declared_groups(redis, definitions, P)
    await ensure_declared_groups(redis, definitions, P)  # idempotent
    stream = naming.message_stream(1, "InventoryReserved")
    groups: Any = await redis.xinfo_groups(stream)
    assert [g["name"] for g in groups] == [b"shipping"]
    refunds: Any = await redis.xinfo_groups(naming.message_stream(0, "RefundPayment"))
    assert [g["name"] for g in refunds] == [b"payment"]
    # orders arrive before any shipping worker ever ran; the controller has them all
    added = await add(redis, stream, 3)
    assert await trim_streams(redis, [stream], min_age_s=NO_AGE_FLOOR) == 0
    assert await ids(redis, stream) == added


async def test_known_types_include_what_live_participants_announce(redis: Redis) -> None:
    beat = {
        "participant": "loyalty",
        "consumer": "l1",
        "at_ms": 1,
        "subscriptions": [{"type": "PaymentCaptured"}, {"type": "PointsAwarded"}],
    }
    await redis.hset(naming.heartbeat_key(), "loyalty/l1", orjson.dumps(beat))
    await redis.hset(naming.heartbeat_key(), "broken/b1", b"{not json")
    types = await known_types(redis, Definitions())
    assert {"PointsAwarded", "PaymentCaptured", "TimerFired", "RefundPayment", "OrderSubmitted"} <= types


def test_trim_point_is_the_lowest_need_over_groups_and_age() -> None:
    groups = [
        {"name": b"a", "last-delivered-id": b"100-5", "pending": 0},
        {"name": b"b", "last-delivered-id": b"200-0", "pending": 2},
    ]
    assert trim_point(groups, {"b": "150-3"}, floor_ms=10**15) == "100-6"
    assert trim_point(groups, {"b": "90-0"}, floor_ms=10**15) == "90-0"
    assert trim_point(groups, {"b": "150-3"}, floor_ms=50) == "50-0"
    assert trim_point([], {}, floor_ms=70) == "70-0"


async def test_expired_finished_workflows_leave_the_status_indexes(redis: Redis) -> None:
    done = naming.status_index_key(0, WorkflowStatus.COMPLETED)
    running = naming.status_index_key(0, WorkflowStatus.RUNNING)
    await redis.zadd(done, {"old": 1_000, "new": 9_999_999_999_999})
    await redis.zadd(running, {"old-but-running": 1_000})
    assert await prune_status_indexes(redis, P, retention_s=3600) == 1
    assert await redis.zrange(done, 0, -1) == [b"new"]
    assert await redis.zrange(running, 0, -1) == [b"old-but-running"]


async def test_the_retention_loop_trims_after_its_interval_and_stops_promptly(redis: Redis) -> None:
    stream = naming.message_stream(0, "InventoryReserved")
    await add(redis, stream, 3)
    await redis.xgroup_create(stream, "shipping", id="$")  # everything before counts as delivered
    retention = Retention(redis, Definitions(), P, 3600, interval_s=0.05, min_age_s=NO_AGE_FLOOR)
    stop = asyncio.Event()
    task = asyncio.create_task(retention.run(stop))
    try:
        await eventually(lambda: ids(redis, stream), lambda left: left == [])
    finally:
        stop.set()
        await task
    assert retention.trimmed == 3
