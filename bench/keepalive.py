"""A lean HTTP/1.1 client for the load generator: POSTs over a pool of keep-alive connections.

On a 2-core machine the load generator competes for the same cores as the system it
measures, so every microsecond it spends is one the controller and the workers do
not get.  aiohttp's client costs about 150 µs of CPU per request here; this one,
an :class:`asyncio.Protocol` per connection that writes a pre-built request and
parses only the status line and ``Content-Length``, costs a fraction of that.

It speaks just what the benchmark needs: one request at a time per connection,
responses with a ``Content-Length`` (every JSON answer of the controller has one),
``Connection: close`` honoured.  Anything else is an :class:`HttpError`.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit


class HttpError(Exception):
    """The connection failed or the server answered something this client does not speak."""


_HEAD_END = b"\r\n\r\n"
_MAX_HEAD = 64 * 1024


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = False
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is not None and not self.waiter.done():
            self._complete(self.waiter)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(HttpError(f"connection closed before a full response ({exc or 'EOF'})"))

    def _complete(self, waiter: asyncio.Future[tuple[int, bytes]]) -> None:
        end = self.buffer.find(_HEAD_END)
        if end < 0:
            if len(self.buffer) > _MAX_HEAD:
                waiter.set_exception(HttpError("response head over 64 KiB"))
            return
        head = bytes(self.buffer[:end]).split(b"\r\n")
        try:
            status = int(head[0].split(b" ", 2)[1])
        except (IndexError, ValueError):
            waiter.set_exception(HttpError(f"bad status line {head[0][:100]!r}"))
            return
        length: int | None = None
        for line in head[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                self.close_after = True
        if length is None:
            waiter.set_exception(HttpError(f"HTTP {status} without Content-Length"))
            return
        total = end + len(_HEAD_END) + length
        if len(self.buffer) < total:
            return
        body = bytes(self.buffer[end + len(_HEAD_END) : total])
        del self.buffer[:total]
        waiter.set_result((status, body))

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        waiter: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self.waiter = waiter
        self.transport.write(request)
        try:
            return await waiter
        finally:
            self.waiter = None


class KeepAliveClient:
    """``await client.post(path, body)`` -> (status, body), on at most ``limit`` connections."""

    def __init__(self, base_url: str, *, limit: int = 256) -> None:
        url = urlsplit(base_url)
        if url.scheme != "http" or url.hostname is None:
            raise ValueError(f"only http://host:port URLs are supported, got {base_url!r}")
        self.host = url.hostname
        self.port = url.port or 80
        self.prefix = url.path.rstrip("/")
        self._host_header = f"{self.host}:{self.port}".encode()
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(limit)
        self._all: set[_Connection] = set()

    def request_bytes(self, path: str, body: bytes, content_type: str = "application/json") -> bytes:
        """The whole request, built once: callers that send the same request shape reuse nothing else."""
        return b"".join(
            (
                b"POST ",
                (self.prefix + path).encode(),
                b" HTTP/1.1\r\nHost: ",
                self._host_header,
                b"\r\nContent-Type: ",
                content_type.encode(),
                b"\r\nContent-Length: ",
                str(len(body)).encode(),
                b"\r\n\r\n",
                body,
            )
        )

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        request = self.request_bytes(path, body)
        async with self._slots:
            connection = await self._connection()
            try:
                answer = await connection.exchange(request)
            except BaseException:
                self._discard(connection)
                raise
            if connection.close_after or connection.closed:
                self._discard(connection)
            else:
                self._idle.append(connection)
            return answer

    async def _connection(self) -> _Connection:
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                return connection
            self._all.discard(connection)
        loop = asyncio.get_running_loop()
        try:
            _, connection = await loop.create_connection(_Connection, self.host, self.port)
        except OSError as exc:
            raise HttpError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        self._all.add(connection)
        return connection

    def _discard(self, connection: _Connection) -> None:
        self._all.discard(connection)
        if connection.transport is not None:
            connection.transport.close()

    async def close(self) -> None:
        for connection in list(self._all):
            self._discard(connection)
        self._idle.clear()

    async def __aenter__(self) -> KeepAliveClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
