"""Participant liveness: which workers run, what they subscribe to, how far behind they are.

Two sources:

* the heartbeat hash (:func:`contracts.naming.heartbeat_key`): one field
  ``<participant>/<consumer>`` per consumer holding a JSON beat, rewritten every
  ``interval_ms`` by the SDK runner and removed when the runner stops cleanly;
* ``XINFO GROUPS`` of every subscribed stream of every partition, all in one
  pipelined round trip: per consumer group, the entries it holds pending and
  (Redis 7) its ``lag``, the entries not yet delivered to it.

A consumer is *live* while its last beat is younger than ``stale_after_s``
(default: three of the heartbeat intervals the beat announces).  A consumer whose
beat is older stays listed, as not live: a worker that died without stopping
(SIGKILL, a lost host) leaves its beat behind, and that is worth seeing.  Beats
older than ``forget_after_s`` are deleted.  A beat's age compares the worker's
clock with this process's, so clock skew between hosts counts against the
threshold.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from contracts import naming
from contracts.definitions import StepDefinition, WorkflowDefinition
from participants.sdk.connection import text
from participants.sdk.scripts import Script

log = logging.getLogger(__name__)

STALE_AFTER_BEATS = 3
"""A consumer is live while its last beat is younger than this many of its heartbeat intervals."""
DEFAULT_INTERVAL_MS = 5_000
"""The interval assumed for a beat that does not announce its own (the SDK's default)."""
COUNT_CAP = 10_000
"""At most this many undelivered entries are counted per stream where Redis does not report ``lag``."""

# Entries of stream KEYS[1] after id ARGV[1] (exclusive), at most ARGV[2]: counted
# on the server so no entry crosses the network.
_COUNT_AFTER = Script("return #redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])")
# Delete hash field ARGV[1] only if it still holds ARGV[2]: a beat written since it was read survives.
_FORGET = Script(
    "if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end return 0"
)


# --- the heartbeat, as written by participants.sdk.runner.Runner._beat ------------------


class _Subscription(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    compensation: bool = False


class _Beat(BaseModel):
    # unknown integer fields are the worker's counters (handled, failed, in_flight, …)
    model_config = ConfigDict(extra="allow")

    participant: str
    consumer: str
    at_ms: int
    group: str | None = None
    subscriptions: list[_Subscription] = Field(default_factory=list)
    interval_ms: int | None = Field(default=None, gt=0)
    partitions: int | None = None
    host: str | None = None
    pid: int | None = None
    started_at_ms: int | None = None

    def stats(self) -> dict[str, int]:
        extra = self.model_extra or {}
        return {name: value for name, value in extra.items() if isinstance(value, int) and not isinstance(value, bool)}


# --- views -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Lag:
    """How far one consumer group is behind on some streams."""

    undelivered: int = 0
    """Entries not yet delivered to the group."""
    pending: int = 0
    """Entries delivered to a consumer of the group and not yet acknowledged."""
    exact: bool = True
    """False when ``undelivered`` is a lower bound (more than :data:`COUNT_CAP` to count on a stream)."""

    @property
    def total(self) -> int:
        """The lag: entries the group has yet to finish."""
        return self.undelivered + self.pending

    def __add__(self, other: Lag) -> Lag:
        return Lag(self.undelivered + other.undelivered, self.pending + other.pending, self.exact and other.exact)

    def as_json(self) -> dict[str, Any]:
        return {"lag": self.total, "undelivered": self.undelivered, "pending": self.pending, "exact": self.exact}


def _sum(lags: Iterable[Lag]) -> Lag:
    total = Lag()
    for lag in lags:
        total += lag
    return total


@dataclass(frozen=True)
class ConsumerView:
    """One consumer of a participant, as its last heartbeat describes it."""

    name: str
    live: bool
    age_ms: int
    """Time since its last beat (0 if the worker's clock is ahead)."""
    last_beat_ms: int
    interval_ms: int
    host: str | None = None
    pid: int | None = None
    started_at_ms: int | None = None
    partitions: int | None = None
    stats: Mapping[str, int] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "live": self.live,
            "host": self.host,
            "pid": self.pid,
            "last_beat_at": _iso(self.last_beat_ms),
            "age_ms": self.age_ms,
            "interval_ms": self.interval_ms,
            "started_at": _iso(self.started_at_ms) if self.started_at_ms is not None else None,
            "partitions": self.partitions,
            "stats": dict(self.stats),
        }


@dataclass(frozen=True)
class SubscriptionView:
    """One message type a participant subscribes to, and its group's lag on it over every partition."""

    type: str
    compensation: bool
    live: bool
    """Whether a live consumer subscribes to it."""
    lag: Lag

    def as_json(self) -> dict[str, Any]:
        return {"type": self.type, "compensation": self.compensation, "live": self.live, **self.lag.as_json()}


@dataclass(frozen=True)
class ParticipantView:
    """A participant (one consumer group): its consumers and its subscriptions."""

    name: str
    group: str
    consumers: tuple[ConsumerView, ...]
    subscriptions: tuple[SubscriptionView, ...]

    @property
    def live(self) -> bool:
        return any(consumer.live for consumer in self.consumers)

    @property
    def lag(self) -> Lag:
        return _sum(sub.lag for sub in self.subscriptions)

    def live_types(self) -> set[str]:
        """Every type some live consumer of this participant subscribes to."""
        return {sub.type for sub in self.subscriptions if sub.live}

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "group": self.group,
            "live": self.live,
            **self.lag.as_json(),
            "consumers": [consumer.as_json() for consumer in self.consumers],
            "subscriptions": [sub.as_json() for sub in self.subscriptions],
        }


