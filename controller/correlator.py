"""The correlator: reads every event the definitions name, applies it to its
workflow through the pure state machine and commits the result atomically.

One batch costs at most three round trips whatever its size: XREADGROUP, a
pipelined load of the instances the store's cache does not hold (none when every
workflow of the batch runs here: see :meth:`WorkflowStore.committed`), and a
pipeline of commit-script calls.  A cached instance that turns out stale (another
controller moved the workflow on) fails its commit's version check; it is then
forgotten, read again and decided again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from contracts import naming
from contracts.envelope import DecodeError, Envelope, utcnow
from contracts.messages import PayloadError
from controller import state_machine
from controller.definitions import Definitions, UnknownWorkflow
from controller.instance import Instance, WorkflowStatus
from controller.store import WorkflowStore
from participants.sdk import tracing
from participants.sdk.commit import Commit, Outcome
from participants.sdk.connection import refusing_writes, unavailable
from participants.sdk.consumer import Entry, GroupReader, RetryPolicy, decode_entry, entry_order
from participants.sdk.logs import Outage
from participants.sdk.metrics import DeadLetterReason, dead_letter_reason
from participants.sdk.waiting import wait_until

if TYPE_CHECKING:
    from controller.metrics import ControllerMetrics

log = logging.getLogger(__name__)

MAX_CONFLICT_ROUNDS = 5
HOLD_LIMIT = 4
"""Entries held back for time order: at most this many batches, then they are applied anyway."""
_PAUSE_AFTER_ERROR_S = 0.5

_Rejected = tuple[Entry, str, DeadLetterReason]  # an entry to dead-letter, why, and the kind of why
# a decided transition: the workflow, the index of its message in the workflow's work,
# the instance it was decided on, the transition, and the message
_Decided = tuple[str, int, Instance, state_machine.Transition, Envelope]


class Correlator:
    def __init__(
        self,
        redis: Redis,
        store: WorkflowStore,
        definitions: Definitions,
        consumer: str,
        *,
        batch: int = 200,
        block_ms: int = 1_000,
        pending_interval_s: float = 1.0,
        policy: RetryPolicy | None = None,
        clock: Callable[[], datetime] = utcnow,
        metrics: ControllerMetrics | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.definitions = definitions
        self.clock = clock
        self.pending_interval_s = pending_interval_s
        self.event_types = definitions.event_types()
        streams = [
            naming.message_stream(p, message_type)
            for p in range(store.partitions)
            for message_type in sorted(self.event_types)
        ]
        self.reader = GroupReader(
            redis,
            naming.CONTROLLER_GROUP,
            consumer,
            streams,
            count=batch,
            block_ms=block_ms,
            policy=policy,
            script=store.script,
        )
        self._held: list[Entry] = []  # read, and waiting for older entries of other streams (see _in_time)
        self._stalled: list[Entry] = []  # a batch Redis could not take: tried again before anything else
        self._prepared = False
        self.applied = 0
        self.duplicates = 0
        self.conflicts = 0  # commits refused by the version guard, then decided again
        self.dead_lettered = 0
        self.unavailable = 0  # rounds that found Redis unreachable or refusing writes, and were tried again

    async def prepare(self) -> None:
        """Create the consumer groups (once: a read that finds its group gone makes it again)."""
        await self.reader.ensure_groups()
        self._prepared = True

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        """Create the consumer groups, set ``ready``, then read and apply until ``stop``
        is set; a failing batch is retried later, never lost."""
        if not self._prepared:
            await self.prepare()
        if ready is None:
            ready = asyncio.Event()  # nobody asks: set and cleared all the same
        ready.set()
        outage = Outage(log, "correlator (reading and committing events)")
        refused = Outage(log, "correlator (Redis refusing its commands)")
        next_pending = 0.0
        while not stop.is_set():
            try:
                if self._stalled:
                    # what an outage interrupted, before anything new: still this consumer's,
                    # so no delivery is spent on it (a pending scan's XCLAIM would count one),
                    # and kept from looking abandoned to another controller's scan meanwhile
                    await self.reader.hold(_by_stream(self._stalled))
                    stalled, self._stalled = self._stalled, []
                    await self._handle_or_stall(stalled)
                if time.monotonic() >= next_pending:
                    next_pending = time.monotonic() + self.pending_interval_s
                    retry, exhausted = await self.reader.pending(exclude={(e.stream, e.id) for e in self._held})
                    if exhausted:
                        await self._dead_letter(
                            [
                                (e, f"not applied after {e.deliveries} deliveries", DeadLetterReason.EXHAUSTED)
                                for e in exhausted
                            ]
                        )
                    if retry:
                        await self._handle_or_stall(retry)
                # with entries held back, the next read must not wait for news to release them
                entries = self._in_time(await self.reader.read(block_ms=0 if self._held else None))
                if entries:
                    await self._handle_or_stall(entries)
                outage.recovered()  # a round went through
                refused.recovered()
                ready.set()  # /readyz follows
            except asyncio.CancelledError:
                raise
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                # Redis cannot be reached: not ready; the batch is tried again (_stalled)
                ready.clear()
                self.unavailable += 1
                outage.failed(exc)
                await wait_until(stop, _PAUSE_AFTER_ERROR_S)
            except ResponseError as exc:
                if not refusing_writes(exc):
                    log.exception("correlator batch failed; its entries will be retried")
                    await wait_until(stop, _PAUSE_AFTER_ERROR_S)
                    continue
                # Redis answers but refuses writes (out of memory under noeviction, a replica):
                # reachable, so ready; the batch is tried again (_stalled)
                self.unavailable += 1
                outage.recovered()
                refused.failed(exc)
                ready.set()
                await wait_until(stop, _PAUSE_AFTER_ERROR_S)
            except Exception:
                # a bug: the entries stay pending and are retried by `pending()`; back off briefly
                log.exception("correlator batch failed; its entries will be retried")
                await wait_until(stop, _PAUSE_AFTER_ERROR_S)
        if self._held:  # stopping: apply them now rather than leave them to a takeover
            held, self._held = self._held, []
            try:
                await self.handle(held)
            except Exception as exc:  # they stay pending; a peer or the next run takes them over
                log.warning("could not apply %d events before stopping: %s", len(held), exc)

    async def _handle_or_stall(self, entries: list[Entry]) -> None:
        """:meth:`handle`; if Redis is unavailable, keep the entries for the next round."""
        try:
            await self.handle(entries)
        except RedisError as error:
            if unavailable(error):
                self._stalled = entries
            raise

    def _in_time(self, read: list[Entry]) -> list[Entry]:
        """What to apply now of a read and of the entries held back from earlier ones.

        Each message type has its own stream, and a backlog drains each at its own pace:
        a read may bring a workflow's ShipmentFailed while its PaymentCaptured still waits
        deep in another stream.  The state machine copes with that (the failure implies the
        completions before it, and the compensation waits for them), but the history
        would list the events out of order.  So entries past the reader's horizon
        (older entries may still be unread) wait for a later read: a merge of the streams
        by time.  Not more than a few batches wait, however far one stream lags.  Ids order
        entries of different streams only to the millisecond: within the horizon's
        millisecond, events may still be applied out of order.
        """
        horizon = self.reader.horizon
        if not self._held and horizon is None:
            return read
        held = self._held + read
        self._held = []
        if horizon is None or len(held) > HOLD_LIMIT * self.reader.count:
            return held
        due: list[Entry] = []
        for entry in held:
            (self._held if entry_order(entry.id) > horizon else due).append(entry)
        return due

    async def handle(self, entries: list[Entry]) -> None:
        """Apply a batch of entries (in stream order per workflow)."""
        rejected: list[_Rejected] = []
        decoded: list[tuple[Entry, Envelope]] = []
        for entry in entries:
            try:
                decoded.append((entry, decode_entry(entry, self.store.partitions)))
            except (DecodeError, PayloadError) as exc:
                rejected.append((entry, exc.reason, dead_letter_reason(exc)))
        # Apply in time order across streams: entry ids give the server's millisecond,
        # the producer's clock breaks ties within it.  (The state machine does not
        # depend on this order; the history reads better for it.)
        decoded.sort(key=_time_order)
        work: dict[str, list[tuple[Entry, Envelope]]] = {}
        for entry, envelope in decoded:
            work.setdefault(envelope.correlation_id, []).append((entry, envelope))
        for _ in range(MAX_CONFLICT_ROUNDS):
            if not work:
                break
            work = await self._apply(work, rejected)
        if work:
            log.warning("version conflicts persisted for %d workflows; their events will be retried", len(work))
        if rejected:
            await self._dead_letter(rejected)

    async def _apply(
        self, work: dict[str, list[tuple[Entry, Envelope]]], rejected: list[_Rejected]
    ) -> dict[str, list[tuple[Entry, Envelope]]]:
        """One round: load, decide, commit.  Returns the work that hit a version conflict."""
        instances = await self.store.load_for_update(work)
        now = self.clock()
        commits: list[Commit] = []
        decided: list[_Decided] = []  # per commit: what it commits, for whom
        # messages no transition could be decided for, by workflow: dead-lettered unless
        # the workflow is decided again (then its next round finds them again)
        failed: dict[str, list[_Rejected]] = {}
        for workflow_id, messages in work.items():
            instance = instances[workflow_id]
            if instance is None:
                reason = f"no such workflow {workflow_id!r}"
                rejected += [(entry, reason, DeadLetterReason.NO_SUCH_WORKFLOW) for entry, _ in messages]
                continue
            try:
                definition = self.definitions.get(instance.workflow.name, instance.workflow.version)
            except UnknownWorkflow as exc:
                rejected += [(entry, str(exc), DeadLetterReason.UNKNOWN_DEFINITION) for entry, _ in messages]
                continue
            current: Instance = instance
            previous: str | None = None
            for index, (entry, envelope) in enumerate(messages):
                try:
                    with tracing.span(
                        f"controller {envelope.type}", envelope.traceparent, {"correlation_id": workflow_id}
                    ):
                        result = state_machine.transition(definition, current, envelope, now)
                except Exception as exc:
                    # a bug or a definition changed under running workflows: this workflow's
                    # messages go to the dead letters with the error; the rest of the batch lands
                    log.exception("cannot apply %s", envelope.type, extra={"correlation_id": workflow_id})
                    reason = f"the controller failed to apply it: {type(exc).__name__}: {exc}"
                    failed[workflow_id] = [(e, reason, DeadLetterReason.REJECTED) for e, _ in messages[index:]]
                    break
                # a commit chained on the one before lands only if that one did
                commits.append(self.store.commit(current, result, cause=entry, after=previous))
                decided.append((workflow_id, index, current, result, envelope))
                current = result.instance
                previous = envelope.message_id
        try:
            results = await self.store.script.run(self.store.redis, commits)
        except BaseException:
            for workflow_id in work:  # some commits may have landed: trust no cached instance
                self.store.forget(workflow_id)
            raise
        # A commit landed if it says so, if it is a duplicate of itself (its pipeline ran again
        # after the reply was lost), or if a later commit of its workflow's chain landed: that
        # one's guard held on exactly the state this one wrote
        landed: dict[str, int] = {}  # workflow -> the index of its last commit that landed
        for (workflow_id, index, *_), commit, outcome in zip(decided, commits, results, strict=True):
            if commit.landed(outcome):
                landed[workflow_id] = index
        retry: dict[str, list[tuple[Entry, Envelope]]] = {}
        for (workflow_id, index, before, result, envelope), outcome in zip(decided, results, strict=True):
            if index <= landed.get(workflow_id, -1):
                self.applied += 1
                self.store.committed(before, result)
                if self.metrics is not None:
                    self.metrics.applied()
                _log_commit(before, result, envelope)
                continue
            # applied before (by whom?) or decided on a stale instance: read it again next time
            self.store.forget(workflow_id)
            if outcome.outcome is Outcome.DUPLICATE:
                self.duplicates += 1
                if self.metrics is not None and not self._read_back(before, envelope):
                    self.metrics.duplicate()
            elif workflow_id not in retry:
                # this and every later message of the workflow must be decided again
                self.conflicts += 1
                retry[workflow_id] = work[workflow_id][index:]
        for workflow_id, letters in failed.items():
            if workflow_id not in retry:
                rejected += letters
        return retry

    def _read_back(self, instance: Instance, envelope: Envelope) -> bool:
        """Whether ``envelope`` is its workflow's start event: the controller applied it as it
        published it, so reading it back is expected, not a redelivery."""
        definition = self.definitions.get(instance.workflow.name, instance.workflow.version)
        return envelope.producer == state_machine.PRODUCER and envelope.type == definition.start

    async def _dead_letter(self, rejected: list[_Rejected]) -> None:
        await self.reader.dead_letter([(entry, reason) for entry, reason, _ in rejected])
        self.dead_lettered += len(rejected)
        if self.metrics is not None:
            for _, _, kind in rejected:
                self.metrics.dead_lettered(kind)


def _log_commit(before: Instance, result: state_machine.Transition, envelope: Envelope) -> None:
    """A line per applied message (debug), and one per change of the workflow's status (info;
    warning when it needs attention)."""
    after = result.instance
    if after.status is before.status and not log.isEnabledFor(logging.DEBUG):
        return
    cause = result.history[0]
    extra = {
        "correlation_id": after.id,
        "step": cause.step,  # for a fired timer, the step it names
        "attempt": envelope.attempt,
        "message_type": envelope.type,
        "traceparent": envelope.traceparent,
    }
    if after.status is before.status:
        log.debug("%s %s: applied %s%s", after.workflow.name, after.id, envelope.type, _note(cause.detail), extra=extra)
        return
    log.log(
        logging.WARNING if after.status is WorkflowStatus.NEEDS_ATTENTION else logging.INFO,
        "%s %s: %s -> %s on %s%s",
        after.workflow.name,
        after.id,
        before.status,
        after.status,
        envelope.type,
        _note(cause.detail or after.error),
        extra=extra,
    )


def _by_stream(entries: list[Entry]) -> list[tuple[str, list[str], int]]:
    """``entries`` as :meth:`GroupReader.hold` takes them: per stream, their ids, idle time 0."""
    ids: dict[str, list[str]] = {}
    for entry in entries:
        ids.setdefault(entry.stream, []).append(entry.id)
    return [(stream, found, 0) for stream, found in ids.items()]


def _note(detail: str | None) -> str:
    return f": {detail}" if detail else ""


def _time_order(item: tuple[Entry, Envelope]) -> tuple[int, datetime]:
    return entry_order(item[0].id)[0], item[1].occurred_at
