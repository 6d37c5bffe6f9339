"""Graceful drain: SIGTERM stops reading, finishes the handler in flight, commits, exits 0."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

from redis.asyncio import Redis

from contracts import naming
from tests.conftest import eventually
from tests.participants import slow_worker
from tests.participants.helpers import emitted, envelope, pending_count, publish, stream_of

SCRIPT = Path(slow_worker.__file__)


async def _wait_for_line(stream: asyncio.StreamReader, needle: str, within: float = 10.0) -> list[str]:
    """Lines of ``stream`` up to and including the first that contains ``needle``."""
    seen: list[str] = []
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        raw = await asyncio.wait_for(stream.readline(), deadline - time.monotonic())
        if not raw:
            break
        seen.append(raw.decode().rstrip())
        if needle in seen[-1]:
            return seen
    raise AssertionError(f"the worker never logged {needle!r}; it logged {seen}")


async def test_sigterm_finishes_the_message_in_flight_and_exits_cleanly(redis: Redis, redis_url: str) -> None:
    incoming = envelope("Ping")
    await publish(redis, incoming)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        redis_url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    try:
        await eventually(
            lambda: redis.get(slow_worker.STARTED_KEY), lambda value: value is not None, what="the handler to start"
        )
        process.send_signal(signal.SIGTERM)
        await _wait_for_line(process.stdout, "draining 1 messages in flight")
        assert await emitted(redis, "Pong") == []  # still in flight: the handler waits for us
        await redis.rpush(slow_worker.RELEASE_KEY, "go")
        output = await asyncio.wait_for(process.stdout.read(), 10)
        code = await asyncio.wait_for(process.wait(), 10)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert code == 0, output.decode()
    [pong] = await emitted(redis, "Pong")
    assert pong.causation_id == incoming.message_id
    assert await pending_count(redis, stream_of(incoming), "slow") == 0
    assert await redis.hget(naming.heartbeat_key(), "slow/drain-test") is None