@dataclass(frozen=True)
class GroupView:
    """A consumer group's lag per message type, over every partition (the controller's group)."""

    group: str
    types: Mapping[str, Lag]

    @property
    def lag(self) -> Lag:
        return _sum(self.types.values())

    def as_json(self) -> dict[str, Any]:
        return {
            "group": self.group,
            **self.lag.as_json(),
            "types": [{"type": name, **lag.as_json()} for name, lag in sorted(self.types.items())],
        }


@dataclass(frozen=True)
class Survey:
    """What :func:`survey` found: the participants, by name, and the controller's group."""

    participants: tuple[ParticipantView, ...]
    controller: GroupView


class Uncovered(NamedTuple):
    """A message type a step needs handled that no live consumer of its participant subscribes
    to, and how many of them wait for the participant's group meanwhile (see :func:`waiting`)."""

    definition: WorkflowDefinition
    step: StepDefinition
    message_type: str
    lag: Lag | None = None

    @property
    def group(self) -> str:
        return naming.participant_group(self.step.participant)

    @property
    def role(self) -> str:
        """``trigger``, ``command`` (of an orchestrated step) or ``compensation``."""
        if self.step.compensation and self.message_type == self.step.compensation.command:
            return "compensation"
        return "command" if self.step.orchestrated else "trigger"

    def as_json(self) -> dict[str, Any]:
        return {
            "workflow": self.definition.name,
            "version": self.definition.version,
            "step": self.step.name,
            "participant": self.step.participant,
            "type": self.message_type,
            "role": self.role,
            **(self.lag.as_json() if self.lag is not None else {}),
        }


async def waiting(redis: Redis, partitions: int, uncovered: list[Uncovered]) -> list[Uncovered]:
    """``uncovered``, each with its group's lag on its type: the messages that wait for a
    worker nobody runs (a participant stopped cleanly leaves no heartbeat to list it by)."""
    wanted: dict[str, set[str]] = {}
    for missing in uncovered:
        wanted.setdefault(missing.group, set()).add(missing.message_type)
    lags = await _lags(redis, partitions, wanted)
    return [missing._replace(lag=lags.get((missing.group, missing.message_type), Lag())) for missing in uncovered]


# --- reading ---------------------------------------------------------------------------


async def participants(
    redis: Redis,
    partitions: int,
    *,
    now_ms: int | None = None,
    stale_after_s: float | None = None,
    forget_after_s: float | None = None,
) -> list[ParticipantView]:
    """Every participant with a heartbeat, by name; see :func:`survey`."""
    found = await survey(redis, partitions, now_ms=now_ms, stale_after_s=stale_after_s, forget_after_s=forget_after_s)
    return list(found.participants)


