"""Auto-pipelining against a real Redis: the commands of one event-loop tick share one
round trip, each caller gets its own reply or error, and order is kept."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import pytest
from redis.asyncio import Connection, ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, ResponseError

from controller.embedded_redis import free_port
from participants.sdk.autopipeline import AutoPipelineRedis
from participants.sdk.scripts import Script
from tests.conftest import eventually


@dataclass
class Wire:
    """What the connections of one pool wrote: one write per round trip."""

    writes: int = 0


def counting(wire: Wire) -> type[Connection]:
    class CountingConnection(Connection):
        async def send_packed_command(self, command: bytes | str | Iterable[bytes], check_health: bool = True) -> None:
            wire.writes += 1
            await super().send_packed_command(command, check_health)

    return CountingConnection


@dataclass
class Counted:
    wire: Wire
    auto: AutoPipelineRedis
    plain: Redis
    """A plain client on the same pool, to compare with."""


@pytest.fixture
async def counted(redis_url: str, redis: Redis) -> AsyncIterator[Counted]:
    wire = Wire()
    pool = ConnectionPool.from_url(redis_url, connection_class=counting(wire))
    auto = AutoPipelineRedis(pool)
    await auto.ping()  # the connection's handshake is written before the counting that matters
    try:
        yield Counted(wire, auto, Redis(connection_pool=pool))
    finally:
        await auto.aclose()
        await pool.aclose()


async def test_the_commands_of_one_tick_share_one_round_trip_and_each_caller_gets_its_own_reply(
    counted: Counted, redis: Redis
) -> None:
    await redis.set("a", "1")
    await redis.hset("h", "f", "x")
    auto, wire = counted.auto, counted.wire

    before = wire.writes
    replies = await asyncio.gather(
        auto.get("a"), auto.hget("h", "f"), auto.incr("n"), auto.hgetall("h"), auto.exists("no")
    )
    assert list(replies) == [b"1", b"x", 1, {b"f": b"x"}, 0]  # each reply parsed for its own command
    assert wire.writes - before == 1

    before = wire.writes
    assert await asyncio.gather(*(counted.plain.get("a") for _ in range(5))) == [b"1"] * 5
    assert wire.writes - before >= 5  # what the same calls cost without auto-pipelining


async def test_an_error_reaches_only_the_command_that_caused_it(counted: Counted, redis: Redis) -> None:
    await redis.set("text", "abc")
    auto = counted.auto
    fails = Script("return redis.error_reply('no ' .. ARGV[1])")
    works = Script("return ARGV[1]")
    for script in (fails, works):
        await redis.script_load(script.source)

    before = counted.wire.writes
    results = await asyncio.gather(
        auto.incr("text"),
        auto.incr("n"),
        fails(auto, args=["luck"]),
        works(auto, args=["fine"]),
        auto.get("text"),
        return_exceptions=True,
    )
    assert counted.wire.writes - before == 1
    not_a_number, incremented, failed, worked, text = results
    assert isinstance(not_a_number, ResponseError)
    assert "not an integer" in str(not_a_number)
    assert isinstance(failed, ResponseError)
    assert str(failed) == "no luck"
    assert (incremented, worked, text) == (1, b"fine", b"abc")


async def test_commands_keep_the_order_their_caller_issued_them_in(counted: Counted, redis: Redis) -> None:
    auto = counted.auto

    async def handler(key: str) -> None:
        for n in range(20):
            await auto.rpush(key, n)

    await asyncio.gather(*(handler(f"list-{h}") for h in range(8)))  # interleaved round trips
    for h in range(8):
        assert await redis.lrange(f"list-{h}", 0, -1) == [str(n).encode() for n in range(20)]

    # issued in one tick without waiting in between: one pipeline, in the order issued
    await asyncio.gather(*(auto.rpush("burst", n) for n in range(50)))
    assert await redis.lrange("burst", 0, -1) == [str(n).encode() for n in range(50)]
    replies = await asyncio.gather(auto.set("k", "first"), auto.get("k"), auto.set("k", "second"), auto.get("k"))
    assert list(replies) == [True, b"first", True, b"second"]


async def test_scripts_are_loaded_again_after_script_flush(counted: Counted, redis: Redis) -> None:
    auto = counted.auto
    echo = Script("return ARGV[1]")
    registered = auto.register_script("return KEYS[1]")  # redis-py's own script objects work too
    assert await echo(auto, args=["before"]) == b"before"
    assert await registered(keys=["k"]) == b"k"

    await redis.script_flush()
    replies = await asyncio.gather(
        echo(auto, args=["x"]), echo(auto, args=["y"]), registered(keys=["z"]), auto.get("nothing")
    )
    assert list(replies) == [b"x", b"y", b"z", None]
    assert await redis.script_exists(echo.sha) == [True]


async def test_blocking_commands_take_their_own_connection(counted: Counted, redis: Redis) -> None:
    auto = counted.auto
    await redis.set("x", "1")
    # issued in the same tick: pipelined together, the GET would wait for the BLPOP
    blocked = asyncio.ensure_future(auto.blpop(["queue"], timeout=10))
    read = asyncio.ensure_future(auto.xread({"stream": "$"}, block=10_000))
    raw = asyncio.ensure_future(auto.execute_command("xread", "block", 10_000, "streams", "raw", "$"))  # any case
    got = asyncio.ensure_future(auto.get("x"))
    assert await asyncio.wait_for(got, 5) == b"1"
    assert not blocked.done()
    assert not read.done()
    assert not raw.done()
    await redis.rpush("queue", "item")
    await redis.xadd("stream", {"f": "v"})
    await redis.xadd("raw", {"g": "w"})
    assert (await asyncio.wait_for(raw, 5))[0][0] == b"raw"
    assert await asyncio.wait_for(blocked, 5) == (b"queue", b"item")
    entries = await asyncio.wait_for(read, 5)
    assert isinstance(entries, list)
    [[stream, [(_, fields)]]] = entries
    assert (stream, fields) == (b"stream", {b"f": b"v"})


async def test_pipelines_transactions_pubsub_and_locked_clients_work_as_on_a_plain_client(
    counted: Counted, redis: Redis
) -> None:
    auto = counted.auto
    async with auto.pipeline(transaction=True) as pipe:
        pipe.set("t", 1)
        pipe.incr("t")
        assert await pipe.execute() == [True, 2]

    async def bump(pipe: Redis) -> None:
        value = int(await pipe.get("t") or 0)
        pipe.multi()  # type: ignore[attr-defined]
        pipe.set("t", value + 1)

    await auto.transaction(bump, "t")
    assert await redis.get("t") == b"3"

    locked = auto.client()
    try:
        assert await locked.client_id() == await locked.client_id()
    finally:
        await locked.aclose()

    async with auto.pubsub() as pubsub:
        await pubsub.subscribe("news")
        await auto.publish("news", "hello")
        message = await eventually(
            lambda: pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1),
            lambda found: found is not None,
            what="the published message",
        )
    assert message is not None
    assert message["data"] == b"hello"


async def test_a_caller_cancelled_before_the_round_trip_drops_its_command(counted: Counted, redis: Redis) -> None:
    auto = counted.auto
    dropped = asyncio.ensure_future(auto.set("dropped", "1"))

    async def cancel_then_write() -> bool:
        dropped.cancel()  # it has queued its command, which has not been sent yet
        return bool(await auto.set("kept", "1"))

    kept = asyncio.create_task(cancel_then_write())
    assert await kept
    with pytest.raises(asyncio.CancelledError):
        await dropped
    assert await redis.exists("dropped") == 0
    assert await redis.get("kept") == b"1"


async def test_every_caller_of_a_round_trip_that_cannot_reach_the_server_gets_the_error() -> None:
    pool = ConnectionPool.from_url(f"redis://127.0.0.1:{free_port()}/0", retry=Retry(NoBackoff(), 0))
    auto = AutoPipelineRedis(pool)
    try:
        results = await asyncio.gather(auto.get("a"), auto.set("b", 1), auto.ping(), return_exceptions=True)
        assert all(isinstance(result, ConnectionError) for result in results), results
    finally:
        await auto.aclose()
        await pool.aclose()


async def test_closing_it_leaves_the_shared_pool_open(redis: Redis) -> None:
    auto = AutoPipelineRedis(redis.connection_pool)
    assert await auto.set("a", "1")
    await auto.aclose()
    assert await redis.get("a") == b"1"
