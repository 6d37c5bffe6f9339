"""The load generator's HTTP client against a real aiohttp server over a real socket."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from bench.keepalive import HttpError, KeepAliveClient


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, list[int]]]:
    """A server that echoes the body, and records the peer port of every request (one per connection)."""
    peers: list[int] = []

    async def echo(request: web.Request) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]
        body = await request.read()
        if request.path == "/close":
            return web.Response(body=body, headers={"Connection": "close"})
        if request.path == "/stream":
            response = web.StreamResponse()  # chunked: no Content-Length
            await response.prepare(request)
            await response.write(body)
            return response
        return web.json_response({"got": body.decode(), "type": request.content_type}, status=202)

    app = web.Application()
    app.router.add_post("/{tail:.*}", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", peers
    finally:
        await runner.cleanup()


async def test_posts_reuse_one_connection(server: tuple[str, list[int]]) -> None:
    url, peers = server
    async with KeepAliveClient(url) as client:
        answers = [await client.post("/v1/orders", f'{{"n": {n}}}'.encode()) for n in range(5)]
    assert answers == [(202, f'{{"got": "{{\\"n\\": {n}}}", "type": "application/json"}}'.encode()) for n in range(5)]
    assert len(set(peers)) == 1  # keep-alive: every request on the same connection


async def test_concurrent_posts_use_at_most_limit_connections(server: tuple[str, list[int]]) -> None:
    url, peers = server
    async with KeepAliveClient(url, limit=3) as client:
        answers = await asyncio.gather(*(client.post("/x", str(n).encode()) for n in range(30)))
    assert sorted(status for status, _ in answers) == [202] * 30
    assert {body for _, body in answers} == {
        f'{{"got": "{n}", "type": "application/json"}}'.encode() for n in range(30)
    }
    assert 1 <= len(set(peers)) <= 3


async def test_connection_close_is_honoured(server: tuple[str, list[int]]) -> None:
    url, peers = server
    async with KeepAliveClient(url) as client:
        assert await client.post("/close", b"a") == (200, b"a")
        assert await client.post("/close", b"b") == (200, b"b")
    assert len(set(peers)) == 2  # the second request needed a new connection


async def test_a_response_without_length_is_an_error(server: tuple[str, list[int]]) -> None:
    url, _ = server
    async with KeepAliveClient(url) as client:
        with pytest.raises(HttpError, match="without Content-Length"):
            await client.post("/stream", b"x")
        assert (await client.post("/ok", b"y"))[0] == 202  # the bad connection was dropped, not reused


async def test_refused_connection_is_an_error() -> None:
    with socket.socket() as probe:  # a port nobody listens on: bound, never listened, then closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with KeepAliveClient(f"http://127.0.0.1:{port}") as client:
        with pytest.raises(HttpError, match="cannot connect"):
            await client.post("/", b"")
