"""Workflow instances in Redis: load them, and commit transitions atomically."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import orjson
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from contracts import naming
from contracts.definitions import WorkflowDefinition
from contracts.envelope import Envelope, encode
from controller import state_machine
from controller.definitions import Definitions
from controller.instance import TERMINAL, HistoryEntry, Instance, WorkflowStatus
from controller.instance_cache import InstanceCache
from controller.timers import timer_member
from participants.sdk.commit import Commit, CommitResult, CommitScript, Outcome
from participants.sdk.consumer import Entry

log = logging.getLogger(__name__)

PROGRESS_MAXLEN = 100_000
_IDEMPOTENCY_NAMESPACE = uuid.UUID("6f1c9a56-2a7e-4f0c-9d55-3c1f3b8e2a10")


class CommitObserver(Protocol):
    """Told about every transition that was committed (``before`` is None for a start);
    :meth:`controller.metrics.ControllerMetrics.observe` is one."""

    def __call__(self, before: Instance | None, result: state_machine.Transition) -> None: ...


class StartUncertain(Exception):
    """Committing a start failed in a way that leaves unknown whether it landed (Redis
    went away mid-call); ``workflow_id`` is the id it would have, ``cause`` the error."""

    def __init__(self, workflow_id: str, cause: RedisError) -> None:
        super().__init__(f"the start of workflow {workflow_id} may or may not have landed: {cause}")
        self.workflow_id = workflow_id
        self.cause = cause


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with another request body."""

    def __init__(self, key: str, workflow_id: str) -> None:
        super().__init__(f"Idempotency-Key {key!r} was used for another request (workflow {workflow_id})")
        self.key = key
        self.workflow_id = workflow_id


def request_hash(definition: str, payload: dict[str, Any], sla_s: float | None = None) -> str:
    return hashlib.sha256(orjson.dumps([definition, payload, sla_s], option=orjson.OPT_SORT_KEYS)).hexdigest()


