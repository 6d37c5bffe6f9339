"""Consumer-group reading shared by the controller and every participant.

:class:`GroupReader` reads new entries in batches, hands back entries that need
another try (its own failures after a backoff, a dead peer's after
``claim_idle_ms``), and dead-letters entries that failed too often — each with
the reason, the original fields and the delivery count, acked in the same atomic
commit so the consumer keeps going.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from contracts import naming
from contracts.envelope import DecodeError, Envelope, decode
from contracts.messages import Wire, parse_payload
from participants.sdk.commit import Commit, CommitScript
from participants.sdk.connection import DEFAULT_BLOCK_MS, MAX_BLOCK_MS, refusing_writes, text
from participants.sdk.scripts import Script, ScriptCall

log = logging.getLogger(__name__)

# KEYS[1]: a stream; ARGV: group, consumer, idle ms, entry ids.  Sets the idle time of
# the entries the consumer still owns; one a peer has claimed meanwhile stays the peer's.
_HOLD_CHUNK = 1_000  # ids per script call: Lua unpacks them onto its stack
_HOLD = Script("""
local claim = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
for i = 4, #ARGV do
  if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2]) > 0 then
    claim[#claim + 1] = ARGV[i]
  end
end
local held = #claim - 5
if held == 0 then return 0 end
claim[#claim + 1] = 'IDLE'
claim[#claim + 1] = ARGV[3]
claim[#claim + 1] = 'JUSTID'
redis.call(unpack(claim))
return held
""")

DLQ_FIELD_PREFIX = "f:"


@dataclass(frozen=True)
class Entry:
    stream: str
    id: str
    fields: dict[bytes, bytes]
    deliveries: int = 1

    @property
    def partition(self) -> int:
        return naming.partition_of_key(self.stream)

    def field(self, name: str) -> str | None:
        raw = self.fields.get(name.encode())
        return raw.decode(errors="replace") if raw is not None else None


@dataclass(frozen=True)
class RetryPolicy:
    """When a pending entry is tried again, and when it is given up."""

    max_deliveries: int = 5
    base_ms: int = 500
    max_ms: int = 30_000
    claim_idle_ms: int = 5_000  # a peer's entry idle this long is taken over

    def due(self, deliveries: int, idle_ms: int, own: bool) -> bool:
        if not own:
            return idle_ms >= self.claim_idle_ms
        backoff: int = min(self.base_ms * 2 ** max(deliveries - 1, 0), self.max_ms)
        return idle_ms >= backoff


def entry_order(entry_id: str | bytes) -> tuple[int, int]:
    """A stream entry id ``<ms>-<seq>`` (as text, or as Redis sent it) as (ms, seq), to
    compare ids as Redis orders them."""
    ms, _, seq = entry_id.partition(b"-") if isinstance(entry_id, bytes) else entry_id.partition("-")
    return int(ms), int(seq or 0)


def decode_entry(entry: Entry, partitions: int) -> Envelope:
    """The envelope of a message-stream entry, checked against where it was found.

    Raises :class:`DecodeError` (undecodable, wrong stream, wrong partition) or
    :class:`PayloadError` (invalid payload); both carry a ``reason`` for the dead letter.
    """
    return decode_entry_parsed(entry, partitions)[0]


def decode_entry_parsed(entry: Entry, partitions: int) -> tuple[Envelope, Wire | None]:
    """:func:`decode_entry`, and the payload as the registered model of its type
    (None for a type without one): what checking the payload built, kept so a
    handler's ``msg.parse`` need not validate the same payload again."""
    stream_type = naming.type_of_stream(entry.stream)
    envelope = decode(entry.fields)
    if envelope.type != stream_type:
        raise DecodeError(f"type {envelope.type!r} does not belong on the {stream_type} stream")
    if naming.partition_of(envelope.correlation_id, partitions) != entry.partition:
        raise DecodeError(f"correlation_id {envelope.correlation_id!r} belongs to another partition")
    return envelope, parse_payload(envelope.type, envelope.payload)


DEAD_LETTER_MAXLEN = 100_000
"""Dead letters kept per partition (about: trimmed by whole stream nodes)."""


def dead_letter_commit(entry: Entry, group: str, consumer: str, reason: str) -> Commit:
    """Move ``entry`` to its partition's dead-letter stream and ack it, atomically, once."""
    fields: dict[str, str | bytes] = {
        "reason": reason,
        "source_stream": entry.stream,
        "source_id": entry.id,
        "group": group,
        "consumer": consumer,
        "deliveries": str(entry.deliveries),
        "failed_at_ms": str(int(time.time() * 1000)),
    }
    for name, value in entry.fields.items():
        fields[DLQ_FIELD_PREFIX + name.decode(errors="replace")] = value.decode(errors="replace")
    return (
        Commit()
        .pending(entry.stream, group, consumer, entry.id)  # once, and only by the consumer holding it
        .xadd(naming.dead_letter_stream(entry.partition), fields, maxlen=DEAD_LETTER_MAXLEN)
        .ack(entry.stream, group, entry.id)
    )


async def create_groups(redis: Redis, groups: Sequence[tuple[str, str]]) -> None:
    """Create each (stream, group) that does not exist yet, from the start of the stream
    (so no message written before the first consumer started is missed), in one round
    trip; raises the error of the first that could not be created, naming it (a ``ResponseError``:
    ``OutOfMemoryError`` when Redis refuses writes)."""
    async with redis.pipeline(transaction=False) as pipe:
        for stream, group in groups:
            pipe.xgroup_create(stream, group, id="0", mkstream=True)
        results = await pipe.execute(raise_on_error=False)
    for (stream, group), result in zip(groups, results, strict=True):
        if isinstance(result, ResponseError) and "BUSYGROUP" not in str(result):
            # an OOM stays an OutOfMemoryError (an outage); MOVED and the like cannot take a message
            kind = type(result) if refusing_writes(result) else ResponseError
            raise kind(f"cannot create group {group!r} on {stream}: {result}") from result


READ_BOUND = 4
"""A read takes at most this many times its ``count`` in all, however many streams it reads."""


class GroupReader:
    """Reads a set of streams as one consumer of one group."""

    def __init__(
        self,
        redis: Redis,
        group: str,
        consumer: str,
        streams: Iterable[str],
        *,
        count: int = 200,
        block_ms: int = DEFAULT_BLOCK_MS,
        policy: RetryPolicy | None = None,
        script: CommitScript | None = None,
    ) -> None:
        self.redis = redis
        self.group = group
        self.consumer = consumer
        self.streams = sorted(set(streams))
        self.count = count
        self.block_ms = min(block_ms, MAX_BLOCK_MS)
        self.policy = policy or RetryPolicy()
        self.script = script or CommitScript()
        # XREADGROUP's COUNT is per stream: over 32 streams, COUNT 200 could take 6,400
        # entries, all owned by this consumer until handled (and all redelivered, one more
        # delivery each, if it dies).  So each read asks every stream for `count` over the
        # number of streams the last read found entries in (about `count` in all while the
        # traffic keeps its spread), and never for more than READ_BOUND times `count` in all.
        self._busy_streams = len(self.streams)
        self._scans = 0
        self.horizon: tuple[int, int] | None = None
        """After a read: the position (:func:`entry_order`) up to which every stream was read
        completely — the lowest last id of the streams that gave a full COUNT and may hold
        more; None when none did.  Entries past it may have older ones still unread."""

    async def ensure_groups(self) -> None:
        """Create the group on every stream (see :func:`create_groups`)."""
        await create_groups(self.redis, [(stream, self.group) for stream in self.streams])

    async def read(self, block_ms: int | None = None) -> list[Entry]:
        """New entries for this consumer (blocks up to ``block_ms`` when there are none)."""
        block = self.block_ms if block_ms is None else block_ms
        asked = self.per_stream
        self.horizon = None
        try:
            reply: Any = await self.redis.xreadgroup(
                self.group,
                self.consumer,
                {stream: ">" for stream in self.streams},
                count=asked,
                block=block or None,
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            log.warning("consumer group %s vanished; creating it again", self.group)
            await self.ensure_groups()
            return []
        if reply:
            self._busy_streams = len(reply)
        full = [entry_order(entries[-1][0]) for _, entries in reply or [] if len(entries) >= asked]
        self.horizon = min(full) if full else None
        return [
            Entry(text(stream), text(entry_id), fields or {})
            for stream, entries in reply or []
            for entry_id, fields in entries
        ]

    @property
    def per_stream(self) -> int:
        """The COUNT of the next read: ``count`` shared by the streams the last read found
        busy, and at most :data:`READ_BOUND` ``* count`` over all the streams."""
        bound = READ_BOUND * self.count // len(self.streams)
        return max(1, min(self.count // self._busy_streams, bound))

    async def hold(self, entries: Iterable[tuple[str, Sequence[str], int]]) -> list[int | ResponseError]:
        """Set the idle time of entries this consumer owns, given as (stream, entry ids,
        idle ms): 0 keeps an entry being handled from looking abandoned, a longer idle
        time makes a deferred entry due.  An entry a peer has claimed meanwhile (this
        consumer stalled past the claim time) is left to that peer.  In one round trip,
        per stream (and per thousand ids): how many entries it still owned, or the error."""
        calls: list[ScriptCall] = [
            ([stream], [self.group, self.consumer, idle_ms, *ids[start : start + _HOLD_CHUNK]])
            for stream, ids, idle_ms in entries
            for start in range(0, len(ids), _HOLD_CHUNK)
        ]
        return await _HOLD.call_many(self.redis, calls)

    async def pending(
        self, exclude: Collection[tuple[str, str]] = (), limit: int | None = None
    ) -> tuple[list[Entry], list[Entry]]:
        """(entries due for another try, entries that have failed too often).

        Both are claimed by this consumer; the caller processes the first and
        dead-letters the second.  An entry to try again counts the claim that
        hands it over as its next delivery; one that failed too often carries the
        deliveries it was given up after.  ``exclude`` lists (stream, entry id) the caller
        still holds (in flight, or deferred): they are neither claimed nor counted
        as a delivery.  At most ``count`` of each kind per scan, and at most ``limit``
        to try again (what the caller has room for), taken from the streams in turn so
        that a backlog on one stream does not keep the others waiting.
        """
        floor = min(self.policy.base_ms, self.policy.claim_idle_ms)
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in self.streams:
                pipe.xpending_range(stream, self.group, "-", "+", self.count, idle=floor)
            summaries = await pipe.execute(raise_on_error=False)
        candidates: list[list[tuple[str, str, int]]] = []  # per stream: (stream, entry id, deliveries)
        for stream, rows in zip(self.streams, summaries, strict=True):
            if isinstance(rows, Exception):
                continue
            due = []
            for row in rows:
                entry_id = text(row["message_id"])
                own = text(row["consumer"]) == self.consumer
                if own and (stream, entry_id) in exclude:
                    continue
                deliveries = int(row["times_delivered"])
                if self.policy.due(deliveries, int(row["time_since_delivered"]), own):
                    due.append((stream, entry_id, deliveries))
            if due:
                candidates.append(due)
        rooms = {False: self.count if limit is None else min(self.count, limit), True: self.count}  # by exhausted
        chosen: dict[str, list[tuple[str, int]]] = {}
        # one from each stream in turn, starting one stream further on every scan
        self._scans += 1
        start = self._scans % len(candidates) if candidates else 0
        rotated = candidates[start:] + candidates[:start]
        for depth in range(max((len(due) for due in candidates), default=0)):
            for due in rotated:
                if depth < len(due):
                    stream, entry_id, deliveries = due[depth]
                    exhausted = deliveries >= self.policy.max_deliveries
                    if rooms[exhausted] > 0:
                        rooms[exhausted] -= 1
                        chosen.setdefault(stream, []).append((entry_id, deliveries))
        if not chosen:
            return [], []
        retry: list[Entry] = []
        exhausted_entries: list[Entry] = []
        missing: list[tuple[str, str]] = []
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream, picked in chosen.items():
                pipe.xclaim(stream, self.group, self.consumer, floor, [entry_id for entry_id, _ in picked])
            claimed = await pipe.execute(raise_on_error=False)
        for (stream, picked), entries in zip(chosen.items(), claimed, strict=True):
            if isinstance(entries, Exception):
                log.warning("cannot claim from %s: %s", stream, entries)
                continue
            # an entry missing from the reply was claimed by a peer meanwhile (its idle time
            # no longer passes `floor`), or was deleted (Redis 7 drops it from the pending list
            # itself; 6.2 answers nil and keeps it pending): only a deleted one is acked below,
            # as acking one a peer holds could lose it
            found = {text(entry_id): fields for entry_id, fields in entries if entry_id is not None and fields}
            for entry_id, previous in picked:
                fields = found.get(entry_id)
                if fields is None:
                    missing.append((stream, entry_id))
                elif previous >= self.policy.max_deliveries:
                    exhausted_entries.append(Entry(stream, entry_id, fields, previous))
                else:
                    retry.append(Entry(stream, entry_id, fields, previous + 1))
        if missing:
            await self._ack_deleted(missing)
        return retry, exhausted_entries

    async def _ack_deleted(self, missing: list[tuple[str, str]]) -> None:
        """Ack the entries that no longer exist in their stream (a deletion is for good, so
        this cannot race with a peer): on Redis 6.2 they would stay pending for ever."""
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for stream, entry_id in missing:
                    pipe.xrange(stream, entry_id, entry_id)
                exists = await pipe.execute(raise_on_error=False)
            gone = [key for key, found in zip(missing, exists, strict=True) if found == []]
            if gone:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for stream, entry_id in gone:
                        pipe.xack(stream, self.group, entry_id)
                    await pipe.execute(raise_on_error=False)
        except RedisError as exc:  # the next scan tries again; the entries claimed meanwhile stand
            log.warning("cannot check %d pending entries missing from their claim: %s", len(missing), exc)

    async def dead_letter(self, entries: list[tuple[Entry, str]]) -> None:
        """Dead-letter each (entry, reason) and ack it."""
        await self.script.run(
            self.redis, [dead_letter_commit(entry, self.group, self.consumer, reason) for entry, reason in entries]
        )
        for entry, reason in entries:  # once they landed: a failed attempt is retried, and logged then
            log.warning(
                "dead-lettered %s %s from %s after %d deliveries: %s",
                entry.field(naming.FIELD_TYPE),
                entry.id,
                entry.stream,
                entry.deliveries,
                reason,
                extra={"correlation_id": entry.field(naming.FIELD_CORRELATION_ID)},
            )
