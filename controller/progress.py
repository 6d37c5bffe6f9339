"""Live progress over Server-Sent Events: one reader per controller process, fanned out in memory.

The :class:`ProgressHub` runs one ``XREAD`` loop over every partition's progress
stream (see "Progress records" in ``docs/wire-contract.md``) while at least one
client listens, decodes each record at most once, and hands it to its
subscribers without ever waiting for one: each subscriber has a bounded buffer,
and one that overflows is ended with an ``overflow`` event naming the last id it
was sent, from which it resumes.  The number of clients therefore multiplies
neither the reads from Redis nor the work of the correlator.

Two streams are served from it (their wire format is in ``docs/api.md``):

* :func:`stream_workflow` — one workflow: subscribe first, then replay the
  history list from Redis, then the live lines with a greater ``seq`` (so no
  line is missed or repeated), and ``end`` once the workflow is terminal.
* :func:`stream_feed` — every workflow, filtered by definition and status.  Its
  event id is a *cursor*: the position in every partition's progress stream
  after the event (see :func:`encode_cursor`).  Resuming reads what was missed
  with ``XRANGE`` up to where the hub stood when the client subscribed, then
  joins the live fan-out at exactly that point.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import deque
from collections.abc import AsyncIterator, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import orjson
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from contracts import naming
from controller.errors import Unavailable
from controller.instance import TERMINAL, Instance
from participants.sdk.connection import DEFAULT_BLOCK_MS, MAX_BLOCK_MS
from participants.sdk.consumer import entry_order
from participants.sdk.logs import Outage
from participants.sdk.waiting import wait_until

log = logging.getLogger(__name__)

READ_COUNT = 500
"""Entries per stream per XREAD."""
RECONNECT_S = 1.0
RETRY_MS = 2_000
"""The reconnection delay the streams advise (their first line, ``retry:``)."""
CLOSE_TIMEOUT_S = 10.0
"""How long the last bytes of a stream may take to leave before the connection is cut."""
CATCH_UP_PAGE = 1_000
PAUSE_PER_CLIENT_S = 50e-6
MAX_PAUSE_S = 0.05
"""With many clients the hub reads at most every ``clients × PAUSE_PER_CLIENT_S`` (up to
``MAX_PAUSE_S``): each client then gets fewer, larger writes, which is most of the cost
of fanning out (a wake-up and a send per client per read)."""

EVENT_STREAM = "text/event-stream"
KEEPALIVE = b": keep-alive\n\n"
_TERMINAL = frozenset(status.value for status in TERMINAL)
_CURSOR_PART = re.compile(r"^([0-9a-z]{1,13})(?:-([0-9a-z]{1,13}))?$")
MAX_CURSOR_CHARS = 4_096

Position = tuple[int, int]
"""A stream entry id as (milliseconds, sequence)."""
T = TypeVar("T")


# --- lines -------------------------------------------------------------------------


@dataclass(slots=True)
class ProgressLine:
    """One history line of one workflow, decoded once and shared by every client it goes to."""

    workflow_id: str
    status: str
    seq: int
    type: str
    data: bytes
    """The JSON of the ``data:`` field: ``workflow_id``, ``workflow``, and the history line."""
    _frame: bytes | None = field(default=None, repr=False)

    @property
    def terminal(self) -> bool:
        return self.status in _TERMINAL

    def frame(self) -> bytes:
        """The event as the per-workflow stream sends it: ``id:`` is the line's ``seq``."""
        if self._frame is None:
            self._frame = b"id: %d\nevent: %s\ndata: %s\n\n" % (self.seq, self.type.encode(), self.data)
        return self._frame

    def feed_frame(self, cursor: str) -> bytes:
        """The event as the feed of every workflow sends it: ``id:`` is a cursor."""
        return b"id: %s\nevent: %s\ndata: %s\n\n" % (cursor.encode(), self.type.encode(), self.data)

    def at(self) -> Any:
        """The line's ``at`` as JSON has it."""
        return orjson.loads(self.data).get("at")