async def survey(
    redis: Redis,
    partitions: int,
    controller_types: Collection[str] = (),
    *,
    now_ms: int | None = None,
    stale_after_s: float | None = None,
    forget_after_s: float | None = None,
) -> Survey:
    """The participants with a heartbeat, by name, and the lag of the controller's
    group on ``controller_types``.

    A consumer is live while its beat is younger than ``stale_after_s`` (None:
    :data:`STALE_AFTER_BEATS` of its own heartbeat intervals); an older beat is
    listed as not live, and deleted once it is older than ``forget_after_s`` as
    well (None: never).  A participant's subscriptions are those of all its listed
    consumers, each marked live if a live consumer has it.

    The lag of a group on a type is summed over ``partitions``: entries not yet
    delivered to the group plus entries pending in it.  Redis 7 reports the
    undelivered count as ``lag`` in ``XINFO GROUPS``.  Redis 6.2 does not, Redis 7
    gives up on it (nil) after entries were deleted from the middle of the stream,
    and after replaying its AOF it counts entries the group had read as undelivered;
    so unless it says 0, the entries after the group's ``last-delivered-id`` are
    counted on the server in a second round trip — exactly up to :data:`COUNT_CAP`
    per stream; beyond, Redis's count stands if it is larger, else ``undelivered``
    is a lower bound and ``exact`` is false.
    A stream that does not exist yet has nothing to deliver; a group missing on an
    existing stream is counted as if it had read nothing.
    """
    now = now_ms if now_ms is not None else int(time.time() * 1000)
    beats = await _read_beats(redis)
    kept: list[tuple[_Beat, ConsumerView]] = []
    forget: list[tuple[str, bytes]] = []
    for beat_field, raw, beat in beats:
        view = _consumer(beat, now, stale_after_s)
        if forget_after_s is not None and not view.live and view.age_ms > forget_after_s * 1000:
            forget.append((beat_field, raw))
        else:
            kept.append((beat, view))
    if forget:
        await _forget(redis, forget)

    by_name: dict[str, list[tuple[_Beat, ConsumerView]]] = {}
    for beat, view in kept:
        by_name.setdefault(beat.participant, []).append((beat, view))
    groups: dict[str, str] = {}
    wanted: dict[str, set[str]] = {naming.CONTROLLER_GROUP: set(controller_types)}
    for name, members in by_name.items():
        newest = max(members, key=lambda member: member[0].at_ms)[0]
        group = groups[name] = newest.group or naming.participant_group(name)
        wanted.setdefault(group, set()).update(sub.type for beat, _ in members for sub in beat.subscriptions)
    lags = await _lags(redis, partitions, wanted)

    views = tuple(_participant(name, groups[name], by_name[name], lags) for name in sorted(by_name))
    controller = GroupView(
        naming.CONTROLLER_GROUP, {t: lags.get((naming.CONTROLLER_GROUP, t), Lag()) for t in controller_types}
    )
    return Survey(views, controller)


def uncovered_steps(definitions: Iterable[WorkflowDefinition], views: Iterable[ParticipantView]) -> list[Uncovered]:
    """Every message type a step needs handled — its trigger (its command if it is
    orchestrated) and its compensation command — to which no live consumer of the
    step's participant subscribes, in definition and step order.

    A consumer of another participant does not count: it reads through another
    consumer group, so the step's participant would never see the message.
    """
    covered: dict[str, set[str]] = {}
    for view in views:
        covered.setdefault(view.name, set()).update(view.live_types())
    missing: list[Uncovered] = []
    for definition in definitions:
        for step in definition.steps:
            needed = [step.command if step.orchestrated and step.command else step.trigger]
            if step.compensation:
                needed.append(step.compensation.command)
            have = covered.get(step.participant, set())
            missing += [
                Uncovered(definition, step, message_type) for message_type in needed if message_type not in have
            ]
    return missing


# --- helpers ---------------------------------------------------------------------------


async def announced_types(redis: Redis) -> set[str]:
    """Every message type a participant's heartbeat announces (a malformed beat is skipped, with a warning)."""
    return {subscription.type for _, _, beat in await _read_beats(redis) for subscription in beat.subscriptions}


async def _read_beats(redis: Redis) -> list[tuple[str, bytes, _Beat]]:
    """Every beat of the heartbeat hash that parses, as (field, raw value, beat)."""
    raw = await redis.hgetall(naming.heartbeat_key())
    beats: list[tuple[str, bytes, _Beat]] = []
    for name, stored in raw.items():
        value = stored.encode() if isinstance(stored, str) else stored
        beat_field = text(name)
        try:
            beat = _Beat.model_validate_json(value)
        except ValidationError as exc:
            # another writer's mistake must not hide every other participant
            log.warning("ignoring the malformed heartbeat %r: %s", beat_field, exc.errors()[0]["msg"])
            continue
        beats.append((beat_field, value, beat))
    return beats


def _participant(
    name: str, group: str, members: list[tuple[_Beat, ConsumerView]], lags: Mapping[tuple[str, str], Lag]
) -> ParticipantView:
    compensation: dict[str, bool] = {}
    live: dict[str, bool] = {}
    for beat, consumer in members:
        for sub in beat.subscriptions:
            compensation[sub.type] = compensation.get(sub.type, False) or sub.compensation
            live[sub.type] = live.get(sub.type, False) or consumer.live
    subscriptions = tuple(
        SubscriptionView(t, compensation[t], live[t], lags.get((group, t), Lag())) for t in sorted(compensation)
    )
    consumers = tuple(sorted((consumer for _, consumer in members), key=lambda consumer: consumer.name))
    return ParticipantView(name, group, consumers, subscriptions)