def workflow_id_for(definition: str, idempotency_key: str | None) -> str:
    """A fresh id, or the id an Idempotency-Key always maps to (so a repeated
    request finds the same instance in the same partition, with no extra lookup)."""
    if idempotency_key is None:
        return uuid.uuid4().hex
    return uuid.uuid5(_IDEMPOTENCY_NAMESPACE, f"{definition}\x00{idempotency_key}").hex


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def mark(instance: Instance) -> str:
    """When the state was decided, in µs: what controllers before the commit token
    compared (hash field ``m``), still written so that they keep working beside this
    one during a rolling upgrade or after a rollback."""
    return str((instance.updated_at - _EPOCH) // _MICROSECOND)


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


class WorkflowStore:
    """Workflow instances in Redis.

    ``cache`` keeps the instances of the workflows this process runs, as it committed
    them last (see :meth:`committed`), for :meth:`load_for_update`; the API's reads
    (:meth:`load`, :meth:`load_many`, :meth:`list`) always read Redis.
    """

    def __init__(
        self,
        redis: Redis,
        partitions: int,
        *,
        retention_s: int = 7 * 86_400,
        progress_maxlen: int = PROGRESS_MAXLEN,
        script: CommitScript | None = None,
        observer: CommitObserver | None = None,
        cache: InstanceCache | None = None,
    ) -> None:
        self.redis = redis
        self.partitions = partitions
        self.retention_s = retention_s
        self.progress_maxlen = progress_maxlen
        self.script = script or CommitScript()
        self.observer = observer
        self.cache = InstanceCache() if cache is None else cache
        self._starting: list[tuple[Commit, asyncio.Future[CommitResult]]] | None = None
        self._start_runs: set[asyncio.Task[None]] = set()

    def partition(self, workflow_id: str) -> int:
        return naming.partition_of(workflow_id, self.partitions)

    async def load(self, workflow_id: str) -> Instance | None:
        return (await self.load_many([workflow_id]))[workflow_id]

    async def load_many(self, workflow_ids: Iterable[str]) -> dict[str, Instance | None]:
        ids = list(dict.fromkeys(workflow_ids))
        async with self.redis.pipeline(transaction=False) as pipe:
            for workflow_id in ids:
                pipe.hget(naming.instance_key(self.partition(workflow_id), workflow_id), "s")
            raw = await pipe.execute()
        return {wid: Instance.model_validate_json(r) if r else None for wid, r in zip(ids, raw, strict=True)}

    async def statuses(self, workflow_ids: Iterable[str]) -> dict[str, WorkflowStatus | None]:
        """Each workflow's status (None: no such workflow, or it expired)."""
        found = await self.load_many(workflow_ids)
        return {workflow_id: instance.status if instance else None for workflow_id, instance in found.items()}

    async def load_for_update(self, workflow_ids: Iterable[str]) -> dict[str, Instance | None]:
        """Each workflow's instance to decide its next message on: the one this process
        committed last if it is cached, else read from Redis.

        A cached instance may be stale (another controller moved the workflow on, or it
        expired): a commit decided on it then gets ``conflict`` from the version guard,
        and the caller must :meth:`forget` it and decide again on a fresh load.
        """
        found: dict[str, Instance | None] = {}
        missing: list[str] = []
        for workflow_id in workflow_ids:
            instance = self.cache.get(workflow_id)
            if instance is None:
                missing.append(workflow_id)
            else:
                found[workflow_id] = instance
        if missing:
            found.update(await self.load_many(missing))
        return found

    def forget(self, workflow_id: str) -> None:
        """Drop the cached instance of a workflow (its commit conflicted, or its outcome is unknown)."""
        self.cache.forget(workflow_id)

    async def history(self, workflow_id: str, start: int = 0) -> list[HistoryEntry]:
        key = naming.history_key(self.partition(workflow_id), workflow_id)
        return [HistoryEntry.model_validate_json(raw) for raw in await self.redis.lrange(key, start, -1)]

    async def list(self, status: WorkflowStatus | None = None, limit: int = 100) -> list[Instance]:
        """The most recently updated workflows, newest first, across partitions."""
        statuses = [status] if status else list(WorkflowStatus)
        async with self.redis.pipeline(transaction=False) as pipe:
            for p in range(self.partitions):
                for s in statuses:
                    pipe.zrevrange(naming.status_index_key(p, s), 0, limit - 1, withscores=True)
            rows = await pipe.execute()
        newest = sorted(((score, member.decode()) for row in rows for member, score in row), reverse=True)
        found = await self.load_many(wid for _, wid in newest[:limit])
        return [instance for instance in found.values() if instance is not None]

    async def request(
        self,
        definitions: Definitions,
        workflow_id: str,
        message_type: str,
        payload: dict[str, Any],
        now: datetime,
    ) -> Instance:
        """Apply an operator's request (cancel, retry) like any message: decided by
        the state machine, committed atomically, recorded in the history.

        Raises :class:`LookupError` for an unknown workflow and
        :class:`state_machine.NotAllowed` when its state does not allow the request.
        """
        for _ in range(10):
            instance = await self.load(workflow_id)
            if instance is None:
                raise LookupError(workflow_id)
            state_machine.check_operator_request(instance, message_type)
            definition = definitions.get(instance.workflow.name, instance.workflow.version)
            message = Envelope(
                message_id=uuid.uuid4().hex,
                type=message_type,
                correlation_id=workflow_id,
                workflow=instance.workflow,
                producer=f"operator:{payload.get('by') or 'api'}",
                occurred_at=now,
                payload=payload,
            )
            result = state_machine.transition(definition, instance, message, now)
            commit = self.commit(instance, result)
            [outcome] = await self.script.run(self.redis, [commit])
            if commit.landed(outcome):
                self.committed(instance, result)
                return result.instance
            if outcome.outcome is Outcome.DUPLICATE:
                # this request's own fresh message id was already recorded: the client
                # retried the script after losing its reply, the first run landed, and
                # the workflow has moved on since
                return await self.load(workflow_id) or result.instance
        raise RuntimeError(f"workflow {workflow_id} kept changing; try again")

    def committed(self, before: Instance | None, result: state_machine.Transition) -> None:
        """Record that the commit of ``result`` took effect: cache the instance it wrote,
        and tell the observer.

        The instance is kept only while the workflow runs here: it was started here
        (``before`` is None) or decided on the cached instance.  One decided on an
        instance read from Redis was moved on elsewhere last (another controller, an
        earlier run of this one, an operator request), so its next event is as likely
        to go elsewhere too; and a finished workflow seldom hears again.  Keeping those
        would only fill the cache with instances that are never read — which costs
        the collector and the allocator more than a read from Redis saves.
        """
        after = result.instance
        if before is None:
            # a new instance replaces whatever was kept under its id: an Idempotency-Key
            # reused after the workflow expired starts it again at version 1
            self.cache.forget(after.id)
        if after.status not in TERMINAL and (before is None or self.cache.holds(before)):
            self.cache.put(after)
        else:
            self.cache.forget(after.id)
        if self.observer is not None:
            self.observer(before, result)

    def commit(
        self,
        before: Instance | None,
        result: state_machine.Transition,
        cause: Entry | None = None,
        *,
        after: str | None = None,
    ) -> Commit:
        """The atomic commit of one transition (and the ack of the entry that caused it).

        ``after``: the message id of the transition this one was decided on top of in
        the same pipeline; the commit lands only if that one did.
        """
        instance = result.instance
        p = self.partition(instance.id)
        inst_key = naming.instance_key(p, instance.id)
        seen = naming.seen_key(p, instance.id)
        hist = naming.history_key(p, instance.id)
        # the version and the commit of the state decided on: a cached instance whose
        # workflow took another course at the same version (its data lost in a failover,
        # or expired and started again) is refused, not committed on top of
        commit = Commit().guard(inst_key, before.version if before else 0, before.commit if before else "")
        assert commit.token is not None
        instance.commit = commit.token
        incoming = next((h for h in result.history if h.direction == "in"), None)
        dedupe_id = incoming.message_id if incoming else result.history[0].message_id
        commit.dedupe(seen, dedupe_id)
        if after is not None:
            commit.requires(seen, after)
        commit.hset(inst_key, {"v": str(instance.version), "m": mark(instance), "s": instance.model_dump_json()})
        lines = [entry.model_dump_json() for entry in result.history]
        commit.rpush(hist, *lines)
        for message in result.outgoing:
            commit.xadd(naming.message_stream(p, message.type), encode(message))
        for entry, line in zip(result.history, lines, strict=True):
            commit.xadd(naming.progress_stream(p), _progress(instance, entry, line), maxlen=self.progress_maxlen)
        if before is not None and before.status != instance.status:
            commit.zrem(naming.status_index_key(p, before.status), instance.id)
        commit.zadd(naming.status_index_key(p, instance.status), _ms(instance.updated_at), instance.id)
        timers = naming.timers_key(p)
        for change in result.timers:
            if change.cancel is not None:
                commit.zrem(timers, timer_member(instance.id, change.name, change.cancel, instance.workflow))
            if change.delay_s is not None:
                member = timer_member(instance.id, change.name, change.generation, instance.workflow)
                commit.zadd_in(timers, round(change.delay_s * 1000), member)
        if instance.status in TERMINAL:
            for key in (inst_key, seen, hist):
                commit.expire(key, self.retention_s)
        elif before is not None and before.status in TERMINAL:
            for key in (inst_key, seen, hist):  # reopened by a late completion: keep it
                commit.persist(key)
        if cause is not None:
            commit.ack(cause.stream, naming.CONTROLLER_GROUP, cause.id)
        return commit

    async def start(
        self,
        definition: WorkflowDefinition,
        payload: dict[str, Any],
        now: datetime,
        *,
        idempotency_key: str | None = None,
        traceparent: str | None = None,
        sla_s: float | None = None,
    ) -> tuple[Instance, bool]:
        """Create a workflow and publish its start event; (instance, created).

        With an Idempotency-Key, a repeat of the same request returns the existing
        instance (created=False) and another body raises :class:`IdempotencyConflict`.
        The starts of one event-loop tick share one round trip (see :meth:`_commit_start`).
        """
        digest = request_hash(definition.name, payload, sla_s)
        workflow_id = workflow_id_for(definition.name, idempotency_key)
        result = state_machine.start(
            definition,
            workflow_id,
            payload,
            now,
            idempotency_key=idempotency_key,
            request_hash=digest,
            traceparent=traceparent,
            sla_s=sla_s,
        )
        commit = self.commit(None, result)
        try:
            outcome = await self._commit_start(commit)
        except (RedisConnectionError, RedisTimeoutError) as exc:  # the reply never came
            raise StartUncertain(workflow_id, exc) from exc
        # a duplicate is this start's own script run again after its reply was lost (it landed;
        # without a key nothing else can be, even once the workflow moved on), or, with an
        # Idempotency-Key, an earlier request's start: answered as a replay
        own = outcome.outcome is Outcome.DUPLICATE and idempotency_key is None
        if commit.landed(outcome) or own:
            self.committed(None, result)
            return result.instance, True
        existing = await self.load(workflow_id)
        if existing is None:  # expired between the two calls: start afresh
            return await self.start(
                definition, payload, now, idempotency_key=idempotency_key, traceparent=traceparent, sla_s=sla_s
            )
        if existing.request_hash != digest:
            assert idempotency_key is not None
            raise IdempotencyConflict(idempotency_key, workflow_id)
        return existing, False

    async def _commit_start(self, commit: Commit) -> CommitResult:
        """Run ``commit`` in one pipeline with the other starts of this event-loop tick.

        The first start of a tick schedules the run; every start made before that run
        begins joins it.  Each caller gets its own commit's outcome, in the order the
        commits were made.
        """
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[CommitResult] = loop.create_future()
        if self._starting is None:
            self._starting = []
            run = loop.create_task(self._run_starts(), name="workflow starts")
            self._start_runs.add(run)
            run.add_done_callback(self._start_runs.discard)
        self._starting.append((commit, outcome))
        return await outcome

    async def _run_starts(self) -> None:
        batch, self._starting = self._starting or [], None
        try:
            outcomes: list[CommitResult | ResponseError] | list[Exception]
            try:
                # a commit the script refuses fails alone: the others' outcomes stand
                outcomes = await self.script.run_each(self.redis, [commit for commit, _ in batch])
            except Exception as exc:  # Redis unreachable: nobody knows whether their start landed
                outcomes = [exc] * len(batch)
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():  # its caller was cancelled
                    continue
                if isinstance(outcome, Exception):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
        finally:
            for _, future in batch:  # cancelled itself: so are its callers
                future.cancel()

    async def aclose(self) -> None:
        """Wait for the starts in flight to finish."""
        await asyncio.gather(*self._start_runs, return_exceptions=True)


def _progress(instance: Instance, entry: HistoryEntry, line: str) -> dict[str, str | bytes]:
    """A progress record: routing fields to filter on without decoding, and the
    history line itself, so a live view shows exactly what a replay shows."""
    return {
        "workflow_id": instance.id,
        "workflow": instance.workflow.name,
        "version": str(instance.workflow.version),
        "status": instance.status,
        "seq": str(entry.seq),
        "type": entry.type,
        "entry": line,
    }
