"""GroupReader: how much a read and a pending scan take, what pending() hands back for another
try, and what it leaves alone."""

from __future__ import annotations

import contextlib
import re
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from contracts import naming
from controller.embedded_redis import EmbeddedRedis, bundled_server
from participants.sdk.connection import connect, text, unavailable
from participants.sdk.consumer import READ_BOUND, GroupReader, RetryPolicy, create_groups
from tests.conftest import eventually
from tests.faults import refusing_writes, through_proxy

STREAM = naming.message_stream(0, "Ping")
POLICY = RetryPolicy(max_deliveries=5, base_ms=10, max_ms=10, claim_idle_ms=60_000)


async def deliveries(redis: Redis, entry_id: str) -> int:
    rows: Any = await redis.xpending_range(STREAM, "g", entry_id, entry_id, 1)
    return int(rows[0]["times_delivered"])


async def test_entries_the_caller_still_holds_are_not_claimed_or_counted(redis: Redis) -> None:
    reader = GroupReader(redis, "g", "me", [STREAM], policy=POLICY)
    await reader.ensure_groups()
    held: Any = await redis.xadd(STREAM, {"n": "1"})
    failed: Any = await redis.xadd(STREAM, {"n": "2"})
    held_id, failed_id = held.decode(), failed.decode()
    assert len(await reader.read(block_ms=100)) == 2
    # both are past this consumer's own backoff; only the one it does not hold is due
    retry, exhausted = await eventually(
        lambda: reader.pending(exclude={(STREAM, held_id)}), lambda found: bool(found[0])
    )
    assert [entry.id for entry in retry] == [failed_id]
    assert exhausted == []
    assert await deliveries(redis, held_id) == 1
    assert await deliveries(redis, failed_id) == 2


async def test_a_retry_counts_its_claim_and_a_given_up_entry_the_deliveries_it_had(redis: Redis) -> None:
    reader = GroupReader(redis, "g", "me", [STREAM], policy=RetryPolicy(max_deliveries=2, base_ms=10, max_ms=10))
    await reader.ensure_groups()
    added: Any = await redis.xadd(STREAM, {"n": "1"})
    entry_id = added.decode()
    assert len(await reader.read(block_ms=100)) == 1  # delivery 1, never acked

    retry, _ = await eventually(reader.pending, lambda found: bool(found[0]))
    assert [(entry.id, entry.deliveries) for entry in retry] == [(entry_id, 2)]  # the claim is delivery 2
    _, exhausted = await eventually(reader.pending, lambda found: bool(found[1]))

    # given up after its 2 deliveries: the dead letter's count agrees with its reason
    assert [(entry.id, entry.deliveries) for entry in exhausted] == [(entry_id, 2)]


async def pending_rows(redis: Redis) -> dict[str, tuple[str, int]]:
    """entry id -> (owner, ms idle)"""
    rows: Any = await redis.xpending_range(STREAM, "g", "-", "+", 100)
    return {row["message_id"].decode(): (row["consumer"].decode(), int(row["time_since_delivered"])) for row in rows}


async def test_hold_sets_the_idle_time_of_the_entries_it_still_owns_and_leaves_a_peers_claim_alone(
    redis: Redis,
) -> None:
    me = GroupReader(redis, "g", "me", [STREAM], policy=POLICY)
    await me.ensure_groups()
    ids = [text(await redis.xadd(STREAM, {"n": str(n)})) for n in range(3)]
    assert len(await me.read(block_ms=100)) == 3
    kept, taken, deferred = ids
    await redis.xclaim(STREAM, "g", "me", 0, [kept], idle=50_000, justid=True)  # long in hand
    # a peer took one over while this consumer stalled
    await redis.xclaim(STREAM, "g", "peer", 0, [taken], justid=True)

    held = await me.hold([(STREAM, [kept, taken], 0), (STREAM, [deferred], 90_000)])

    assert held == [1, 1]
    rows = await pending_rows(redis)
    assert [rows[entry_id][0] for entry_id in ids] == ["me", "peer", "me"]
    assert rows[kept][1] < 50_000
    assert rows[deferred][1] >= 90_000
    assert await deliveries(redis, kept) == 1  # a refresh is not a delivery


async def test_a_read_over_many_busy_streams_takes_about_a_batch_not_a_batch_per_stream(redis: Redis) -> None:
    streams = [naming.message_stream(p, "Ping") for p in range(16)]
    reader = GroupReader(redis, "g", "me", streams, count=40)
    await reader.ensure_groups()
    async with redis.pipeline(transaction=False) as pipe:
        for stream in streams:
            for n in range(100):
                pipe.xadd(stream, {"n": str(n)})
        await pipe.execute()

    # COUNT is per stream in Redis: 40 each would own 640 entries at once
    sizes = [len(await reader.read(block_ms=100)) for _ in range(5)]
    assert all(size <= 40 for size in sizes), sizes
    assert sizes[1:] == [32] * 4  # 16 busy streams: 2 each, about a batch

    # one busy stream left: it gets more of the batch, but never so much that a burst on
    # every stream could take more than READ_BOUND batches at once
    hot = naming.message_stream(0, "Hot")
    alone = GroupReader(redis, "g", "me", [*streams, hot], count=40)
    await alone.ensure_groups()
    for stream in streams:
        await redis.xtrim(stream, maxlen=0)
    for n in range(200):
        await redis.xadd(hot, {"n": str(n)})
    sizes = [len(await alone.read(block_ms=100)) for _ in range(3)]
    bound = READ_BOUND * 40 // 17
    assert sizes == [2, bound, bound]  # the first read still assumes every stream busy
    for stream in streams:  # a burst everywhere: 40 each would be 640 at once
        for n in range(40):
            await redis.xadd(stream, {"n": f"burst-{n}"})
    assert len(await alone.read(block_ms=100)) <= READ_BOUND * 40


