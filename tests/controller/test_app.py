"""The controller process's application: its settings reach the parts they configure."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiohttp import ClientError, ClientSession
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from controller import api
from controller.app import create_app, serve
from controller.embedded_redis import free_port
from controller.settings import ControllerSettings
from tests.conftest import eventually

P = 4


@pytest.mark.parametrize("access_log", [False, True])
async def test_a_line_per_request_is_logged_only_with_the_access_log_on(
    redis: Redis, redis_url: str, caplog: pytest.LogCaptureFixture, access_log: bool
) -> None:
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    port = free_port()
    settings = ControllerSettings(redis_url=redis_url, port=port, partitions=P, block_ms=50, access_log=access_log)
    stop = asyncio.Event()
    serving = asyncio.create_task(serve(settings, stop))
    try:
        async with ClientSession(base_url=f"http://127.0.0.1:{port}") as session:

            async def health() -> int:
                try:
                    async with session.get("/healthz") as response:
                        return response.status
                except ClientError:
                    return 0

            await eventually(health, lambda status: status == 200, what="the controller serving")
    finally:
        stop.set()
        await serving
    logged = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert any('"GET /healthz HTTP/1.1" 200' in line for line in logged) is access_log, logged


@pytest.mark.parametrize("size", [0, 25])
async def test_the_instance_cache_has_the_size_the_settings_give(redis: Redis, redis_url: str, size: int) -> None:
    app = create_app(ControllerSettings(redis_url=redis_url, partitions=P, block_ms=50, instance_cache_size=size))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        assert app[api.STORE].cache.size == size
    finally:
        await server.close()
