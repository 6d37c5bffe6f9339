"""Fixtures of the end-to-end tests: a deployment of real processes and an HTTP client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from tests.e2e.deployment import Deployment


@pytest.fixture
def deployment(redis: Redis, redis_url: str, tmp_path: Path) -> Iterator[Deployment]:
    # `redis` flushed the database: every deployment starts on a clean slate
    running = Deployment(redis_url, tmp_path)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        yield client