def _consumer(beat: _Beat, now_ms: int, stale_after_s: float | None) -> ConsumerView:
    interval_ms = beat.interval_ms or DEFAULT_INTERVAL_MS
    stale_ms = stale_after_s * 1000 if stale_after_s is not None else STALE_AFTER_BEATS * interval_ms
    age_ms = max(0, now_ms - beat.at_ms)
    return ConsumerView(
        name=beat.consumer,
        live=age_ms <= stale_ms,
        age_ms=age_ms,
        last_beat_ms=beat.at_ms,
        interval_ms=interval_ms,
        host=beat.host,
        pid=beat.pid,
        started_at_ms=beat.started_at_ms,
        partitions=beat.partitions,
        stats=beat.stats(),
    )


async def _forget(redis: Redis, beats: list[tuple[str, bytes]]) -> None:
    key = naming.heartbeat_key()
    results = await _FORGET.call_many(redis, [([key], [beat_field, raw]) for beat_field, raw in beats])
    for (beat_field, _), result in zip(beats, results, strict=True):
        if isinstance(result, Exception):
            log.warning("could not delete the stale heartbeat %r: %s", beat_field, result)
        elif result:
            log.info("deleted the stale heartbeat %r", beat_field)


async def _lags(redis: Redis, partitions: int, wanted: Mapping[str, Collection[str]]) -> dict[tuple[str, str], Lag]:
    """(group, type) -> the group's lag on the type over every partition."""
    readers: dict[str, list[str]] = {}  # message type -> the groups that read it
    for group, types in wanted.items():
        for message_type in types:
            readers.setdefault(message_type, []).append(group)
    streams = [(naming.message_stream(p, t), t) for t in sorted(readers) for p in range(partitions)]
    if not streams:
        return {}
    async with redis.pipeline(transaction=False) as pipe:
        for stream, _ in streams:
            pipe.xinfo_groups(stream)
        replies = await pipe.execute(raise_on_error=False)

    lags: dict[tuple[str, str], Lag] = {}
    # (group, type, stream, last delivered id, pending, Redis's count) where Redis reported no
    # undelivered count, or one not 0: after a restart that replayed the AOF, Redis 7 counts
    # entries a group read before as undelivered (entries-read is lost), so a count is checked
    to_count: list[tuple[str, str, str, str, int, int | None]] = []
    for (stream, message_type), reply in zip(streams, replies, strict=True):
        if isinstance(reply, ResponseError) and "no such key" in str(reply).lower():
            continue  # nothing was ever written or read there
        if isinstance(reply, Exception):
            raise reply
        found = {text(_get(info, "name")): info for info in reply}
        for group in readers[message_type]:
            key = (group, message_type)
            info = found.get(group)
            if info is None:
                to_count.append((group, message_type, stream, "0-0", 0, None))
                continue
            pending = int(_get(info, "pending") or 0)
            undelivered = _get(info, "lag")
            if undelivered is None or int(undelivered) > 0:  # Redis 6.2, Redis 7 that cannot tell, or a count to check
                last = text(_get(info, "last-delivered-id") or "0-0")
                reported = None if undelivered is None else int(undelivered)
                to_count.append((group, message_type, stream, last, pending, reported))
            else:
                lags[key] = lags.get(key, Lag()) + Lag(0, pending)
    if to_count:
        counts = await _COUNT_AFTER.call_many(
            redis, [([stream], [last, str(COUNT_CAP)]) for _, _, stream, last, _, _ in to_count]
        )
        for (group, message_type, _, _, pending, reported), count in zip(to_count, counts, strict=True):
            if isinstance(count, Exception):
                raise count
            key = (group, message_type)
            counted = int(count)
            if counted < COUNT_CAP:  # all of them counted: exact, whatever Redis said
                lag = Lag(counted, pending)
            elif reported is not None and reported >= counted:  # more than the cap: Redis's count fits
                lag = Lag(reported, pending)
            else:
                lag = Lag(counted, pending, exact=False)
            lags[key] = lags.get(key, Lag()) + lag
    return lags


def _get(info: Mapping[Any, Any], name: str) -> Any:
    """A member of an XINFO reply, whichever way the client decoded its names."""
    return info[name] if name in info else info.get(name.encode())


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()
