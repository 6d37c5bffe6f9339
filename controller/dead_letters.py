"""Dead letters: what the consumers gave up on, for an operator to inspect, replay or purge.

Every consumer (the controller's correlator and each participant's runner) moves
an entry it cannot handle to its partition's dead-letter stream
(:func:`contracts.naming.dead_letter_stream`) with the reason, where the entry
was, who gave up, the delivery count and the original fields under ``f:`` (see
:func:`participants.sdk.consumer.dead_letter_commit` and the "Dead letters"
section of ``docs/wire-contract.md``).

A dead letter's public id is ``"<partition>-<entry id>"``, e.g. ``7-1795292530341-0``.
Replaying one writes its original fields back to the stream it came from and
deletes it, in one atomic commit on its partition.  The new entry reaches every
group that reads that stream; consumers that already handled its ``message_id``
skip it (they dedupe on it), which also makes a replay that races another one
harmless.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict
from redis.asyncio import Redis

from contracts import naming
from participants.sdk.commit import Commit, CommitScript, Outcome
from participants.sdk.connection import text
from participants.sdk.consumer import DLQ_FIELD_PREFIX, entry_order

MAX_SCAN_PAGE = 500  # entries per XREVRANGE when a filter may skip some
# The fields every entry of a message stream needs (docs/wire-contract.md, "Stream entry fields").
REQUIRED_FIELDS = (naming.FIELD_TYPE, naming.FIELD_CORRELATION_ID, naming.FIELD_MESSAGE_ID, naming.FIELD_ENVELOPE)

_ID = re.compile(r"^(\d{1,9})-(\d{1,20}-\d{1,20})$")


class InvalidDeadLetterId(ValueError):
    """A string that is not a dead letter id (``<partition>-<ms>-<seq>``)."""

    def __init__(self, given: str) -> None:
        super().__init__(f"{given!r} is not a dead letter id; expected <partition>-<entry id>, e.g. 7-1795292530341-0")
        self.given = given


class NoSuchDeadLetter(LookupError):
    """No dead letter has this id (never existed, replayed, purged or trimmed)."""

    def __init__(self, dead_letter_id: str) -> None:
        super().__init__(f"no dead letter {dead_letter_id!r} (it may have been replayed, purged or trimmed)")
        self.dead_letter_id = dead_letter_id


class NotReplayable(ValueError):
    """A dead letter whose original fields could not stand on a message stream; ``reason`` says why."""

    def __init__(self, dead_letter_id: str, reason: str) -> None:
        super().__init__(f"dead letter {dead_letter_id!r} cannot be replayed: {reason}")
        self.dead_letter_id = dead_letter_id
        self.reason = reason


@dataclass(frozen=True)
class DeadLetterId:
    """A parsed dead letter id."""

    partition: int
    entry_id: str

    @classmethod
    def parse(cls, raw: str) -> DeadLetterId:
        """Parse ``<partition>-<entry id>``, or raise :class:`InvalidDeadLetterId`."""
        match = _ID.match(raw)
        if match is None:
            raise InvalidDeadLetterId(raw)
        return cls(int(match[1]), match[2])

    def __str__(self) -> str:
        return f"{self.partition}-{self.entry_id}"

    @property
    def stream(self) -> str:
        return naming.dead_letter_stream(self.partition)


class DeadLetter(BaseModel):
    """One dead letter, as the API and the CLI show it."""

    model_config = ConfigDict(frozen=True)

    id: str
    partition: int
    reason: str
    source_stream: str
    source_id: str
    group: str
    consumer: str
    deliveries: int
    failed_at: datetime
    type: str | None
    """The original ``type`` field, or the type of the source stream when the entry had none."""
    correlation_id: str | None
    """The original ``correlation_id`` field: the workflow id."""
    message_id: str | None
    fields: dict[str, str]
    """The original fields of the entry, as it was on ``source_stream``."""

    @property
    def entry_id(self) -> str:
        return DeadLetterId.parse(self.id).entry_id


def _stream_type(stream: str) -> str | None:
    """The message type of a message stream, or None if ``stream`` is not one."""
    if ":msg:" not in stream:
        return None
    try:
        message_type = naming.type_of_stream(stream)
        partition = naming.partition_of_key(stream)
    except ValueError:
        return None
    return message_type if stream == naming.message_stream(partition, message_type) else None


def parse_entry(partition: int, entry_id: str, raw: dict[Any, Any]) -> DeadLetter:
    """A dead letter from one entry of a dead-letter stream.

    Tolerant: a dead letter written by a consumer in another language may lack a
    field; what is missing reads as empty (or 0 deliveries, or the entry's time).
    """
    fields = {text(name): text(value) for name, value in raw.items()}
    originals = {
        name.removeprefix(DLQ_FIELD_PREFIX): value
        for name, value in fields.items()
        if name.startswith(DLQ_FIELD_PREFIX)
    }
    source_stream = fields.get("source_stream", "")
    failed_at_ms = fields.get("failed_at_ms", "")
    deliveries = fields.get("deliveries", "")
    return DeadLetter(
        id=f"{partition}-{entry_id}",
        partition=partition,
        reason=fields.get("reason", ""),
        source_stream=source_stream,
        source_id=fields.get("source_id", ""),
        group=fields.get("group", ""),
        consumer=fields.get("consumer", ""),
        deliveries=int(deliveries) if deliveries.isdigit() else 0,
        failed_at=datetime.fromtimestamp(
            (int(failed_at_ms) if failed_at_ms.isdigit() else entry_order(entry_id)[0]) / 1000, UTC
        ),
        type=originals.get(naming.FIELD_TYPE) or _stream_type(source_stream),
        correlation_id=originals.get(naming.FIELD_CORRELATION_ID),
        message_id=originals.get(naming.FIELD_MESSAGE_ID),
        fields=originals,
    )


@dataclass(frozen=True)
class Filter:
    """Which dead letters a listing keeps; None matches anything."""

    group: str | None = None
    type: str | None = None
    workflow_id: str | None = None

    def __bool__(self) -> bool:
        return any(value is not None for value in (self.group, self.type, self.workflow_id))

    def keeps(self, letter: DeadLetter) -> bool:
        return (
            (self.group is None or letter.group == self.group)
            and (self.type is None or letter.type == self.type)
            and (self.workflow_id is None or letter.correlation_id == self.workflow_id)
        )


async def list_dead_letters(
    redis: Redis,
    partitions: int,
    *,
    limit: int,
    group: str | None = None,
    type: str | None = None,
    workflow_id: str | None = None,
) -> list[DeadLetter]:
    """The newest ``limit`` dead letters of every partition that match the filters, newest first.

    Reads each partition newest first (XREVRANGE, one pipeline per round) until
    it has ``limit`` matches or no more entries, then merges by entry time.
    """
    if limit < 1:
        raise ValueError(f"limit must be positive, not {limit}")
    wanted = Filter(group, type, workflow_id)
    page = min(max(limit, 100), MAX_SCAN_PAGE) if wanted else limit
    found: dict[int, list[DeadLetter]] = {p: [] for p in range(partitions)}
    cursor: dict[int, str] = {p: "+" for p in range(partitions)}  # where the next page of each partition ends
    while cursor:
        async with redis.pipeline(transaction=False) as pipe:
            for p, end in cursor.items():
                pipe.xrevrange(naming.dead_letter_stream(p), max=end, min="-", count=page)
            replies: list[Any] = await pipe.execute()
        for p, entries in zip(list(cursor), replies, strict=True):
            for raw_id, raw in entries:
                letter = parse_entry(p, text(raw_id), raw)
                if wanted.keeps(letter):
                    found[p].append(letter)
            if len(entries) < page or len(found[p]) >= limit:
                del cursor[p]
            else:
                cursor[p] = "(" + text(entries[-1][0])
    merged = [letter for letters in found.values() for letter in letters]
    merged.sort(key=lambda letter: (entry_order(letter.entry_id), letter.partition), reverse=True)
    return merged[:limit]


async def get(redis: Redis, dead_letter_id: str) -> DeadLetter | None:
    """The dead letter with this id, or None; raises :class:`InvalidDeadLetterId` for a malformed id."""
    parsed = DeadLetterId.parse(dead_letter_id)
    entries: Any = await redis.xrange(parsed.stream, min=parsed.entry_id, max=parsed.entry_id)
    if not entries:
        return None
    [(_, raw)] = entries
    return parse_entry(parsed.partition, parsed.entry_id, raw)


def replay_problem(letter: DeadLetter, partitions: int | None = None) -> str | None:
    """Why ``letter`` cannot be replayed as it is, or None if it can."""
    stream_type = _stream_type(letter.source_stream)
    if stream_type is None or naming.partition_of_key(letter.source_stream) != letter.partition:
        return f"source_stream {letter.source_stream!r} is not a message stream of partition {letter.partition}"
    missing = [name for name in REQUIRED_FIELDS if not letter.fields.get(name)]
    if missing:
        return f"the original entry lacks the field{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
    message_type = letter.fields[naming.FIELD_TYPE]
    if message_type != stream_type:
        return f"its type {message_type!r} does not belong on the {stream_type} stream it came from"
    correlation_id = letter.fields[naming.FIELD_CORRELATION_ID]
    if partitions is not None and naming.partition_of(correlation_id, partitions) != letter.partition:
        return f"correlation_id {correlation_id!r} belongs to another partition"
    return None


async def replay_letter(
    redis: Redis, letter: DeadLetter, *, partitions: int | None = None, script: CommitScript | None = None
) -> str:
    """Write ``letter``'s original fields back to its source stream and delete it, atomically.

    Returns the id of the new entry.  Raises :class:`NotReplayable`, changing
    nothing, when the fields could not stand on that stream (a consumer would only
    dead-letter them again).
    """
    problem = replay_problem(letter, partitions)
    if problem is not None:
        raise NotReplayable(letter.id, problem)
    parsed = DeadLetterId.parse(letter.id)
    commit = Commit().xadd(letter.source_stream, dict[str, str | bytes](letter.fields))
    [result] = await (script or CommitScript()).run(redis, [commit.xdel(parsed.stream, parsed.entry_id)])
    if result.outcome is not Outcome.OK or len(result.added) != 1:
        raise RuntimeError(f"replaying {letter.id} failed: {result}")
    return result.added[0]


async def replay(
    redis: Redis, dead_letter_id: str, *, partitions: int | None = None, script: CommitScript | None = None
) -> tuple[DeadLetter, str]:
    """Replay the dead letter with this id (see :func:`replay_letter`): the letter, and the new entry's id.

    Raises :class:`InvalidDeadLetterId`, :class:`NoSuchDeadLetter` or :class:`NotReplayable`.
    """
    letter = await get(redis, dead_letter_id)
    if letter is None:
        raise NoSuchDeadLetter(dead_letter_id)
    return letter, await replay_letter(redis, letter, partitions=partitions, script=script)


async def purge(
    redis: Redis,
    partitions: int,
    ids: Sequence[str] | None = None,
    older_than_ms: int | None = None,
) -> int:
    """Delete dead letters; how many were deleted.

    With ``ids``, those (ids of no dead letter are skipped); with ``older_than_ms``,
    every dead letter that arrived longer ago than that by the Redis server's clock;
    with neither, all of them.  Raises :class:`InvalidDeadLetterId` for a malformed
    id before deleting anything.
    """
    if ids is not None and older_than_ms is not None:
        raise ValueError("purge either ids or by age, not both")
    if older_than_ms is not None and older_than_ms < 0:
        raise ValueError(f"older_than_ms must not be negative, not {older_than_ms}")
    if ids is not None:
        return await _delete(redis, [DeadLetterId.parse(dead_letter_id) for dead_letter_id in ids])
    if older_than_ms is None:
        async with redis.pipeline(transaction=False) as pipe:
            for p in range(partitions):
                pipe.xtrim(naming.dead_letter_stream(p), maxlen=0, approximate=False)
            return sum(int(n) for n in await pipe.execute())
    seconds, micros = await redis.time()
    cutoff_ms = int(seconds) * 1000 + int(micros) // 1000 - older_than_ms
    if cutoff_ms <= 0:
        return 0
    async with redis.pipeline(transaction=False) as pipe:
        for p in range(partitions):
            # entry ids start with the server's ms when the dead letter was written
            pipe.xtrim(naming.dead_letter_stream(p), minid=f"{cutoff_ms}-0", approximate=False)
        return sum(int(n) for n in await pipe.execute())


async def _delete(redis: Redis, ids: Iterable[DeadLetterId]) -> int:
    by_stream: dict[str, set[str]] = {}
    for parsed in ids:
        by_stream.setdefault(parsed.stream, set()).add(parsed.entry_id)
    if not by_stream:
        return 0
    async with redis.pipeline(transaction=False) as pipe:
        for stream, entry_ids in by_stream.items():
            pipe.xdel(stream, *sorted(entry_ids))
        return sum(int(n) for n in await pipe.execute())
