"""Network faults between our processes and Redis, injected by a proxy on a real socket."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit


class ReplyDroppingProxy:
    """A TCP proxy in front of the test's Redis.  While ``armed`` it passes a request
    that names ``command`` on to Redis and then closes the client's connection instead
    of answering: Redis did the work, the client never hears so.  ``once`` disarms it
    after the first drop, so the client's retry on a fresh connection gets through."""

    def __init__(self, upstream: str, command: bytes, *, once: bool = False) -> None:
        parsed = urlsplit(upstream)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 6379
        self.path = parsed.path
        self.command = command.upper()
        self.once = once
        self.armed = False
        self.dropped = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}{self.path}"

    async def __aenter__(self) -> ReplyDroppingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        upstream_in, upstream_out = await asyncio.open_connection(self.host, self.port)
        doomed = asyncio.Event()

        async def requests() -> None:
            while chunk := await client_in.read(65536):
                if self.armed and self.command in chunk.upper():
                    doomed.set()
                    if self.once:
                        self.armed = False
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
