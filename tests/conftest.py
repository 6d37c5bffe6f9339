"""Fixtures: a real redis-server started for the test run, on a free port.

Set REDIS_URL to run against a server of your own instead (its database is
flushed before every test).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import orjson
import pytest
from redis.asyncio import Redis

from contracts.definitions import WorkflowDefinition
from controller.embedded_redis import EmbeddedRedis
from participants.sdk.connection import connect

T = TypeVar("T")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    given = os.environ.get("REDIS_URL")
    if given:
        yield given
        return
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = connect(redis_url, name="tests")
    await client.flushdb()
    try:
        yield client
    finally:
        await client.aclose()


async def eventually(
    probe: Callable[[], Awaitable[T]],
    until: Callable[[T], bool],
    *,
    timeout: float = 15.0,  # noqa: ASYNC109 - a polling deadline, not a cancellation scope
    interval: float = 0.02,
    what: str = "condition",
) -> T:
    """Poll ``probe`` until ``until(value)`` holds; fail with the last value after ``timeout``."""
    deadline = time.monotonic() + timeout
    value = await probe()
    while not until(value):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {value!r}")
        await asyncio.sleep(interval)
        value = await probe()
    return value


def definitions_file(path: Path, *definitions: WorkflowDefinition) -> Path:
    """``path`` holding ``definitions``, as `streamsaga controller --definitions` reads them."""
    path.write_bytes(orjson.dumps([definition.model_dump(mode="json") for definition in definitions]))
    return path
