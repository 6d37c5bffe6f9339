"""Runs a participant against Redis Streams.

One :class:`~participants.sdk.consumer.GroupReader` reads every subscribed
stream of every partition (one XREADGROUP).  Each batch is decoded once, checked
against the participant's outcome records (one pipelined EXISTS), handled with
bounded concurrency, and committed in one pipeline of atomic commits: per entry,
the outcome record, the emitted replies and the XACK, all or nothing.  So an
entry is acknowledged only once its outcome is durably emitted, and a redelivery
is acknowledged without running the handler again.

Beside the read loop a maintenance loop

* keeps this consumer's in-flight and deferred entries from looking idle
  (``XCLAIM … JUSTID`` to itself: resets the idle time, not the delivery count),
  so neither its own backoff nor a peer's takeover picks them up while they are
  being handled;
* lets entries deferred by ``Retry(delay)`` become due once the delay is over;
* asks :meth:`GroupReader.pending` for entries due for another try (its own
  failures after a backoff, a dead peer's after ``claim_idle_ms``) and for entries
  that failed too often, which it dead-letters with the last error.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from types import TracebackType

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from contracts import naming
from contracts.envelope import DecodeError, Envelope, derived_message_id, encode, utcnow
from contracts.messages import PayloadError, Wire
from participants.sdk import tracing
from participants.sdk.autopipeline import AutoPipelineRedis
from participants.sdk.commit import Commit, CommitResult, CommitScript, Outcome
from participants.sdk.connection import (
    DEFAULT_BLOCK_MS,
    MAX_BLOCK_MS,
    connect,
    own,
    refusing_writes,
    unavailable,
)
from participants.sdk.consumer import Entry, GroupReader, RetryPolicy, dead_letter_commit, decode_entry_parsed
from participants.sdk.errors import Reject, Retry
from participants.sdk.logs import Outage, log_context
from participants.sdk.metrics import DeadLetterReason, HandlerOutcome, MetricsServer, RunnerMetrics, dead_letter_reason
from participants.sdk.participant import Message, Participant, Reply
from participants.sdk.waiting import through_outages, wait_until

log = logging.getLogger(__name__)

OUTCOME_TTL_S = 7 * 86_400
_PAUSE_AFTER_ERROR_S = 0.5
_STOP_GRACE_S = 5.0

_Key = tuple[str, str]  # (stream, entry id)
_Decoded = tuple[Entry, Envelope, Wire | None]  # an entry, its envelope, its payload as validated (decode_entry_parsed)


def default_consumer() -> str:
    """A consumer name stable for the life of this process: ``<host>-<pid>``."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class RunnerSettings:
    """How a participant reads, retries and gives up."""

    redis_url: str
    partitions: int = naming.DEFAULT_PARTITIONS
    consumer: str = field(default_factory=default_consumer)
    concurrency: int = 64
    """Handlers in flight at once."""
    batch: int = 200
    """Entries per XREADGROUP."""
    block_ms: int = DEFAULT_BLOCK_MS
    max_deliveries: int = 5
    retry_base_ms: int = 500
    """Backoff before the second try; it doubles with every further try."""
    retry_max_ms: int = 30_000
    claim_idle_ms: int = 5_000
    """A peer's entry idle this long is taken over (the peer is presumed dead)."""
    pending_interval_s: float = 0.5
    handler_timeout_s: float = 60.0
    heartbeat_interval_s: float = 5.0
    outcome_ttl_s: int = OUTCOME_TTL_S
    """How long an outcome record (the idempotency key of one handled message) is kept."""
    metrics_port: int = 0
    """Serve Prometheus metrics at ``GET /metrics`` on this port while running; 0: do not."""
    metrics_host: str = "127.0.0.1"
    """The address the metrics endpoint listens on."""

    def __post_init__(self) -> None:
        for name in ("partitions", "concurrency", "batch", "block_ms", "max_deliveries", "retry_base_ms"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value!r}")
        if self.block_ms > MAX_BLOCK_MS:
            raise ValueError(f"block_ms must be at most {MAX_BLOCK_MS}, got {self.block_ms!r}")
        for name in ("pending_interval_s", "handler_timeout_s", "heartbeat_interval_s", "outcome_ttl_s"):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        if self.claim_idle_ms < 2 * self.pending_interval_s * 1000:
            # in-flight entries are refreshed once per pending interval; a shorter
            # claim time would let peers take over entries that are being handled
            raise ValueError(
                f"claim_idle_ms ({self.claim_idle_ms}) must be at least twice pending_interval_s "
                f"({self.pending_interval_s}s)"
            )
        if not 0 <= self.metrics_port <= 65_535:
            raise ValueError(f"metrics_port must be within 0..65535, got {self.metrics_port!r}")

    def policy(self) -> RetryPolicy:
        return RetryPolicy(
            max_deliveries=self.max_deliveries,
            base_ms=self.retry_base_ms,
            max_ms=self.retry_max_ms,
            claim_idle_ms=self.claim_idle_ms,
        )


