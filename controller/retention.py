"""Retention: message streams are trimmed without dropping anything a consumer still
needs, and the status indexes forget workflows whose data has expired.

An entry may go once every consumer group on its stream has been delivered it and
has acknowledged it — and it is older than ``min_age_s``, which leaves consumers that
no definition declares (a participant reacting to events by choreography alone) time
to create their group.  The participants the definitions do name get their groups
created up front, so a worker deployed after the first orders still finds its backlog.
The streams come from the definitions and the live participants' heartbeats; no
keyspace scan.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from contracts import naming
from contracts.messages import TIMER_FIRED
from controller.definitions import Definitions
from controller.instance import TERMINAL
from controller.liveness import announced_types
from participants.sdk.connection import text
from participants.sdk.consumer import create_groups, entry_order
from participants.sdk.waiting import wait_until

log = logging.getLogger(__name__)

DEFAULT_MIN_AGE_S = 3_600


def trim_point(groups: list[dict[str, Any]], oldest_pending: dict[str, str | None], floor_ms: int) -> str:
    """The lowest id still needed: no group's oldest pending entry or next undelivered
    entry, and nothing written after ``floor_ms``, lies below it."""
    needed: list[tuple[int, int]] = [(floor_ms, 0)]
    for group in groups:
        name = text(group["name"])
        pending = oldest_pending.get(name)
        if pending:
            needed.append(entry_order(pending))
        else:
            ms, seq = entry_order(text(group["last-delivered-id"]))
            needed.append((ms, seq + 1))
    ms, seq = min(needed)
    return f"{ms}-{seq}"


async def ensure_declared_groups(redis: Redis, definitions: Definitions, partitions: int) -> None:
    """Create, from the start of each stream, the group of every participant the
    definitions name, on every stream it is expected to read."""
    await create_groups(
        redis,
        [
            (naming.message_stream(p, message_type), naming.participant_group(participant))
            for participant, types in sorted(definitions.participant_types().items())
            for message_type in sorted(types)
            for p in range(partitions)
        ],
    )


async def known_types(redis: Redis, definitions: Definitions) -> set[str]:
    """Every type the definitions name, the controller's timers, and every type a live
    participant announces in its heartbeat."""
    types = definitions.all_types() | {TIMER_FIRED} | await announced_types(redis)
    return {t for t in types if naming.is_valid_name(t)}


async def trim_streams(redis: Redis, streams: list[str], *, min_age_s: float = DEFAULT_MIN_AGE_S) -> int:
    """Trim ``streams``; returns how many entries went."""
    if not streams:
        return 0
    server_s, server_us = await redis.time()
    floor_ms = int(server_s * 1000 + server_us // 1000 - min_age_s * 1000)
    async with redis.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xinfo_groups(stream)
        infos = await pipe.execute(raise_on_error=False)
    asked: list[tuple[str, str]] = []
    async with redis.pipeline(transaction=False) as pipe:
        for stream, groups in zip(streams, infos, strict=True):
            if isinstance(groups, Exception):
                continue  # no such stream
            for group in groups:
                if int(group["pending"]):
                    asked.append((stream, text(group["name"])))
                    pipe.xpending(stream, text(group["name"]))
        summaries = await pipe.execute(raise_on_error=False)
    oldest: dict[str, dict[str, str | None]] = {}
    for (stream, name), summary in zip(asked, summaries, strict=True):
        if isinstance(summary, dict) and summary.get("min"):
            oldest.setdefault(stream, {})[name] = text(summary["min"])
    async with redis.pipeline(transaction=False) as pipe:
        for stream, groups in zip(streams, infos, strict=True):
            if not isinstance(groups, Exception):
                pipe.xtrim(stream, minid=trim_point(groups, oldest.get(stream, {}), floor_ms), approximate=False)
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
    """Creates the declared groups at once, then trims and prunes every ``interval_s``
    (the first pass one interval after start).  Several controllers may run it at once."""

    def __init__(
        self,
        redis: Redis,
        definitions: Definitions,
        partitions: int,
        retention_s: int,
        *,
        interval_s: float = 30.0,
        min_age_s: float = DEFAULT_MIN_AGE_S,
    ) -> None:
        self.redis = redis
        self.definitions = definitions
        self.partitions = partitions
        self.retention_s = retention_s
        self.interval_s = interval_s
        self.min_age_s = min_age_s
        self.trimmed = 0

    async def pass_once(self) -> None:
        types = await known_types(self.redis, self.definitions)
        streams = [naming.message_stream(p, t) for p in range(self.partitions) for t in sorted(types)]
        self.trimmed += await trim_streams(self.redis, streams, min_age_s=self.min_age_s)
        await prune_status_indexes(self.redis, self.partitions, self.retention_s)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await ensure_declared_groups(self.redis, self.definitions, self.partitions)
                break
            except RedisError as exc:
                log.warning("cannot create the declared consumer groups yet: %s", exc)
                await wait_until(stop, 1.0)
        while True:
            if await wait_until(stop, self.interval_s):
                return
            try:
                await self.pass_once()
            except RedisError as exc:
                log.warning("retention pass failed: %s", exc)
