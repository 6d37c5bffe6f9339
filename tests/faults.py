"""Network faults between our processes and Redis, injected by a proxy on a real socket."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

from redis.asyncio import Redis

from participants.sdk.connection import connect


class RedisProxy:
    """A TCP proxy in front of the test's Redis that can fail the way networks do.

    * :meth:`drop_reply`: a request naming a command is passed on to Redis, and the
      client's connection is then closed instead of answered: Redis did the work, the
      client never hears so (``once``: only the first such request; the client's retry
      on a fresh connection gets through).
    * :meth:`go_down` / :meth:`come_back`: every connection is closed, and new ones are
      closed at once, until it comes back: Redis unreachable.
    """

    def __init__(self, upstream: str) -> None:
        parsed = urlsplit(upstream)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 6379
        self.path = parsed.path
        self.dropped = 0
        self.refused = 0  # connections closed at once while down
        self._drop: bytes | None = None
        self._once = False
        self._down = False
        self._open: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}{self.path}"

    def drop_reply(self, command: bytes | None, *, once: bool = False) -> None:
        """Lose the reply to the next requests naming ``command`` (None: stop)."""
        self._drop = command.upper() if command else None
        self._once = once

    def go_down(self) -> None:
        self._down = True
        for writer in list(self._open):
            writer.close()

    def come_back(self) -> None:
        self._down = False

    async def __aenter__(self) -> RedisProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._open):
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        if self._down:
            self.refused += 1
            client_out.close()
            return
        upstream_in, upstream_out = await asyncio.open_connection(self.host, self.port)
        self._open.update((client_out, upstream_out))
        doomed = asyncio.Event()

        async def requests() -> None:
            while chunk := await client_in.read(65536):
                if self._drop is not None and self._drop in chunk.upper():
                    doomed.set()
                    if self._once:
                        self._drop = None
                upstream_out.write(chunk)
                await upstream_out.drain()

        async def replies() -> None:
            while chunk := await upstream_in.read(65536):
                if doomed.is_set():
                    self.dropped += 1
                    return  # the reply is lost with the connection
                client_out.write(chunk)
                await client_out.drain()

        tasks = [asyncio.create_task(requests()), asyncio.create_task(replies())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for writer in (client_out, upstream_out):
            writer.close()
            self._open.discard(writer)


@contextlib.asynccontextmanager
async def through_proxy(redis_url: str) -> AsyncIterator[tuple[RedisProxy, Redis]]:
    """A :class:`RedisProxy` in front of ``redis_url`` and a client connected through it,
    both closed on leaving."""
    async with RedisProxy(redis_url) as proxy:
        client = connect(proxy.url)
        try:
            yield proxy, client
        finally:
            await client.aclose()


@contextlib.asynccontextmanager
async def refusing_writes(redis: Redis) -> AsyncIterator[None]:
    """The test's Redis out of memory under ``noeviction`` for the block: it answers reads
    and refuses every write (``OOM command not allowed…``), as a full production Redis does."""
    before = {name: str((await redis.config_get(name))[name]) for name in ("maxmemory", "maxmemory-policy")}
    await redis.config_set("maxmemory-policy", "noeviction")
    await redis.config_set("maxmemory", 1)  # anything it holds is over
    try:
        yield
    finally:
        for name, value in before.items():
            await redis.config_set(name, value)