def _data(workflow_id: str, name: str, version: int, entry: bytes) -> bytes:
    head = orjson.dumps({"workflow_id": workflow_id, "workflow": {"name": name, "version": version}})
    if entry.startswith(b'{"'):
        # the line is a JSON object as the store wrote it: splice instead of decoding and re-encoding
        return head[:-1] + b"," + entry[1:]
    return orjson.dumps({**orjson.loads(entry), **orjson.loads(head)})


def line_of_record(fields: dict[bytes, bytes]) -> ProgressLine:
    """A progress record's line.  Raises ``KeyError`` or ``ValueError`` for a malformed record."""
    workflow_id = fields[b"workflow_id"].decode()
    data = _data(workflow_id, fields[b"workflow"].decode(), int(fields[b"version"]), fields[b"entry"])
    return ProgressLine(workflow_id, fields[b"status"].decode(), int(fields[b"seq"]), fields[b"type"].decode(), data)


def _line_or_none(fields: dict[bytes, bytes], entry_id: Any, stream: str | bytes) -> ProgressLine | None:
    """A progress record's line; None (and a warning) for a malformed record, which is skipped."""
    try:
        return line_of_record(fields)
    except (KeyError, ValueError) as exc:
        log.warning("skipping malformed progress record %s of %s: %r", entry_id, stream, exc)
        return None


def line_of_history(instance: Instance, raw: bytes) -> ProgressLine:
    """A line of the workflow's history list, exactly as the live record of it would be."""
    entry = orjson.loads(raw)
    data = _data(instance.id, instance.workflow.name, instance.workflow.version, raw)
    return ProgressLine(instance.id, entry["status"], entry["seq"], entry["type"], data)


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (name.encode(), orjson.dumps(data))


# --- cursors -----------------------------------------------------------------------


def _b36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    text = ""
    while True:
        number, digit = divmod(number, 36)
        text = digits[digit] + text
        if not number:
            return text


def _part(base_ms: int, position: Position) -> str:
    ms, seq = position
    if not ms and not seq:
        return ""  # a stream never written to
    return _b36(base_ms - ms) + (f"-{_b36(seq)}" if seq else "")


