"""Clients from ``connect``: commands packed by hiredis, byte for byte as redis-py packs them."""

from __future__ import annotations

from typing import Any

import pytest
from redis import exceptions as errors
from redis.asyncio import Redis
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.exceptions import DataError

from participants.sdk.connection import HiredisConnection, HiredisUnixConnection, connect, unavailable

COMMANDS: list[tuple[Any, ...]] = [
    ("SET", "key", "value"),
    ("EVALSHA", "0123abcd", 2, "ss:{3}:wf:x", b"ss:{3}:hist:x", "hset", "5", "1", "v", "7", "s", b"{" * 70_000),
    ("CLIENT SETNAME", "worker-1"),
    (b"CONFIG GET", b"maxmemory"),
    ("ZADD", "timers", 1.5, "m", 0.1, "n", 1e20, "o", -3, "p"),
    ("HSET", "h", "é", "ünïcode", bytearray(b"raw"), memoryview(b"view")),
    ("XADD", "s", "*", "f", ""),
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: str(c[0]))
def test_a_command_is_packed_exactly_as_redis_py_packs_it(command: tuple[Any, ...]) -> None:
    assert b"".join(HiredisConnection().pack_command(*command)) == b"".join(Connection().pack_command(*command))


@pytest.mark.parametrize("bad", [None, True, object()])
def test_an_argument_redis_cannot_take_is_refused_as_redis_py_refuses_it(bad: object) -> None:
    with pytest.raises(DataError):
        Connection().pack_command("SET", "k", bad)  # type: ignore[arg-type]
    with pytest.raises(DataError):
        HiredisConnection().pack_command("SET", "k", bad)  # type: ignore[arg-type]


def test_the_urls_scheme_still_chooses_the_transport() -> None:
    tcp = connect("redis://127.0.0.1:1/0")
    unix = connect("unix:///tmp/no-such.sock")
    assert tcp.connection_pool.connection_class is HiredisConnection
    assert unix.connection_pool.connection_class is HiredisUnixConnection
    assert issubclass(HiredisUnixConnection, UnixDomainSocketConnection)


async def test_a_url_asking_for_another_encoding_is_served_in_it(redis_url: str) -> None:
    # hiredis packs text as UTF-8: such a client keeps redis-py's packing, which honours the URL
    client: Redis = connect(f"{redis_url}{'&' if '?' in redis_url else '?'}encoding=latin-1")
    try:
        assert client.connection_pool.connection_class is Connection
        await client.set("latin", "é")
        assert await client.get("latin") == b"\xe9"
    finally:
        await client.delete("latin")
        await client.aclose()


async def test_commands_and_pipelines_round_trip_through_a_real_server(redis_url: str) -> None:
    client: Redis = connect(redis_url, name="packing-test")
    try:
        await client.flushdb()
        big = b"\x00\xff" * 50_000
        assert await client.set("k", big)
        assert await client.get("k") == big
        async with client.pipeline(transaction=True) as pipe:
            pipe.hset("h", mapping={"é": "ü", "n": 3})
            pipe.hgetall("h")
            _, found = await pipe.execute()
        assert found == {"é".encode(): "ü".encode(), b"n": b"3"}
        assert await client.client_getname() == "packing-test"  # set by CLIENT SETNAME on connect
    finally:
        await client.aclose()


async def test_a_pooled_connection_the_server_closed_is_replaced_not_failed(redis: Redis, redis_url: str) -> None:
    # as after a Redis restart: every idle connection of the pool is dead, and each
    # would fail its next command once, however long after the restart that is
    client = connect(redis_url, name="victim")
    try:
        await client.set("k", "1")
        async with client.pipeline(transaction=False) as pipe:
            pipe.get("k")
            await pipe.execute()
        assert await _kill(redis, "victim") == 1

        assert await client.get("k") == b"1"
        assert await _kill(redis, "victim") == 1
        async with client.pipeline(transaction=False) as pipe:
            pipe.get("k")
            pipe.incr("n")
            assert await pipe.execute() == [b"1", 1]
    finally:
        await client.aclose()


async def _kill(redis: Redis, name: str) -> int:
    """Close, from the server's side, every connection of the clients called ``name``."""
    killed = 0
    for client in await redis.client_list():
        if client["name"] == name:
            killed += await redis.client_kill_filter(_id=client["id"])
    return killed


def test_an_outage_is_waited_out_but_refused_credentials_are_not() -> None:
    for outage in (
        errors.ConnectionError("gone"),
        errors.TimeoutError("slow"),
        errors.BusyLoadingError("loading"),
        errors.OutOfMemoryError("oom"),
        errors.ReadOnlyError("a replica"),
    ):
        assert unavailable(outage), outage
    for refusal in (
        errors.AuthenticationError("wrong password"),  # a ConnectionError to redis-py
        errors.AuthorizationError("no ACL"),
        errors.ResponseError("WRONGTYPE"),
    ):
        assert not unavailable(refusal), refusal
