"""Timers in Redis: set by commits on the server clock, fired once into the stream."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis

from contracts import naming
from contracts.envelope import WorkflowRef, decode
from contracts.messages import TIMER_FIRED
from controller.timers import TimerPoller, fire_due, timer_member
from participants.sdk.commit import Commit, CommitScript
from tests.conftest import eventually

P = 4
REF = WorkflowRef(name="order", version=3)


async def fired_entries(redis: Redis) -> list[Any]:
    entries: list[Any] = []
    for p in range(P):
        found: Any = await redis.xrange(naming.message_stream(p, TIMER_FIRED))
        entries += found
    return entries


async def test_a_due_timer_becomes_a_decodable_timer_fired_message(redis: Redis) -> None:
    member = timer_member("wf-1", "step:shipping", 7, REF)
    await CommitScript().run(redis, [Commit().zadd_in(naming.timers_key(2), 0, member)])
    assert await fire_due(redis, range(P)) == 1
    [(_, fields)] = await fired_entries(redis)
    envelope = decode(fields)
    assert envelope.type == TIMER_FIRED
    assert envelope.correlation_id == "wf-1"
    assert envelope.message_id == f"timer:{member}"
    assert envelope.workflow == REF
    assert envelope.payload["timer"] == "step:shipping"
    assert envelope.payload["generation"] == 7
    server_s, server_us = await redis.time()
    server_now = datetime.fromtimestamp(server_s + server_us / 1e6, UTC)
    assert abs((server_now - envelope.occurred_at).total_seconds()) < 5
    assert abs(envelope.payload["due_ms"] / 1000 - envelope.occurred_at.timestamp()) < 1
    assert await redis.zcard(naming.timers_key(2)) == 0


async def test_a_timer_not_yet_due_waits(redis: Redis) -> None:
    member = timer_member("wf-2", "sla", 1, REF)
    await CommitScript().run(redis, [Commit().zadd_in(naming.timers_key(0), 60_000, member)])
    assert await fire_due(redis, range(P)) == 0
    score = await redis.zscore(naming.timers_key(0), member)
    server_s, _ = await redis.time()
    assert score is not None
    assert 59_000 <= score - server_s * 1000 <= 61_000  # the deadline is on the server's clock


async def test_each_timer_fires_once_with_several_pollers(redis: Redis) -> None:
    commits = [
        Commit().zadd_in(naming.timers_key(i % P), (i % 5) * 20, timer_member(f"wf-{i}", "sla", 1, REF))
        for i in range(400)
    ]
    await CommitScript().run(redis, commits)
    stop = asyncio.Event()
    pollers = [TimerPoller(redis, P, interval_s=0.01) for _ in range(3)]
    tasks = [asyncio.create_task(poller.run(stop)) for poller in pollers]
    try:
        await eventually(lambda: fired_entries(redis), lambda e: len(e) >= 400, what="400 timers fired")
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    entries = await fired_entries(redis)
    ids = [fields[b"message_id"] for _, fields in entries]
    assert len(ids) == len(set(ids)) == 400
    assert sum(poller.fired for poller in pollers) == 400
    assert [await redis.zcard(naming.timers_key(p)) for p in range(P)] == [0] * P


async def test_a_poller_stops_promptly(redis: Redis) -> None:
    stop = asyncio.Event()
    poller = TimerPoller(redis, P, interval_s=0.5)
    task = asyncio.create_task(poller.run(stop))
    await eventually(lambda: redis.ping(), bool)  # let the poller enter its wait
    started = time.monotonic()
    stop.set()
    await task
    assert time.monotonic() - started < 0.5