def _base_s(positions: Iterable[Position]) -> int:
    return -(-max(ms for ms, _ in positions) // 1000)  # whole seconds, rounded up


def encode_cursor(positions: Sequence[Position]) -> str:
    """An opaque, compact cursor for the position in every partition's progress stream.

    Layout: ``B.p0.p1…`` — ``B`` is a time in whole seconds (base 36) at or after every
    position; each ``p`` is that time minus the partition's entry id milliseconds
    (base 36), followed by ``-`` and the id's sequence number (base 36) unless it is 0,
    or empty for ``0-0``.  Busy partitions cost a few characters each.
    """
    base = _base_s(positions)
    return ".".join([_b36(base), *(_part(base * 1000, position) for position in positions)])


def decode_cursor(text: str, partitions: int) -> list[Position]:
    """The positions a cursor encodes; ``ValueError`` names what is wrong with it."""
    parts = text.split(".") if len(text) <= MAX_CURSOR_CHARS else []
    if len(parts) != partitions + 1 or not re.fullmatch(r"[0-9a-z]{1,10}", parts[0]):
        raise ValueError(f"is not a cursor of this deployment's {partitions} partitions (an id of /v1/events)")
    base_ms = int(parts[0], 36) * 1000
    positions = []
    for part in parts[1:]:
        if not part:
            positions.append((0, 0))
            continue
        found = _CURSOR_PART.match(part)
        if found is None or int(found[1], 36) > base_ms:
            raise ValueError(f"is not a cursor (an id of /v1/events): bad part {part!r}")
        positions.append((base_ms - int(found[1], 36), int(found[2], 36) if found[2] else 0))
    return positions


class _LiveCursor:
    """The hub's cursor, re-encoding only the partitions that moved since the last encoding."""

    def __init__(self, positions: list[bytes]) -> None:
        self.positions = positions
        self._parsed = [entry_order(entry_id) for entry_id in positions]
        self._base = _base_s(self._parsed)
        self._parts = [_part(self._base * 1000, position) for position in self._parsed]
        self._moved: set[int] = set()
        self._text: str | None = None

    def moved(self, partition: int, entry_id: bytes) -> None:
        self.positions[partition] = entry_id
        self._moved.add(partition)
        self._text = None

    def encode(self) -> str:
        if self._text is None:
            for partition in self._moved:
                self._parsed[partition] = entry_order(self.positions[partition])
            if self._moved and max(self._parsed[p][0] for p in self._moved) > self._base * 1000:
                self._base = _base_s(self._parsed)
                self._parts = [_part(self._base * 1000, position) for position in self._parsed]
            else:
                for partition in self._moved:
                    self._parts[partition] = _part(self._base * 1000, self._parsed[partition])
            self._moved.clear()
            self._text = ".".join([_b36(self._base), *self._parts])
        return self._text


# --- subscriptions -----------------------------------------------------------------


@dataclass(frozen=True)
class Ending:
    """Why the hub ended a subscription."""

    kind: Literal["overflow", "shutdown"]
    reason: str


class Subscription(Generic[T]):
    """One client's bounded buffer: the hub puts without waiting, the client's writer takes.

    The bound counts events.  A put into a buffer already holding ``limit`` events
    ends the subscription (``ended`` gets an :class:`Ending`) instead of waiting.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.last_event_id: str | None = None
        """The id of the last event handed to the connection; the writer keeps it current."""
        self.ended: asyncio.Future[Ending] = asyncio.get_running_loop().create_future()
        self._items: deque[T] = deque()
        self._events = 0
        self._waiter: asyncio.Future[None] | None = None
        self._keepalive = False
        self._active_at = asyncio.get_running_loop().time()

    def put(self, item: T, events: int = 1) -> bool:
        """Buffer ``item`` (``events`` events); False if the subscription has ended or just overflowed."""
        if self.ended.done():
            return False
        if self._events >= self.limit:
            self.end(Ending("overflow", f"the client fell more than {self.limit} events behind"))
            return False
        self._items.append(item)
        self._events += events
        self._active_at = -1.0  # set on the next tick: no clock read per put
        self._wake()
        return True

    def end(self, ending: Ending) -> None:
        if not self.ended.done():
            self.ended.set_result(ending)
        self._items.clear()
        self._events = 0

    def tick(self, now: float, idle_s: float) -> None:
        """Ask for a keep-alive if nothing was put for ``idle_s`` (``now`` is the loop's time)."""
        if self._active_at < 0:
            self._active_at = now
        elif now - self._active_at >= idle_s:
            self._active_at = now
            self._keepalive = True
            self._wake()

    async def take(self) -> list[T]:
        """Everything buffered, waiting for something; an empty list asks for a keep-alive."""
        while not self._items and not self._keepalive:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items = list(self._items)
        self._items.clear()
        self._events = 0
        self._keepalive = False
        return items

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


@dataclass(frozen=True)
class FeedFilter:
    """Which lines a feed client wants: of these definitions, leaving the workflow in these statuses.
    ``None`` matches any."""

    workflows: frozenset[str] | None = None
    statuses: frozenset[str] | None = None
    _workflows: frozenset[bytes] | None = field(default=None, init=False, compare=False, repr=False)
    _statuses: frozenset[bytes] | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        # records are matched on their raw fields, before any decoding
        if self.workflows is not None:
            object.__setattr__(self, "_workflows", frozenset(w.encode() for w in self.workflows))
        if self.statuses is not None:
            object.__setattr__(self, "_statuses", frozenset(s.encode() for s in self.statuses))

    def matches(self, fields: dict[bytes, bytes]) -> bool:
        return (self._workflows is None or fields.get(b"workflow") in self._workflows) and (
            self._statuses is None or fields.get(b"status") in self._statuses
        )


@dataclass(frozen=True, slots=True)
class FeedBatch:
    """The events of one read that match one filter, framed once for every client of that filter."""

    chunk: bytes
    events: tuple[tuple[int, bytes, bytes, str], ...]
    """(partition, entry id, frame, cursor) of each event, for a client that must skip some."""

    @property
    def last_id(self) -> str:
        return self.events[-1][3]


class _FeedGroup:
    def __init__(self, feed_filter: FeedFilter) -> None:
        self.filter = feed_filter
        self.subscriptions: set[Subscription[FeedBatch]] = set()
        self.pending: list[tuple[int, bytes, bytes, str]] = []


# --- the hub -----------------------------------------------------------------------


class ProgressHub:
    """Reads every partition's progress stream once per process and fans each line out in memory.

    Run :meth:`run` as a background task and :meth:`stop` it; give it a Redis client
    of its own (it blocks in ``XREAD`` for up to ``block_ms``).  It reads only while
    someone listens: the first subscriber pins the end of every stream, so a client
    sees every line committed after it subscribed.
    """

    def __init__(
        self,
        redis: Redis,
        partitions: int,
        *,
        block_ms: int = DEFAULT_BLOCK_MS,
        buffer_events: int = 1_000,
        keepalive_s: float = 15.0,
    ) -> None:
        if not 0 < block_ms <= MAX_BLOCK_MS:
            raise ValueError(f"block_ms must be within 1..{MAX_BLOCK_MS}, not {block_ms}")
        self.redis = redis
        self.partitions = partitions
        self.block_ms = block_ms
        self.buffer_events = buffer_events
        self.keepalive_s = keepalive_s
        self.streams = [naming.progress_stream(p) for p in range(partitions)]
        self._partition_of = {stream.encode(): p for p, stream in enumerate(self.streams)}
        self._cursor: _LiveCursor | None = None  # None while nobody listens
        self._workflows: dict[bytes, set[Subscription[ProgressLine]]] = {}
        self._feeds: dict[FeedFilter, _FeedGroup] = {}
        self._wanted = asyncio.Event()
        self._pinning = asyncio.Lock()
        self._stopping = False
        self._stopped = asyncio.Event()
        self.clients = 0
        """Connected SSE clients (of both streams)."""
        self.reads = 0
        """XREAD calls that returned."""
        self.overflows = 0
        """Clients ended because they fell too far behind."""

    # --- subscribing ---------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def watch(self, workflow_id: str) -> AsyncIterator[Subscription[ProgressLine]]:
        """Every line of ``workflow_id`` dispatched from now on, until the block exits."""
        await self._listen()
        subscription: Subscription[ProgressLine] = Subscription(self.buffer_events)
        key = workflow_id.encode()
        self._workflows.setdefault(key, set()).add(subscription)
        self.clients += 1
        try:
            yield subscription
        finally:
            self.clients -= 1
            watchers = self._workflows.get(key)
            if watchers is not None:
                watchers.discard(subscription)
                if not watchers:
                    del self._workflows[key]

    @contextlib.asynccontextmanager
    async def follow(self, feed_filter: FeedFilter) -> AsyncIterator[tuple[Subscription[FeedBatch], list[Position]]]:
        """Every matching line dispatched from now on, and the position the hub stands at now:
        what a resuming client missed lies between its cursor and that position."""
        await self._listen()
        assert self._cursor is not None
        subscription: Subscription[FeedBatch] = Subscription(self.buffer_events)
        group = self._feeds.get(feed_filter)
        if group is None:
            group = self._feeds[feed_filter] = _FeedGroup(feed_filter)
        group.subscriptions.add(subscription)
        self.clients += 1
        here = [entry_order(entry_id) for entry_id in self._cursor.positions]
        try:
            yield subscription, here
        finally:
            self.clients -= 1
            group.subscriptions.discard(subscription)
            if not group.subscriptions and self._feeds.get(feed_filter) is group:
                del self._feeds[feed_filter]

    async def _listen(self) -> None:
        """Make sure the hub reads; pin the end of every stream if it was idle."""
        if self._stopping:
            raise Unavailable("the controller is stopping")
        if self._cursor is not None:
            return
        async with self._pinning:
            if self._cursor is None:
                self._cursor = _LiveCursor(await self._ends())
                self._wanted.set()
        if self._stopping:
            raise Unavailable("the controller is stopping")

    async def _ends(self) -> list[bytes]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in self.streams:
                pipe.xrevrange(stream, "+", "-", count=1)
            rows = await pipe.execute()
        return [row[0][0] if row else b"0-0" for row in rows]

    # --- running -------------------------------------------------------------------

    async def run(self) -> None:
        """Read and dispatch until :meth:`stop`; then end every subscription."""
        ticker = asyncio.create_task(self._keepalives(), name="progress keep-alives")
        outage = Outage(log, "progress feed (reading Redis)")
        try:
            while not self._stopping:
                if self._cursor is None or not self.clients:
                    self._cursor = None  # nobody listens: stop reading, pin afresh when someone does
                    self._wanted.clear()
                    await self._wanted.wait()
                    continue
                positions = dict(zip(self.streams, self._cursor.positions, strict=True))
                try:
                    reply: Any = await self.redis.xread(positions, count=READ_COUNT, block=self.block_ms)  # type: ignore[arg-type]
                except (RedisError, OSError) as exc:
                    outage.failed(exc)
                    await wait_until(self._stopped, RECONNECT_S)
                    continue
                outage.recovered()
                self.reads += 1
                if reply:
                    self._dispatch(reply)
                    pause = min(self.clients * PAUSE_PER_CLIENT_S, MAX_PAUSE_S)
                    if pause >= 0.001:
                        await asyncio.sleep(pause)
        finally:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
            self.end_streams("the controller is stopping")

    def stop(self) -> None:
        """Ask :meth:`run` to return (within ``block_ms``)."""
        self._stopping = True
        self._stopped.set()
        self._wanted.set()

    def end_streams(self, reason: str) -> None:
        """End every subscription (on shutdown): each client closes and may resume elsewhere."""
        for subscription in self._subscriptions():
            subscription.end(Ending("shutdown", reason))

    def _subscriptions(self) -> list[Subscription[Any]]:
        found: list[Subscription[Any]] = [s for watchers in self._workflows.values() for s in watchers]
        found += [s for group in self._feeds.values() for s in group.subscriptions]
        return found

    async def _keepalives(self) -> None:
        # idle streams get a comment so proxies keep them open: after keepalive_s to 1.25 × keepalive_s
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.keepalive_s / 4)
            now = loop.time()
            for subscription in self._subscriptions():
                subscription.tick(now, self.keepalive_s)

    def _dispatch(self, reply: list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]) -> None:
        cursor = self._cursor
        assert cursor is not None
        groups = list(self._feeds.values())
        for stream, entries in reply:
            partition = self._partition_of[stream]
            for entry_id, fields in entries:
                cursor.moved(partition, entry_id)
                watchers = self._workflows.get(fields.get(b"workflow_id", b"")) if self._workflows else None
                matching = [group for group in groups if group.filter.matches(fields)] if groups else []
                if not watchers and not matching:
                    continue
                line = _line_or_none(fields, entry_id, stream)
                if line is None:
                    continue
                for watcher in list(watchers or ()):
                    self._put(watcher, line)
                if matching:
                    at = cursor.encode()
                    event = (partition, entry_id, line.feed_frame(at), at)
                    for group in matching:
                        group.pending.append(event)
        for group in groups:
            if group.pending:
                events = tuple(group.pending)
                group.pending.clear()
                batch = FeedBatch(b"".join(event[2] for event in events), events)
                for follower in list(group.subscriptions):
                    self._put(follower, batch, len(events))

    def _put(self, subscription: Subscription[T], item: T, events: int = 1) -> None:
        if subscription.ended.done():
            return
        if not subscription.put(item, events):
            self.overflows += 1


