"""The commit primitive: all the writes of one decision in one Lua script call.

Decisions are made in Python; :class:`Commit` only collects their writes (state,
history, outgoing messages, timers, the XACK of the message that caused them) and
:func:`run_commits` applies many commits in one pipelined round trip.  The script
is generic on purpose: it knows nothing about workflows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from importlib import resources
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import NoScriptError

_SOURCE = resources.files(__package__).joinpath("commit.lua").read_text()
_INLINE_MAX = 64


class Outcome(StrEnum):
    OK = "ok"
    DUPLICATE = "dup"
    CONFLICT = "conflict"


@dataclass(frozen=True)
class CommitResult:
    outcome: Outcome
    value: str | None = None  # the recorded value of a duplicate `once`, or the current version on conflict
    added: tuple[str, ...] = ()  # on OK: the ids of the entries the xadds appended, in order


def _slot_tag(key: str) -> str:
    start = key.find("{")
    end = key.find("}", start + 1)
    return key[start + 1 : end] if start >= 0 and end > start + 1 else key


@dataclass
class Commit:
    """The writes of one decision; every key must share one hash slot."""

    keys: list[str] = field(default_factory=list)
    spec: dict[str, Any] = field(default_factory=dict)
    args: list[str | bytes] = field(default_factory=list)
    """Large values, passed as script arguments after the spec (ARGV[2:])."""
    _index: dict[str, int] = field(default_factory=dict)

    def _v(self, value: str | bytes) -> str | list[int]:
        """A value for the spec: short ones inline, long ones as a reference to a
        script argument, so Redis need not decode them out of the spec's JSON."""
        if len(value) <= _INLINE_MAX and isinstance(value, str):
            return value
        self.args.append(value)
        return [len(self.args) + 1]  # ARGV[1] is the spec

    def _k(self, key: str) -> int:
        index = self._index.get(key)
        if index is None:
            if self.keys and _slot_tag(key) != _slot_tag(self.keys[0]):
                raise ValueError(f"{key!r} is not in the hash slot of {self.keys[0]!r}")
            self.keys.append(key)
            index = self._index[key] = len(self.keys)
        return index

    def _add(self, op: str, *args: Any) -> Commit:
        self.spec.setdefault(op, []).append(list(args))
        return self

    def dedupe(self, key: str, member: str, ttl: int | None = None) -> Commit:
        """Do nothing (but ack) if ``member`` was already recorded in set ``key``."""
        self.spec["dedupe"] = [self._k(key), member, str(ttl or "")]
        return self

    def once(self, key: str, value: str, ttl: int | None = None) -> Commit:
        """Do nothing (but ack) if ``key`` exists; otherwise set it to ``value``."""
        self.spec["once"] = [self._k(key), value, str(ttl or "")]
        return self

    def requires(self, key: str, member: str) -> Commit:
        """Conflict (write nothing) unless ``member`` is already in set ``key``: a commit
        chained on an earlier one must not land when that one did not."""
        self.spec["requires"] = [self._k(key), member]
        return self

    def guard(self, key: str, expected_version: int) -> Commit:
        """Compare-and-set: hash field ``v`` of ``key`` must be ``expected_version`` (0 = no such hash)."""
        self.spec["guard"] = [self._k(key), str(expected_version)]
        return self

    def hset(self, key: str, mapping: dict[str, str]) -> Commit:
        flat = [item for name, value in mapping.items() for item in (name, self._v(value))]
        return self._add("hset", self._k(key), *flat)

    def rpush(self, key: str, *values: str) -> Commit:
        return self._add("rpush", self._k(key), *(self._v(value) for value in values))

    def xadd(self, key: str, fields: dict[str, str | bytes], maxlen: int | None = None) -> Commit:
        flat = [item for name, value in fields.items() for item in (name, self._v(value))]
        return self._add("xadd", self._k(key), str(maxlen or ""), *flat)

    def zadd(self, key: str, score: float, member: str) -> Commit:
        return self._add("zadd", self._k(key), repr(score), member)

    def zadd_in(self, key: str, delay_ms: int, member: str) -> Commit:
        """ZADD with score = the Redis server's clock (ms) + ``delay_ms``: deadlines
        use one clock however many processes set them."""
        return self._add("zaddin", self._k(key), str(delay_ms), member)

    def zrem(self, key: str, member: str) -> Commit:
        return self._add("zrem", self._k(key), member)

    def hincrby(self, key: str, name: str, amount: int) -> Commit:
        return self._add("hincrby", self._k(key), name, str(amount))

    def expire(self, key: str, ttl: int) -> Commit:
        return self._add("expire", self._k(key), str(ttl))

    def persist(self, key: str) -> Commit:
        """Remove a TTL set by an earlier commit."""
        return self._add("persist", self._k(key))

    def ack(self, stream: str, group: str, entry_id: str) -> Commit:
        return self._add("ack", self._k(stream), group, entry_id)

    def xdel(self, stream: str, entry_id: str) -> Commit:
        """Delete one entry of ``stream`` (after this commit's xadds)."""
        return self._add("xdel", self._k(stream), entry_id)


ScriptCall = tuple[list[str], list[str | bytes]]  # (keys, args)


class LuaScript:
    """A Lua script called by SHA in pipelines; loads itself again if the server
    lost it (restart, SCRIPT FLUSH).  Replies that are errors are returned, not raised."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._sha: str | None = None

    async def _load(self, redis: Redis) -> str:
        self._sha = str(await redis.script_load(self.source))
        return self._sha

    async def call_many(self, redis: Redis, calls: list[ScriptCall]) -> list[Any]:
        """Run every call in order in one round trip."""
        if not calls:
            return []
        sha = self._sha or await self._load(redis)
        raw = await self._pipeline(redis, sha, calls)
        if any(isinstance(r, NoScriptError) for r in raw):
            sha = await self._load(redis)
            retry = [c for c, r in zip(calls, raw, strict=True) if isinstance(r, NoScriptError)]
            again = iter(await self._pipeline(redis, sha, retry))
            raw = [next(again) if isinstance(r, NoScriptError) else r for r in raw]
        return raw

    @staticmethod
    async def _pipeline(redis: Redis, sha: str, calls: list[ScriptCall]) -> list[Any]:
        async with redis.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                pipe.evalsha(sha, len(keys), *keys, *args)
            return list(await pipe.execute(raise_on_error=False))


class CommitScript:
    """The commit script: applies :class:`Commit` objects."""

    def __init__(self) -> None:
        self._script = LuaScript(_SOURCE)

    async def run(self, redis: Redis, commits: list[Commit]) -> list[CommitResult]:
        """Apply ``commits`` in order in one round trip; each is atomic on its own."""
        raw = await self._script.call_many(redis, [(c.keys, [orjson.dumps(c.spec), *c.args]) for c in commits])
        return [_result(r) for r in raw]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _result(raw: Any) -> CommitResult:
    if isinstance(raw, Exception):
        raise raw
    outcome = Outcome(_text(raw[0]))
    if outcome is Outcome.OK:
        return CommitResult(outcome, added=tuple(_text(entry_id) for entry_id in raw[2:]))
    return CommitResult(outcome, _text(raw[1]) if len(raw) > 1 else None)
