"""Redis clients with settings that suit blocking stream readers."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis

# Blocking reads (XREADGROUP BLOCK) must return well before the socket times out,
# or redis-py would treat a quiet stream as a dead connection.
SOCKET_TIMEOUT_S = 10.0
MAX_BLOCK_MS = 2_000
MAX_CONNECTIONS = 64


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
        client_name=name,
        decode_responses=False,
    )
    return Redis.from_pool(pool)