@dataclass
class RunnerStats:
    """Counters since the runner started (also published in its heartbeat)."""

    handled: int = 0
    emitted: int = 0
    duplicates: int = 0
    failed: int = 0
    dead_lettered: int = 0
    unavailable: int = 0
    """Tries (of a handler, a batch's commits) that found Redis unavailable and were made again in place."""


@dataclass(frozen=True)
class _Handled:
    outgoing: list[Envelope]


@dataclass(frozen=True)
class _Rejected:
    reason: str


@dataclass(frozen=True)
class _Failed:
    reason: str
    delay: float | None


@dataclass(frozen=True)
class _Unavailable:
    """The runner stopped while the handler could not use Redis (see :func:`unavailable`):
    the entry is left pending, the outage not counted against it."""

    error: Exception


_Result = _Handled | _Rejected | _Failed | _Unavailable


class _Kind(StrEnum):
    OUTCOME = "outcome"
    DUPLICATE = "duplicate"


# per commit of a batch: what it is (an outcome, a duplicate's ack, or a dead letter and
# why), how many messages it emits, the type of the message it settles
_Counted = tuple[_Kind | DeadLetterReason, int, str]


class Runner:
    """Runs one participant as one consumer.

    An async context manager: entering connects, creates the consumer groups and
    starts the heartbeat; leaving stops every background task and closes the
    client.  :meth:`run` reads until ``stop`` is set, then drains::

        async with Runner(participant, settings) as runner:
            await runner.run(stop)
    """

    def __init__(
        self,
        participant: Participant,
        settings: RunnerSettings,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        if not participant.types:
            raise ValueError(f"participant {participant.name!r} handles no message types")
        self.participant = participant
        self.settings = settings
        self.clock = clock
        self.group = naming.participant_group(participant.name)
        self.policy = settings.policy()
        self.stats = RunnerStats()
        self.metrics = RunnerMetrics(participant.name, self.group)
        self._metrics_server: MetricsServer | None = None
        self._script = CommitScript()
        self._redis: Redis | None = None
        self._handlers_redis: AutoPipelineRedis | None = None  # msg.redis: the handlers' calls share round trips
        self._reader: GroupReader | None = None
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._running = 0  # handlers submitted and not finished (bounds reading)
        self._capacity = asyncio.Event()
        self._capacity.set()
        self._in_flight: set[_Key] = set()
        self._not_before: dict[_Key, float] = {}  # Retry(delay): monotonic time of the next try
        self._last_error: dict[_Key, str] = {}
        self._settled_in_scan: set[_Key] | None = None  # entries batches settled while a pending scan ran
        self._batches: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()  # run()'s: ends the waits through an outage
        self._handling_outage = Outage(log, f"{participant.name} handling (Redis unavailable)")
        self._commit_outage = Outage(log, f"{participant.name} committing (Redis unavailable)")
        self._writable = asyncio.Event()  # cleared while commits find Redis refusing them: reading waits
        self._writable.set()
        self._refused_batches = 0  # batches whose commits Redis refuses now
        self._heartbeat: asyncio.Task[None] | None = None
        self._heartbeat_halt = asyncio.Event()
        self._started_ms = int(time.time() * 1000)

    @property
    def redis(self) -> Redis:
        if self._redis is None:
            raise RuntimeError("the runner is not started; use `async with Runner(...)`")
        return self._redis

    @property
    def handlers_redis(self) -> AutoPipelineRedis:
        """What handlers get as ``msg.redis``: on the same pool, but the commands
        of one event-loop tick (a batch's handlers) share one round trip."""
        if self._handlers_redis is None:
            raise RuntimeError("the runner is not started; use `async with Runner(...)`")
        return self._handlers_redis

    @property
    def reader(self) -> GroupReader:
        if self._reader is None:
            raise RuntimeError("the runner is not started; use `async with Runner(...)`")
        return self._reader

    @property
    def heartbeat_field(self) -> str:
        return f"{self.participant.name}/{self.settings.consumer}"

    # --- lifecycle ---------------------------------------------------------------

    async def __aenter__(self) -> Runner:
        settings = self.settings
        if settings.metrics_port:
            # first, so a port in use fails before anything else was started
            server = MetricsServer(self.metrics.registry, settings.metrics_host, settings.metrics_port)
            await server.start()
            self._metrics_server = server
        self._redis = connect(settings.redis_url, name=f"{self.participant.name}:{settings.consumer}")
        try:
            self._reader = GroupReader(
                self._redis,
                self.group,
                settings.consumer,
                self.participant.streams(settings.partitions),
                count=settings.batch,
                block_ms=settings.block_ms,
                policy=self.policy,
                script=self._script,
            )
            await self._reader.ensure_groups()
            await self._beat()
        except BaseException:
            await self._redis.aclose()
            self._redis = None
            await self._stop_metrics()
            raise
        self._handlers_redis = AutoPipelineRedis(self._redis.connection_pool)
        self._heartbeat_halt.clear()
        self._heartbeat = asyncio.create_task(
            self._heartbeat_loop(self._heartbeat_halt), name=f"{self.heartbeat_field} heartbeat"
        )
        log.info(
            "%s started as consumer %s on %d streams (%s)",
            self.participant.name,
            settings.consumer,
            len(self.reader.streams),
            ", ".join(self.participant.types),
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await _cancel(list(self._batches))  # only left when run() was cancelled: a hard stop
        if self._heartbeat is not None:
            await _finish(self._heartbeat, self._heartbeat_halt)
            self._heartbeat = None
        redis = self.redis
        try:
            await redis.hdel(naming.heartbeat_key(), self.heartbeat_field)
        except RedisError as error:
            log.warning("could not remove the heartbeat of %s: %s", self.heartbeat_field, error)
        finally:
            if self._handlers_redis is not None:
                await self._handlers_redis.aclose()  # the pool is the runner's client's, closed next
                self._handlers_redis = None
            await redis.aclose()
            self._redis = None
            self._reader = None
            await self._stop_metrics()
        log.info("%s stopped (%s)", self.heartbeat_field, self.stats)

    async def _stop_metrics(self) -> None:
        if self._metrics_server is not None:
            await self._metrics_server.stop()
            self._metrics_server = None

    async def run(self, stop: asyncio.Event) -> None:
        """Read and handle until ``stop`` is set; then finish the messages in
        flight and commit their outcomes before returning."""
        self._stop = stop
        halt = asyncio.Event()
        maintenance = asyncio.create_task(self._maintenance_loop(stop, halt), name=f"{self.heartbeat_field} pending")
        try:
            await self._read_loop(stop)
            if self._batches:
                log.info("%s draining %d messages in flight", self.heartbeat_field, len(self._in_flight))
            await self._drain()  # the maintenance loop keeps holding their entries meanwhile
        finally:
            await _finish(maintenance, halt)
        await self._drain()  # a retry the maintenance loop started as stop was set

    async def _drain(self) -> None:
        while self._batches:
            await asyncio.gather(*self._batches, return_exceptions=True)

    # --- reading ---------------------------------------------------------------

    async def _read_loop(self, stop: asyncio.Event) -> None:
        outage = Outage(log, f"{self.heartbeat_field} reading")
        while not stop.is_set():
            if not self._capacity.is_set():
                await wait_until(self._capacity, self.settings.block_ms / 1000)
                continue
            if not self._writable.is_set():
                # Redis still hands out entries while it refuses writes: read no more than the
                # batches waiting to commit, or they would pile up without bound
                await wait_until(self._writable, self.settings.block_ms / 1000)
                continue
            try:
                entries = await self.reader.read()
            except RedisError as error:
                outage.failed(error)
                await wait_until(stop, _PAUSE_AFTER_ERROR_S)
                continue
            outage.recovered()
            if entries:
                self._spawn(entries)

    def _spawn(self, entries: list[Entry]) -> None:
        self._in_flight.update((entry.stream, entry.id) for entry in entries)
        self._take(len(entries))
        task = asyncio.create_task(self._process_guarded(entries))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    def _take(self, slots: int) -> None:
        self._running += slots
        if self._running >= self.settings.concurrency:
            self._capacity.clear()

    def _give(self, slots: int) -> None:
        self._running -= slots
        if self._running < self.settings.concurrency:
            self._capacity.set()

    # --- one batch -----------------------------------------------------------------

    async def _process_guarded(self, entries: list[Entry]) -> None:
        try:
            await self._process(entries)
        except RedisError as error:
            log.warning("a batch of %d entries was not committed (%s); it will be retried", len(entries), error)
        except Exception:
            # a bug, not a message's fault: the entries stay pending and are retried
            log.exception("a batch of %d entries failed; it will be retried", len(entries))

    async def _process(self, entries: list[Entry]) -> None:
        held = len(entries)  # reading slots this batch holds until its handlers run
        try:
            commits: list[Commit] = []
            kinds: list[_Counted] = []
            letters: list[tuple[Entry, str]] = []  # dead letters among the commits, logged once they land
            settled: list[_Key] = []  # entries whose commit acks them
            valid: list[_Decoded] = []
            for entry in entries:
                try:
                    envelope, parsed = decode_entry_parsed(entry, self.settings.partitions)
                    valid.append((entry, envelope, parsed))
                except (DecodeError, PayloadError) as error:
                    commits.append(self._dead_letter_commit(entry, error.reason, letters))
                    kinds.append((dead_letter_reason(error), 0, _type_of(entry)))
                    settled.append((entry.stream, entry.id))
            fresh: list[_Decoded] = []
            handled = await through_outages(lambda: self._already_handled(valid), self._stop, self._handling_outage)
            for decoded, done in zip(valid, handled, strict=True):
                if done:
                    entry = decoded[0]
                    commits.append(Commit().ack(entry.stream, self.group, entry.id))
                    kinds.append((_Kind.DUPLICATE, 0, _type_of(entry)))
                    settled.append((entry.stream, entry.id))
                else:
                    fresh.append(decoded)
            # the same message twice in one batch (a producer's retried XADD) runs once;
            # the second entry's commit then finds the outcome record and only acks
            first: dict[str, _Decoded] = {}
            for decoded in fresh:
                first.setdefault(decoded[1].message_id, decoded)
            self._give(held - len(first))
            held = len(first)
            tasks: dict[str, asyncio.Task[_Result]] = {}
            async with asyncio.TaskGroup() as handlers:
                for message_id, (entry, envelope, parsed) in first.items():
                    task = handlers.create_task(self._handle_through_outages(entry, envelope, parsed))
                    task.add_done_callback(lambda _: self._give(1))
                    tasks[message_id] = task
                held = 0
            for entry, envelope, _ in fresh:
                result = tasks[envelope.message_id].result()
                if isinstance(result, _Unavailable):
                    continue  # stopped during an outage: left pending, no delivery spent on it
                if not isinstance(result, _Failed) or entry.deliveries >= self.policy.max_deliveries:
                    settled.append((entry.stream, entry.id))
                if isinstance(result, _Handled):
                    commits.append(self._outcome_commit(entry, envelope, result.outgoing))
                    kinds.append((_Kind.OUTCOME, len(result.outgoing), _type_of(entry)))
                elif isinstance(result, _Rejected):
                    commits.append(self._dead_letter_commit(entry, result.reason, letters))
                    kinds.append((DeadLetterReason.REJECTED, 0, _type_of(entry)))
                elif entry.deliveries >= self.policy.max_deliveries:
                    reason = f"gave up after {entry.deliveries} deliveries: {result.reason}"
                    commits.append(self._dead_letter_commit(entry, reason, letters))
                    kinds.append((DeadLetterReason.EXHAUSTED, 0, _type_of(entry)))
                else:
                    self._remember_failure(entry, result)
            self._count(kinds, await self._commit(commits))
            self._log_dead_letters(letters)
            for stream, entry_id in settled:
                self._last_error.pop((stream, entry_id), None)
                self._not_before.pop((stream, entry_id), None)
            if self._settled_in_scan is not None:
                self._settled_in_scan.update(settled)
        finally:
            self._give(held)
            self._in_flight.difference_update((entry.stream, entry.id) for entry in entries)

    async def _already_handled(self, valid: list[_Decoded]) -> list[bool]:
        """Whether each message's outcome is recorded already; not looked up for the
        first delivery of a message whose handler is idempotent (it may run again)."""
        subscriptions = self.participant.subscriptions
        look_up = [
            not (entry.deliveries == 1 and subscriptions[envelope.type].idempotent) for entry, envelope, _ in valid
        ]
        if not any(look_up):
            return [False] * len(valid)
        name = self.participant.name
        async with self.redis.pipeline(transaction=False) as pipe:
            for (entry, envelope, _), needed in zip(valid, look_up, strict=True):
                if needed:
                    pipe.exists(naming.outcome_key(entry.partition, name, envelope.message_id))
            found = iter(await pipe.execute())
        return [bool(next(found)) if needed else False for needed in look_up]

    async def _handle_through_outages(self, entry: Entry, envelope: Envelope, parsed: Wire | None) -> _Result:
        """:meth:`_handle`, tried again after a pause (growing to a few seconds) for as long as
        it finds Redis unavailable, until it gets through or the runner stops.  Its entry stays
        this consumer's and held meanwhile, so the outage spends none of its deliveries (a
        retry through a pending scan would: ``XCLAIM`` counts one)."""
        try:
            return await through_outages(
                lambda: self._handle(entry, envelope, parsed), self._stop, self._handling_outage
            )
        except RedisError as error:  # stopped meanwhile (see _call_handler: only an outage gets here)
            return _Unavailable(error)

    async def _commit(self, commits: list[Commit]) -> list[CommitResult]:
        """Run a batch's commits; those Redis refused or could not take are run again after a
        pause (as :meth:`_handle_through_outages`) until they land, the others not again (a
        dead letter must not be written twice).  Reading waits meanwhile.  Raises what stopped
        it when the runner stops, or a commit the script refused for another reason."""
        if not commits:
            return []
        results: dict[int, CommitResult] = {}
        todo = list(range(len(commits)))
        refused_here = False

        def refused(error: Exception) -> Exception:
            nonlocal refused_here
            self.stats.unavailable += 1
            if not refused_here:  # reading waits while any batch's commits are refused
                refused_here = True
                self._refused_batches += 1
                self._writable.clear()
            return error

        async def attempt() -> None:
            nonlocal todo
            try:
                answers = await self._script.run_each(self.redis, [commits[i] for i in todo])
            except RedisError as error:
                raise refused(error) if unavailable(error) else error from None
            waiting: list[tuple[int, Exception]] = []
            for i, answer in zip(todo, answers, strict=True):
                if isinstance(answer, ResponseError):
                    if not refusing_writes(answer):
                        raise answer
                    waiting.append((i, answer))
                else:
                    results[i] = answer
            todo = [i for i, _ in waiting]
            if waiting:
                raise refused(waiting[0][1])

        try:
            await through_outages(attempt, self._stop, self._commit_outage)
        finally:
            if refused_here:  # landed, or given up on (stopping, another error)
                self._refused_batches -= 1
                if not self._refused_batches:
                    self._writable.set()
        return [results[i] for i in range(len(commits))]

    async def _handle(self, entry: Entry, envelope: Envelope, parsed: Wire | None = None) -> _Result:
        extra: dict[str, object] = {
            "correlation_id": envelope.correlation_id,
            "step": _step_of(envelope),
            "message_type": envelope.type,
            "attempt": entry.deliveries,
        }
        attributes = {"streamsaga.correlation_id": envelope.correlation_id, "messaging.message.id": envelope.message_id}
        async with self._slots:
            # around the handler: every log line carries `extra`, a span (with OpenTelemetry), its metrics
            with (
                log_context(**extra, traceparent=envelope.traceparent),
                tracing.span(f"{self.participant.name} {envelope.type}", envelope.traceparent, attributes),
                self.metrics.handling(envelope.type),
            ):
                return await self._call_handler(entry, envelope, parsed, extra)

    async def _call_handler(
        self, entry: Entry, envelope: Envelope, parsed: Wire | None, extra: dict[str, object]
    ) -> _Result:
        name = self.participant.name
        msg = Message(envelope, self.handlers_redis, name, entry.stream, entry.id, entry.deliveries, parsed)
        deadline = asyncio.timeout(self.settings.handler_timeout_s)
        try:
            async with deadline:
                replies = await self.participant.dispatch(msg)
            return _Handled(self._outgoing(entry, envelope, replies))
        except Reject as error:
            return _Rejected(f"rejected by {name}: {error.reason}")
        except Retry as error:
            log.info(
                "%s will retry %s %s in %.3gs: %s",
                name,
                envelope.type,
                envelope.message_id,
                error.delay,
                error.reason,
                extra=extra,
            )
            return _Failed(f"retry requested: {error.reason}", error.delay)
        except TimeoutError as error:
            if not deadline.expired():
                return self._failed(entry, envelope, error, extra)
            log.warning(
                "%s: handler of %s %s did not finish within %ss",
                name,
                envelope.type,
                envelope.message_id,
                self.settings.handler_timeout_s,
                extra=extra,
            )
            return _Failed(f"handler did not finish within {self.settings.handler_timeout_s}s", None)
        except Exception as error:
            if unavailable(error) and own(error):  # an outage of msg.redis (its errors are marked)
                self.stats.unavailable += 1
                raise  # not the handler's failure: see _handle_through_outages
            return self._failed(entry, envelope, error, extra)

    def _failed(self, entry: Entry, envelope: Envelope, error: Exception, extra: dict[str, object]) -> _Failed:
        log.warning(
            "%s: handler of %s %s failed on delivery %d: %s",
            self.participant.name,
            envelope.type,
            envelope.message_id,
            entry.deliveries,
            error,
            exc_info=True,
            extra=extra,
        )
        return _Failed(f"{type(error).__name__}: {error}", None)

    def _outgoing(self, entry: Entry, incoming: Envelope, replies: list[Reply]) -> list[Envelope]:
        name = self.participant.name
        now = self.clock()
        outgoing: list[Envelope] = []
        seen: dict[str, int] = {}
        for reply in replies:
            nth = seen.get(reply.type, 0)
            seen[reply.type] = nth + 1
            parts = (name, reply.type) if nth == 0 else (name, reply.type, str(nth))
            payload = reply.checked_payload()
            outgoing.append(
                Envelope(
                    message_id=derived_message_id(incoming.message_id, *parts),
                    type=reply.type,
                    correlation_id=incoming.correlation_id,
                    causation_id=incoming.message_id,
                    workflow=incoming.workflow,
                    producer=name,
                    occurred_at=now,
                    attempt=entry.deliveries,
                    traceparent=incoming.traceparent,
                    payload=payload,
                )
            )
        return outgoing

    def _outcome_commit(self, entry: Entry, incoming: Envelope, outgoing: list[Envelope]) -> Commit:
        p = entry.partition
        record = orjson.dumps([message.message_id for message in outgoing]).decode()
        commit = Commit().once(
            naming.outcome_key(p, self.participant.name, incoming.message_id), record, ttl=self.settings.outcome_ttl_s
        )
        for message in outgoing:
            commit.xadd(naming.message_stream(p, message.type), encode(message))
        return commit.ack(entry.stream, self.group, entry.id)

    def _dead_letter_commit(self, entry: Entry, reason: str, letters: list[tuple[Entry, str]]) -> Commit:
        """The commit that dead-letters ``entry``; noted in ``letters`` to log once it has landed."""
        letters.append((entry, reason))
        return dead_letter_commit(entry, self.group, self.settings.consumer, reason)

    def _log_dead_letters(self, letters: list[tuple[Entry, str]]) -> None:
        for entry, reason in letters:
            log.warning(
                "%s dead-lettered %s %s from %s (delivery %d): %s",
                self.participant.name,
                entry.field(naming.FIELD_TYPE),
                entry.id,
                entry.stream,
                entry.deliveries,
                reason,
                extra={"correlation_id": entry.field(naming.FIELD_CORRELATION_ID), "attempt": entry.deliveries},
            )

    def _remember_failure(self, entry: Entry, failure: _Failed) -> None:
        key = (entry.stream, entry.id)
        self._last_error[key] = failure.reason
        if failure.delay is None:
            self._not_before.pop(key, None)
        else:
            self._not_before[key] = time.monotonic() + failure.delay
        self.stats.failed += 1
        self.metrics.message(_type_of(entry), HandlerOutcome.FAILED if failure.delay is None else HandlerOutcome.RETRY)

    def _count(self, kinds: list[_Counted], results: list[CommitResult]) -> None:
        """Count the commits that took effect (a batch whose commits failed is counted
        when it is retried and they land)."""
        stats = self.stats
        for (kind, emitted, message_type), result in zip(kinds, results, strict=True):
            if isinstance(kind, DeadLetterReason):
                if result.outcome is Outcome.OK:  # (a duplicate: written by an earlier run of the commit)
                    stats.dead_lettered += 1
                    self.metrics.dead_lettered(message_type, kind)
            elif kind is _Kind.DUPLICATE or result.outcome is Outcome.DUPLICATE:
                stats.duplicates += 1
                self.metrics.message(message_type, HandlerOutcome.DUPLICATE)
            else:
                stats.handled += 1
                stats.emitted += emitted
                self.metrics.message(message_type, HandlerOutcome.OK)

    # --- retries, takeover, dead letters --------------------------------------------

    async def _maintenance_loop(self, stop: asyncio.Event, halt: asyncio.Event) -> None:
        outage = Outage(log, f"{self.heartbeat_field} pending scan")
        while not halt.is_set():
            try:
                if await self._maintain(stop):
                    outage.recovered()
            except RedisError as error:
                outage.failed(error)
            await wait_until(halt, self.settings.pending_interval_s)

    async def _maintain(self, stop: asyncio.Event) -> bool:
        """Hold, release, scan; whether the scan ran (when stopping, only the first two do)."""
        await self._hold_and_release()
        if stop.is_set():
            return False
        self._settled_in_scan = set()
        try:
            room = max(0, self.settings.concurrency - self._running)  # retries wait for handler slots, as reads do
            retry, exhausted = await self.reader.pending(exclude=self._in_flight.union(self._not_before), limit=room)
            # The exclusions are a snapshot: while the scan ran, a batch may have read one of
            # these entries and still hold it, or even have settled it.  It is that batch's.
            taken = self._in_flight.union(self._not_before, self._settled_in_scan)
        finally:
            self._settled_in_scan = None
        retry = [entry for entry in retry if (entry.stream, entry.id) not in taken]
        exhausted = [entry for entry in exhausted if (entry.stream, entry.id) not in taken]
        if exhausted:
            commits = []
            letters: list[tuple[Entry, str]] = []
            for entry in exhausted:
                last = self._last_error.get((entry.stream, entry.id))
                reason = f"gave up after {entry.deliveries} deliveries: " + (
                    last or "no error recorded (a consumer died or stalled while handling it)"
                )
                commits.append(self._dead_letter_commit(entry, reason, letters))
            results = await self._script.run(self.redis, commits)
            kinds: list[_Counted] = [(DeadLetterReason.EXHAUSTED, 0, _type_of(e)) for e in exhausted]
            self._count(kinds, results)
            self._log_dead_letters(letters)
            for entry in exhausted:
                self._last_error.pop((entry.stream, entry.id), None)
        if retry and not stop.is_set() and self._writable.is_set():
            self._spawn(retry)  # when stopping, or while commits are refused, they stay pending
        return True

    async def _hold_and_release(self) -> None:
        """Refresh the idle time of the entries this consumer still holds, and
        make deferred entries whose delay is over due for :meth:`GroupReader.pending`."""
        now = time.monotonic()
        hold: dict[str, list[str]] = {}
        release: dict[str, list[str]] = {}
        for stream, entry_id in self._in_flight:
            hold.setdefault(stream, []).append(entry_id)
        for (stream, entry_id), at in list(self._not_before.items()):
            if (stream, entry_id) in self._in_flight:
                continue
            if at > now:
                hold.setdefault(stream, []).append(entry_id)
            else:
                release.setdefault(stream, []).append(entry_id)
                del self._not_before[(stream, entry_id)]
        if not hold and not release:
            return
        # every refresh resets the idle time, so only a stall of nearly the whole claim
        # time lets a peer take an entry over; one a peer did take over stays the peer's
        touched = [(stream, ids, 0) for stream, ids in hold.items()]
        touched += [(stream, ids, self.policy.max_ms) for stream, ids in release.items()]
        for result in await self.reader.hold(touched):
            if isinstance(result, Exception):
                log.warning("%s: cannot refresh pending entries: %s", self.heartbeat_field, result)

    # --- heartbeat -------------------------------------------------------------------

    async def _heartbeat_loop(self, halt: asyncio.Event) -> None:
        outage = Outage(log, f"{self.heartbeat_field} heartbeat")
        while not await wait_until(halt, self.settings.heartbeat_interval_s):
            try:
                await self._beat()
                outage.recovered()
            except RedisError as error:
                outage.failed(error)

    async def _beat(self) -> None:
        beat = {
            "participant": self.participant.name,
            "consumer": self.settings.consumer,
            "group": self.group,
            "subscriptions": [
                {"type": sub.type, "compensation": sub.compensation}
                for sub in sorted(self.participant.subscriptions.values(), key=lambda sub: sub.type)
            ],
            "partitions": self.settings.partitions,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at_ms": self._started_ms,
            "at_ms": int(time.time() * 1000),
            "interval_ms": int(self.settings.heartbeat_interval_s * 1000),
            "in_flight": len(self._in_flight),
            **dataclasses.asdict(self.stats),
        }
        await self.redis.hset(naming.heartbeat_key(), self.heartbeat_field, orjson.dumps(beat))


def _type_of(entry: Entry) -> str:
    """The message type of an entry, from its stream: a bounded metrics label even for garbage."""
    return naming.type_of_stream(entry.stream)


def _step_of(envelope: Envelope) -> str | None:
    """The step a message names: commands (and compensation replies) carry it in their payload."""
    step = envelope.payload.get("step")
    return step if isinstance(step, str) else None


async def run_participant(participant: Participant, settings: RunnerSettings, stop: asyncio.Event) -> None:
    """Run ``participant`` until ``stop`` is set, then drain and return.  While Redis cannot be
    used at start (unreachable, loading, refusing writes) it waits for it, trying again every
    few seconds, rather than exit: a supervisor would only restart it into the same outage."""
    outage = Outage(log, f"{participant.name}/{settings.consumer} starting")
    async with contextlib.AsyncExitStack() as started:
        try:
            runner = await through_outages(
                lambda: started.enter_async_context(Runner(participant, settings)), stop, outage
            )
        except RedisError as error:
            if unavailable(error):
                return  # stopped before Redis could be used
            raise  # a refused password, say: no waiting mends it
        outage.recovered(for_good=True)  # started: told at once, not once it has held a while
        await runner.run(stop)


async def _finish(task: asyncio.Task[None], halt: asyncio.Event) -> None:
    """Ask a loop to stop, wait for it, and cancel it only if it does not stop in time.

    Loops that talk to Redis stop on ``halt`` rather than by cancellation alone: on
    Python 3.11 a cancellation that races with a timeout-guarded read in the client
    can be lost, and the loop would go on.
    """
    halt.set()
    await asyncio.wait({task}, timeout=_STOP_GRACE_S)
    await _cancel([task])


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until they have finished."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
