"""The commit primitive: all the writes of one decision in one Lua script call.

Decisions are made in Python; :class:`Commit` only collects their writes (state,
history, outgoing messages, timers, the XACK of the message that caused them) and
:class:`CommitScript` applies many commits in one pipelined round trip.  The script
is generic on purpose: it knows nothing about workflows.  Its arguments are flat
(no JSON for Lua to decode: that alone was a fifth of a controller commit's cost).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from enum import StrEnum
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from participants.sdk.connection import text
from participants.sdk.scripts import Script

_SOURCE = resources.files(__package__).joinpath("commit.lua").read_text()


class Outcome(StrEnum):
    OK = "ok"
    DUPLICATE = "dup"
    CONFLICT = "conflict"


@dataclass(frozen=True)
class CommitResult:
    outcome: Outcome
    value: str | None = None  # the recorded value of a duplicate `once`, or the current version on conflict
    added: tuple[str, ...] = ()  # on OK: the ids of the entries the xadds appended, in order
    guarded_by: str | None = None
    """On a dedupe duplicate of a guarded commit: the token of the commit that wrote the guarded hash last."""


def _slot_tag(key: str) -> str:
    start = key.find("{")
    end = key.find("}", start + 1)
    return key[start + 1 : end] if start >= 0 and end > start + 1 else key


# the order the script applies writes in, whatever order they were added in
_WRITE_ORDER = (
    "hset", "rpush", "xadd", "xdel", "zadd", "zrem", "zaddin", "hincrby", "sadd", "set", "expire", "persist",
)  # fmt: skip
_CHECK_ORDER = ("dedupe", "once", "guard", "requires", "pending")


@dataclass
class Commit:
    """The writes of one decision; every key must share one hash slot."""

    keys: list[str] = field(default_factory=list)
    _index: dict[str, int] = field(default_factory=dict)
    _checks: dict[str, tuple[str | bytes, ...]] = field(default_factory=dict)
    _writes: dict[str, list[list[str | bytes]]] = field(default_factory=dict)
    _acks: list[str] = field(default_factory=list)
    token: str | None = None
    """Set by :meth:`guard`: written into the guarded hash (field ``c``) by this commit's
    :meth:`hset` of it, so that a duplicate of this very commit can be told from another's."""
    _guarded: str | None = None

    def _k(self, key: str) -> str:
        index = self._index.get(key)
        if index is None:
            if self.keys and _slot_tag(key) != _slot_tag(self.keys[0]):
                raise ValueError(f"{key!r} is not in the hash slot of {self.keys[0]!r}")
            self.keys.append(key)
            index = self._index[key] = len(self.keys)
        return str(index)

    def _add(self, op: str, key: str, *args: str | bytes) -> Commit:
        self._writes.setdefault(op, []).append([self._k(key), *args])
        return self

    def argv(self) -> list[str | bytes]:
        """The script's arguments: the acks, the checks, then the writes in the script's order."""
        argv: list[str | bytes] = [str(len(self._acks) // 3), *self._acks]
        for name in _CHECK_ORDER:
            check = self._checks.get(name)
            if check is not None:
                argv += (name, *check)
        for name in _WRITE_ORDER:
            for args in self._writes.get(name, ()):
                argv += (name, str(len(args)), *args)
        return argv

    def dedupe(self, key: str, member: str, ttl: int | None = None) -> Commit:
        """Do nothing (but ack) if ``member`` was already recorded in set ``key``; else record it."""
        self._checks["dedupe"] = (self._k(key), member)
        return self._add("sadd", key, member, str(ttl or ""))

    def once(self, key: str, value: str, ttl: int | None = None) -> Commit:
        """Do nothing (but ack) if ``key`` exists; otherwise set it to ``value``."""
        self._checks["once"] = (self._k(key), "")
        return self._add("set", key, value, str(ttl or ""))

    def requires(self, key: str, member: str) -> Commit:
        """Conflict (write nothing) unless ``member`` is already in set ``key``: a commit
        chained on an earlier one must not land when that one did not."""
        self._checks["requires"] = (self._k(key), member)
        return self

    def pending(self, stream: str, group: str, consumer: str, entry_id: str) -> Commit:
        """Do nothing (a duplicate) unless ``entry_id`` of ``stream`` is pending in ``group`` for
        ``consumer``: for a commit that acks it, so that running it again after it landed, or
        after a peer took the entry over, changes nothing."""
        self._checks["pending"] = (self._k(stream), group, consumer, entry_id)
        return self

    def guard(self, key: str, expected_version: int, expected_token: str = "") -> Commit:
        """Compare-and-set: hash field ``v`` of ``key`` must be ``expected_version`` (0 = no such
        hash) and, when ``expected_token`` is given and the hash has field ``c``, ``c`` (the token
        of the commit that wrote it) must equal it: the same version written by another commit
        is refused.  An :meth:`hset` of ``key`` writes this commit's :attr:`token` into ``c``."""
        self.token, self._guarded = secrets.token_hex(8), key
        self._checks["guard"] = (self._k(key), str(expected_version), expected_token)
        return self

    def landed(self, result: CommitResult) -> bool:
        """Whether this commit took effect: it did, or ``result`` is a duplicate of itself —
        its script ran again after the reply was lost, and the first run had applied.  Telling
        the two duplicates apart needs a :meth:`dedupe`, a :meth:`guard` and an :meth:`hset` of
        the guarded hash; without them any duplicate counts as another's."""
        return result.outcome is Outcome.OK or (self.token is not None and result.guarded_by == self.token)

    def hset(self, key: str, mapping: dict[str, str]) -> Commit:
        if key == self._guarded and self.token is not None:
            mapping = {**mapping, "c": self.token}
        return self._add("hset", key, *(item for pair in mapping.items() for item in pair))

    def rpush(self, key: str, *values: str) -> Commit:
        return self._add("rpush", key, *values)

    def xadd(self, key: str, fields: dict[str, str | bytes], maxlen: int | None = None) -> Commit:
        return self._add("xadd", key, str(maxlen or ""), *(item for pair in fields.items() for item in pair))

    def zadd(self, key: str, score: float, member: str) -> Commit:
        return self._add("zadd", key, repr(score), member)

    def zadd_in(self, key: str, delay_ms: int, member: str) -> Commit:
        """ZADD with score = the Redis server's clock (ms) + ``delay_ms``: deadlines
        use one clock however many processes set them."""
        return self._add("zaddin", key, str(delay_ms), member)

    def zrem(self, key: str, member: str) -> Commit:
        return self._add("zrem", key, member)

    def hincrby(self, key: str, name: str, amount: int) -> Commit:
        return self._add("hincrby", key, name, str(amount))

    def expire(self, key: str, ttl: int) -> Commit:
        return self._add("expire", key, str(ttl))

    def persist(self, key: str) -> Commit:
        """Remove a TTL set by an earlier commit."""
        return self._add("persist", key)

    def ack(self, stream: str, group: str, entry_id: str) -> Commit:
        self._acks += (self._k(stream), group, entry_id)
        return self

    def xdel(self, stream: str, entry_id: str) -> Commit:
        """Delete one entry of ``stream`` (after this commit's xadds)."""
        return self._add("xdel", stream, entry_id)


class CommitScript:
    """The commit script: applies :class:`Commit` objects."""

    def __init__(self) -> None:
        self._script = Script(_SOURCE)

    async def run(self, redis: Redis, commits: list[Commit]) -> list[CommitResult]:
        """Apply ``commits`` in order in one round trip; each is atomic on its own.
        A commit the script refused raises its error, after the others took effect."""
        results: list[CommitResult] = []
        for result in await self.run_each(redis, commits):
            if isinstance(result, ResponseError):
                raise result
            results.append(result)
        return results

    async def run_each(self, redis: Redis, commits: list[Commit]) -> list[CommitResult | ResponseError]:
        """As :meth:`run`, with the error of a commit the script refused (``WRONGTYPE``,
        say) as that commit's result, so the callers of the others learn their outcomes."""
        raw = await self._script.call_many(redis, [(c.keys, c.argv()) for c in commits])
        return [r if isinstance(r, ResponseError) else _result(r) for r in raw]


def _result(raw: Any) -> CommitResult:
    if isinstance(raw, Exception):  # not a script error: the connection's, say
        raise raw
    kind = text(raw[0])
    if kind == "dupof":  # a dedupe duplicate of a guarded commit
        return CommitResult(Outcome.DUPLICATE, guarded_by=text(raw[1]))
    outcome = Outcome(kind)
    if outcome is Outcome.OK:
        return CommitResult(outcome, added=tuple(text(entry_id) for entry_id in raw[2:]))
    return CommitResult(outcome, text(raw[1]) if len(raw) > 1 else None)
