"""Retention: message streams are trimmed without dropping anything a group still needs,
and the status indexes forget workflows whose data has expired.

A stream entry may go once every consumer group on the stream has been delivered it
and has acknowledged it: the trim point is, over all groups, the lowest of each
group's oldest pending entry and the entry after its last-delivered id.  A stream
no group reads is capped by length instead (``MAXLEN ~``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from contracts import naming
from controller.instance import TERMINAL

log = logging.getLogger(__name__)

UNREAD_STREAM_MAXLEN = 100_000


def _parse(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def trim_point(groups: list[dict[str, Any]], oldest_pending: dict[str, str | None]) -> str | None:
    """The lowest id any group still needs (entries below it may be trimmed), or
    None when no group reads the stream."""
    if not groups:
        return None
    needed: list[tuple[int, int]] = []
    for group in groups:
        name = _text(group["name"])
        pending = oldest_pending.get(name)
        if pending:
            needed.append(_parse(pending))
        else:
            ms, seq = _parse(_text(group["last-delivered-id"]))
            needed.append((ms, seq + 1))
    ms, seq = min(needed)
    return f"{ms}-{seq}"


async def trim_streams(redis: Redis, partitions: int) -> int:
    """Trim every message stream of every partition; returns how many entries went."""
    streams: list[str] = []
    for p in range(partitions):
        async for key in redis.scan_iter(match=naming.message_stream_pattern(p), count=1000, _type="stream"):
            streams.append(_text(key))
    if not streams:
        return 0
    async with redis.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xinfo_groups(stream)
        infos = await pipe.execute(raise_on_error=False)
    async with redis.pipeline(transaction=False) as pipe:
        asked: list[tuple[str, str]] = []
        for stream, groups in zip(streams, infos, strict=True):
            if isinstance(groups, Exception):
                continue
            for group in groups:
                if int(group["pending"]):
                    name = _text(group["name"])
                    asked.append((stream, name))
                    pipe.xpending(stream, name)
        summaries = await pipe.execute(raise_on_error=False)
    oldest: dict[str, dict[str, str | None]] = {}
    for (stream, name), summary in zip(asked, summaries, strict=True):
        if isinstance(summary, dict) and summary.get("min"):
            oldest.setdefault(stream, {})[name] = _text(summary["min"])
    async with redis.pipeline(transaction=False) as pipe:
        for stream, groups in zip(streams, infos, strict=True):
            if isinstance(groups, Exception):
                continue
            point = trim_point(groups, oldest.get(stream, {}))
            if point is None:
                pipe.xtrim(stream, maxlen=UNREAD_STREAM_MAXLEN, approximate=True)
            else:
                # exact, not `~`: an approximate MINID may keep more, never less, but
                # exact trimming makes the bound easy to reason about and to test
                pipe.xtrim(stream, minid=point, approximate=False)
        trimmed = await pipe.execute(raise_on_error=False)
    return sum(int(n) for n in trimmed if isinstance(n, int))


async def prune_status_indexes(redis: Redis, partitions: int, retention_s: int) -> int:
    """Drop finished workflows older than the retention time from the status indexes
    (their instance, history and dedupe keys expired at the same age)."""
    cutoff_ms = int((time.time() - retention_s) * 1000)
    async with redis.pipeline(transaction=False) as pipe:
        for p in range(partitions):
            for status in TERMINAL:
                pipe.zremrangebyscore(naming.status_index_key(p, status), "-inf", cutoff_ms)
        removed = await pipe.execute()
    return sum(int(n) for n in removed)


class Retention:
    """Runs both every ``interval_s``; several controllers may run it at once."""

    def __init__(self, redis: Redis, partitions: int, retention_s: int, *, interval_s: float = 30.0) -> None:
        self.redis = redis
        self.partitions = partitions
        self.retention_s = retention_s
        self.interval_s = interval_s
        self.trimmed = 0

    async def run(self, stop: asyncio.Event) -> None:
        """A pass every ``interval_s``, the first one interval after start (a restarted
        controller has nothing urgent to trim)."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)
            if stop.is_set():
                return
            try:
                self.trimmed += await trim_streams(self.redis, self.partitions)
                await prune_status_indexes(self.redis, self.partitions, self.retention_s)
            except RedisError as exc:
                log.warning("retention pass failed: %s", exc)