async def test_a_pending_scan_claims_at_most_a_batch(redis: Redis) -> None:
    streams = [naming.message_stream(p, "Ping") for p in range(4)]
    dead = GroupReader(redis, "g", "dead", streams, count=1000)
    await dead.ensure_groups()
    for stream in streams:
        for n in range(30):
            await redis.xadd(stream, {"n": str(n)})
    owned = await dead.read(block_ms=100)
    assert len(owned) == 120  # a peer that then died holding them, a minute ago
    for stream in streams:
        ids: list[Any] = [entry.id for entry in owned if entry.stream == stream]
        await redis.xclaim(stream, "g", "dead", 0, ids, idle=60_000, justid=True)

    live = GroupReader(redis, "g", "live", streams, count=50, policy=RetryPolicy(claim_idle_ms=5_000))
    held: set[tuple[str, str]] = set()  # in flight at the live consumer: not due again
    taken = []
    for _ in range(3):
        retry, exhausted = await eventually(lambda: live.pending(exclude=held), lambda found: bool(found[0]))
        assert exhausted == []
        taken.append(len(retry))
        held.update((entry.stream, entry.id) for entry in retry)
    assert taken == [50, 50, 20]
    assert len(held) == 120


async def test_entries_whose_claim_reply_was_lost_stay_pending_for_the_next_scan(redis: Redis, redis_url: str) -> None:
    dead = GroupReader(redis, "g", "dead", [STREAM])
    await dead.ensure_groups()
    for n in range(5):
        await redis.xadd(STREAM, {"n": str(n)})
    owned = await dead.read(block_ms=100)
    ids: list[Any] = [entry.id for entry in owned]
    await redis.xclaim(STREAM, "g", "dead", 0, ids, idle=60_000, justid=True)  # its owner died a minute ago

    async with through_proxy(redis_url) as (proxy, client):
        policy = RetryPolicy(base_ms=1_000, claim_idle_ms=5_000)  # the check below comes well within the backoff
        live = GroupReader(client, "g", "live", [STREAM], policy=policy)
        proxy.drop_reply(b"XCLAIM", once=True)
        # the claim lands but its reply is lost; the retry finds them no longer idle
        assert await live.pending() == ([], [])
        assert proxy.dropped == 1
        owners = {entry_id: owner for entry_id, (owner, _) in (await pending_rows(redis)).items()}
        assert owners == dict.fromkeys(ids, "live")
        # not acked as if gone: after this consumer's backoff they are handed back
        retry, _ = await eventually(live.pending, lambda found: bool(found[0]))
    assert sorted(entry.id for entry in retry) == sorted(ids)


async def test_a_pending_entry_deleted_from_its_stream_is_acked_not_claimed_for_ever(redis: Redis) -> None:
    # Redis 7 drops a deleted entry from the pending list when it is claimed; 6.2, which the
    # embedded fallback bundles, keeps it and answers nil: run this against the bundled one
    bundled = bundled_server()
    with EmbeddedRedis(binary=bundled) if bundled else contextlib.nullcontext() as server:
        client = connect(server.url) if server is not None else redis
        try:
            await _deleted_entry_is_acked(client)
        finally:
            if server is not None:
                await client.aclose()


async def _deleted_entry_is_acked(redis: Redis) -> None:
    dead = GroupReader(redis, "g", "dead", [STREAM])
    await dead.ensure_groups()
    kept, deleted = await redis.xadd(STREAM, {"n": "kept"}), await redis.xadd(STREAM, {"n": "deleted"})
    assert len(await dead.read(block_ms=100)) == 2
    await redis.xdel(STREAM, deleted)
    ids: list[Any] = [kept, deleted]
    await redis.xclaim(STREAM, "g", "dead", 0, ids, idle=60_000, justid=True)

    live = GroupReader(redis, "g", "live", [STREAM], policy=RetryPolicy(claim_idle_ms=5_000))
    retry, exhausted = await live.pending()

    assert ([entry.id for entry in retry], exhausted) == ([text(kept)], [])
    assert set(await pending_rows(redis)) == {text(kept)}  # the deleted one no longer pending


async def test_a_group_redis_refuses_to_create_fails_as_an_outage_naming_it(redis: Redis) -> None:
    stream = naming.message_stream(0, "Brandnew")
    async with refusing_writes(redis):
        with pytest.raises(ResponseError, match=f"cannot create group 'g' on {re.escape(stream)}") as raised:
            await create_groups(redis, [(stream, "g")])
    assert unavailable(raised.value)  # so a consumer starting meanwhile waits it out
