"""Redis clients with settings that suit blocking stream readers."""

from __future__ import annotations

import codecs
from typing import Any

import hiredis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    DataError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

# Blocking reads (XREADGROUP BLOCK) must return well before the socket times out,
# or redis-py would treat a quiet stream as a dead connection.
SOCKET_TIMEOUT_S = 10.0
MAX_BLOCK_MS = 2_000
DEFAULT_BLOCK_MS = 1_000
"""How long a reader blocks by default: also how long a stop may wait for its read."""
MAX_CONNECTIONS = 64
REFUSING_WRITES = (OutOfMemoryError, ReadOnlyError)
"""What Redis answers when it is reachable but takes no writes (out of memory under noeviction, a replica)."""
_REFUSALS = ("OOM command not allowed", "-OOM ", "READONLY ", "-READONLY ")
_OWN = "streamsaga_own_redis"


def refusing_writes(error: BaseException) -> bool:
    """Whether Redis answered that it takes no writes now: out of memory under ``noeviction``, a
    replica.  Redis 7 says so in an error redis-py types; Redis 6.2 wraps it, inside a script, in
    a plain ``ERR Error running script … -OOM …``."""
    if isinstance(error, REFUSING_WRITES):
        return True
    return isinstance(error, ResponseError) and any(refusal in str(error) for refusal in _REFUSALS)


def unavailable(error: BaseException) -> bool:
    """Whether ``error`` says Redis cannot be used just now: unreachable, too slow, loading
    (connection errors, timeouts) or refusing writes — not that it refused these credentials,
    or this command, which no waiting mends.  An outage to wait out, never a message's fault,
    so a consumer retries what it hit without spending a delivery."""
    if isinstance(error, AuthenticationError | AuthorizationError):
        return False
    return isinstance(error, RedisConnectionError | RedisTimeoutError) or refusing_writes(error)


def mark_own(error: BaseException) -> None:
    """Note that ``error`` came from a participant's own Redis (its runner's client), so that an
    outage there is told from a failure of anything else a handler uses (see :func:`own`)."""
    setattr(error, _OWN, True)


def own(error: BaseException) -> bool:
    return bool(getattr(error, _OWN, False))


class _HiredisPacking(AbstractConnection):
    """Commands packed by hiredis (C) rather than by redis-py's asyncio connection
    (Python, which re-joins the buffer for every argument): a commit's EVALSHA with
    ~70 arguments took about 50 µs to pack, hiredis packs it in about 5.  The
    synchronous redis-py client does the same when hiredis is installed."""

    def pack_command(self, *args: EncodableT) -> list[bytes]:
        first = args[0]
        if isinstance(first, str):  # a command name may carry literal words: "CLIENT SETNAME"
            args = (*first.encode().split(), *args[1:])
        elif isinstance(first, bytes) and b" " in first:
            args = (*first.split(), *args[1:])
        try:
            # hiredis's stub types the tuple as of one item; any number is packed
            return [hiredis.pack_command(args)]  # type: ignore[arg-type]
        except TypeError:
            pass
        # hiredis takes str, bytes, memoryview, int and float; redis-py sends a bytearray as bytes
        plain = tuple(bytes(arg) if isinstance(arg, bytearray) else arg for arg in args)
        try:
            return [hiredis.pack_command(plain)]  # type: ignore[arg-type]
        except TypeError as exc:  # as redis-py's own encoder refuses None, bools, objects
            raise DataError(f"cannot send {args[0]!r} with an argument of that type: {exc}") from exc


class HiredisConnection(_HiredisPacking, Connection):
    pass


class HiredisSSLConnection(_HiredisPacking, SSLConnection):
    pass


class HiredisUnixConnection(_HiredisPacking, UnixDomainSocketConnection):
    pass


_PACKING: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: HiredisConnection,
    SSLConnection: HiredisSSLConnection,
    UnixDomainSocketConnection: HiredisUnixConnection,
}


def connect(url: str, *, name: str | None = None, max_connections: int = MAX_CONNECTIONS) -> Redis:
    """A client for ``url``; the caller closes it (``await client.aclose()``).

    The pool blocks when all its connections are busy: a burst of requests waits
    for a connection instead of failing with "Too many connections".
    """
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=SOCKET_TIMEOUT_S,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=5.0,
        health_check_interval=30,
        # a pooled connection the server closed (Redis restarted, a proxy or firewall dropped
        # it) fails once on its next use, however late: one immediate retry on a fresh
        # connection.  A retried write may land twice: commits dedupe (message ids, version
        # checks, done-records, a dead letter's pending entry), and claims leave alone what
        # they no longer find.  Timeouts are not retried:
        # Redis is slow or gone.
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        client_name=name,
        decode_responses=False,
    )
    # the URL's scheme chose the connection class (TCP, TLS, Unix socket): keep it, packed by
    # hiredis — which writes text as UTF-8, so a URL that asks for another encoding keeps redis-py's
    if codecs.lookup(pool.connection_kwargs.get("encoding", "utf-8")).name == "utf-8":
        pool.connection_class = _PACKING.get(pool.connection_class, pool.connection_class)
    return Redis.from_pool(pool)


def text(value: Any) -> str:
    """A value from a Redis reply (bytes: clients from :func:`connect` do not decode) as text;
    bytes that are not UTF-8 are shown with replacement characters rather than refused."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