# --- serving the streams -----------------------------------------------------------


async def _open(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": EVENT_STREAM, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    response.force_close()  # a stream is never followed by another request on its connection
    await response.prepare(request)
    with contextlib.suppress(ConnectionError):  # gone already: the writer's first write finds out, quietly
        await response.write(b"retry: %d\n\n" % RETRY_MS)  # also sends the headers now
    return response


async def _serve(
    request: web.Request,
    response: web.StreamResponse,
    subscription: Subscription[Any],
    pump: Coroutine[Any, Any, None],
    what: str,
) -> None:
    """Run ``pump`` (which writes the stream) until it returns, the client goes, or the hub
    ends the subscription — which interrupts even a write stuck on a client that stopped reading."""
    writer = asyncio.create_task(pump, name=f"sse {what}")
    try:
        await asyncio.wait((writer, subscription.ended), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not writer.done():
            writer.cancel()
            await asyncio.wait((writer,))
    last = b""
    if writer.cancelled():  # by us: the hub ended the subscription
        ending = subscription.ended.result()
        if ending.kind == "overflow":
            log.info("%s: closing a client that fell behind (last event %s)", what, subscription.last_event_id)
            reason = f"{ending.reason}; resume with Last-Event-ID"
            last = _event("overflow", {"reason": reason, "last_event_id": subscription.last_event_id})
    elif (exc := writer.exception()) is not None:
        if isinstance(exc, ConnectionError):
            log.debug("%s: the client went away", what)
            return
        if isinstance(exc, RedisError | OSError):
            log.warning("%s: Redis failed, closing the stream: %s", what, exc)
        else:
            log.error("%s failed, closing the stream", what, exc_info=exc)
    await _close(request, response, last)


async def _close(request: web.Request, response: web.StreamResponse, last: bytes) -> None:
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            if last:
                await response.write(last)
            await response.write_eof()
    except ConnectionError:
        pass
    except TimeoutError:
        # the client does not read: drop the connection rather than its buffered bytes forever
        if request.transport is not None:
            request.transport.abort()


async def stream_workflow(
    request: web.Request, hub: ProgressHub, redis: Redis, instance: Instance, after: int | None
) -> web.StreamResponse:
    """Serve ``GET /v1/workflows/{id}/events`` for ``instance`` (which exists), resuming after
    line ``after`` if given."""
    async with hub.watch(instance.id) as subscription:
        # subscribed first, so a line committed from now on is in the list read below or
        # dispatched to us afterwards (or both: the writer skips any seq it has sent)
        key = naming.history_key(naming.partition_of(instance.id, hub.partitions), instance.id)
        # from the last line the client has, to learn the current status; it is not sent again
        raw: list[bytes] = await redis.lrange(key, max(after or 0, 0), -1)  # type: ignore[assignment]
        replay = [line_of_history(instance, line) for line in raw]
        response = await _open(request)
        subscription.last_event_id = None if after is None else str(after)
        pump = _workflow_pump(response, subscription, instance, replay, -1 if after is None else after)
        await _serve(request, response, subscription, pump, f"workflow {instance.id} events")
        return response


async def _workflow_pump(
    response: web.StreamResponse,
    subscription: Subscription[ProgressLine],
    instance: Instance,
    replay: list[ProgressLine],
    last: int,
) -> None:
    frames = []
    for line in replay:
        if line.seq > last:
            frames.append(line.frame())
            last = line.seq
    current = replay[-1] if replay else None
    if current.terminal if current is not None else instance.status in TERMINAL:
        # finished before the client came: its finished_at, not the time of a late line
        finished_at = instance.model_dump(mode="json")["finished_at"] if instance.status in TERMINAL else None
        status = current.status if current is not None else instance.status.value
        frames.append(
            _event(
                "end",
                {
                    "workflow_id": instance.id,
                    "status": status,
                    "finished_at": finished_at or (current.at() if current else None),
                },
            )
        )
        subscription.last_event_id = str(last)
        await response.write(b"".join(frames))
        return
    if frames:
        # the id is recorded before the write: the bytes are in the connection's buffer once it is called
        subscription.last_event_id = str(last)
        await response.write(b"".join(frames))
    while True:
        lines = await subscription.take()
        if not lines:
            await response.write(KEEPALIVE)
            continue
        frames = []
        end: ProgressLine | None = None
        for line in lines:
            if line.seq <= last:
                continue
            frames.append(line.frame())
            last = line.seq
            if line.terminal:
                end = line
                frames.append(
                    _event("end", {"workflow_id": line.workflow_id, "status": line.status, "finished_at": line.at()})
                )
                break
        if frames:
            subscription.last_event_id = str(last)
            await response.write(b"".join(frames))
        if end is not None:
            return


async def stream_feed(
    request: web.Request,
    hub: ProgressHub,
    redis: Redis,
    feed_filter: FeedFilter,
    cursor: list[Position] | None,
) -> web.StreamResponse:
    """Serve ``GET /v1/events``: live from now, or from just after ``cursor``."""
    async with hub.follow(feed_filter) as (subscription, here):
        response = await _open(request)
        pump = _feed_pump(response, subscription, redis, hub.streams, feed_filter, cursor, here)
        await _serve(request, response, subscription, pump, "events feed")
        return response


async def _feed_pump(
    response: web.StreamResponse,
    subscription: Subscription[FeedBatch],
    redis: Redis,
    streams: list[str],
    feed_filter: FeedFilter,
    cursor: list[Position] | None,
    here: list[Position],
) -> None:
    # a partition where the client is ahead of this hub (its cursor came from a faster
    # controller): skip the live events it already has until the hub passes it
    ahead: dict[int, Position] = {}
    if cursor is None:
        subscription.last_event_id = encode_cursor(here)  # resuming from here misses nothing
    else:
        subscription.last_event_id = encode_cursor(cursor)
        await _catch_up(response, subscription, redis, streams, feed_filter, cursor, here)
        ahead = {p: mine for p, (mine, hub_at) in enumerate(zip(cursor, here, strict=True)) if mine > hub_at}
    while True:
        batches = await subscription.take()
        if not batches:
            await response.write(KEEPALIVE)
            continue
        if ahead:
            frames = []
            for batch in batches:
                for partition, entry_id, frame, at in batch.events:
                    floor = ahead.get(partition)
                    if floor is not None:
                        if entry_order(entry_id) <= floor:
                            continue
                        del ahead[partition]
                    frames.append(frame)
                    subscription.last_event_id = at
            chunk = b"".join(frames)
        else:
            chunk = b"".join(batch.chunk for batch in batches)
            subscription.last_event_id = batches[-1].last_id
        if chunk:
            await response.write(chunk)


async def _catch_up(
    response: web.StreamResponse,
    subscription: Subscription[FeedBatch],
    redis: Redis,
    streams: list[str],
    feed_filter: FeedFilter,
    cursor: list[Position],
    here: list[Position],
) -> None:
    """Send what happened between ``cursor`` and ``here``, partition by partition; each event's
    cursor counts the partitions already sent as done up to ``here``.  First, if some of it
    is gone (trimmed: see :func:`_trimmed`), say so with a ``gap`` event."""
    gone = await _trimmed(redis, streams, cursor)
    if gone:
        reason = "progress records after Last-Event-ID were trimmed (--progress-maxlen): lines are missing"
        await response.write(_event("gap", {"partitions": gone, "reason": reason}))
    positions = list(cursor)
    for partition, stream in enumerate(streams):
        start, end = cursor[partition], here[partition]
        low = f"({start[0]}-{start[1]}"
        while start < end:  # left by the break below once a page comes back short
            page: Any = await redis.xrange(stream, min=low, max=f"{end[0]}-{end[1]}", count=CATCH_UP_PAGE)
            frames = []
            for entry_id, fields in page:
                positions[partition] = entry_order(entry_id)
                if not feed_filter.matches(fields):
                    continue
                line = _line_or_none(fields, entry_id, stream)
                if line is None:
                    continue
                at = encode_cursor(positions)
                frames.append(line.feed_frame(at))
                subscription.last_event_id = at
            if frames:
                await response.write(b"".join(frames))
            if len(page) < CATCH_UP_PAGE:
                break
            low = "(" + page[-1][0].decode()
        positions[partition] = max(start, end)


async def _trimmed(redis: Redis, streams: list[str], cursor: list[Position]) -> list[int]:
    """The partitions whose progress records just after ``cursor`` may be gone: the stream
    lost entries from its head and keeps none as old as the cursor.  Needs Redis 7 (XINFO
    STREAM's ``entries-added``); with an older server nothing is reported."""
    async with redis.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xinfo_stream(stream)
        infos = await pipe.execute(raise_on_error=False)
    gone = []
    for partition, (info, position) in enumerate(zip(infos, cursor, strict=True)):
        if isinstance(info, Exception) or "entries-added" not in info:  # no such stream yet, or Redis 6
            continue
        length, added = int(info["length"]), int(info["entries-added"])
        oldest = info["recorded-first-entry-id"] if length else info["last-generated-id"]
        if added > length and entry_order(oldest) > position:
            gone.append(partition)
    return gone
