"""CPU cost of the controller's and a worker's per-message code, without I/O.

``python -m bench.micro`` times, in one process and with no Redis, each step the
controller runs for one order (the HTTP body, the start transition and its
commit) and for each of the four events that follow (decode, load the instance,
transition, build the commit), and the steps a worker runs per message.  Set
against the CPU per workflow that ``python -m bench`` measures, it tells how much
of a process's time is its own Python and how much is I/O and the event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import timeit
import uuid
from collections.abc import Callable, Coroutine
from datetime import datetime
from decimal import Decimal
from functools import partial
from typing import Any, cast

import orjson
from redis.asyncio import ConnectionPool, Redis

from bench.orders import order
from contracts import naming
from contracts.definitions import ORDER_SAGA
from contracts.envelope import Envelope, decode, derived_message_id, encode, utcnow
from contracts.messages import OrderIn, OrderSubmitted, PaymentCaptured, validate_payload
from controller import state_machine
from controller.instance import Instance
from controller.store import WorkflowStore, request_hash
from participants import ledger
from participants.sdk import Message, Participant, Reply, Runner, RunnerSettings
from participants.sdk.autopipeline import AutoPipelineRedis
from participants.sdk.consumer import Entry, decode_entry_parsed
from participants.sdk.metrics import HandlerOutcome
from participants.sdk.runner import _Handled

PARTITIONS = naming.DEFAULT_PARTITIONS

# the events of a happy order saga after OrderSubmitted, with worker-like payloads
_EVENTS: tuple[tuple[str, str, Callable[[dict[str, Any]], dict[str, Any]]], ...] = (
    ("payment", "PaymentCaptured", lambda o: {"order": o, "payment_id": "pay_" + uuid.uuid4().hex, "amount": "30.49"}),
    ("inventory", "InventoryReserved", lambda o: {"order": o, "reservation_id": "res_" + uuid.uuid4().hex}),
    ("shipping", "ShipmentScheduled", lambda o: {"order": o, "shipment_id": "shp_" + uuid.uuid4().hex}),
    ("notification", "CustomerNotified", lambda o: {"customer_id": o["customer_id"], "channel": "email"}),
)


def _time(fn: Callable[[], object], min_s: float) -> float:
    """Microseconds per call of ``fn`` (best of 3 runs of at least ``min_s`` each)."""
    timer = timeit.Timer(fn)
    number, _ = timer.autorange()
    number = max(number, int(number * min_s / 0.2))
    return min(timer.repeat(repeat=3, number=number)) / number * 1e6


def _decode_event(fields: dict[bytes, bytes]) -> None:
    envelope = decode(fields)
    validate_payload(envelope.type, envelope.payload)


def _commit(
    store: WorkflowStore, before: Instance, result: state_machine.Transition, cause: Entry
) -> list[str | bytes]:
    return store.commit(before, result, cause=cause).argv()


def _reply(cause: Envelope, like: Envelope, now: datetime) -> Envelope:
    """The reply a worker builds for ``cause`` (as the SDK runner does)."""
    return Envelope(
        message_id=derived_message_id(cause.message_id, like.producer, like.type),
        type=like.type,
        correlation_id=cause.correlation_id,
        causation_id=cause.message_id,
        workflow=cause.workflow,
        producer=like.producer,
        occurred_at=now,
        payload=like.payload,
    )


def measure(min_s: float = 0.2) -> list[tuple[str, str, float, int]]:
    """[(process, step, µs per call, calls per workflow)]."""
    store = WorkflowStore(cast(Redis, None), PARTITIONS)
    body = orjson.dumps(order("micro", 1))
    payload = {"order": OrderIn.model_validate(orjson.loads(body)).model_dump(mode="json", exclude_none=True)}
    now = utcnow()
    workflow_id = uuid.uuid4().hex
    partition = naming.partition_of(workflow_id, PARTITIONS)
    started = state_machine.start(ORDER_SAGA, workflow_id, payload, now, request_hash=request_hash("order", payload))

    rows: list[tuple[str, str, float, int]] = []

    def add(process: str, step: str, fn: Callable[[], object], calls: int) -> None:
        rows.append((process, step, _time(fn, min_s), calls))

    add("controller", "HTTP: parse + validate OrderIn + dump", lambda: OrderIn.model_validate(orjson.loads(body))
        .model_dump(mode="json", exclude_none=True), 1)  # fmt: skip
    add("controller", "start: request hash + state_machine.start", lambda: state_machine.start(
        ORDER_SAGA, workflow_id, payload, now, request_hash=request_hash("order", payload)), 1)  # fmt: skip
    add("controller", "start: build commit + encode spec", lambda: store.commit(None, started).argv(), 1)

    # the chain of events, each decided against the instance the previous one left
    instance = started.instance
    cause = started.outgoing[0]
    per_event: dict[str, list[Callable[[], object]]] = {"decode": [], "load": [], "transition": [], "commit": []}
    worker: dict[str, list[Callable[[], object]]] = {"decode": [], "reply": [], "encode": []}
    for participant, message_type, make in _EVENTS:
        event = Envelope(
            message_id=derived_message_id(cause.message_id, participant, message_type),
            type=message_type,
            correlation_id=workflow_id,
            causation_id=cause.message_id,
            workflow=instance.workflow,
            producer=participant,
            occurred_at=now,
            payload=make(payload["order"]),
        )
        fields = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in encode(event).items()}
        incoming = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in encode(cause).items()}
        entry = Entry(naming.message_stream(partition, message_type), "1-0", fields)
        stored = instance.model_dump_json()
        result = state_machine.transition(ORDER_SAGA, instance, event, now)
        before = instance
        per_event["decode"].append(partial(_decode_event, fields))
        per_event["load"].append(partial(Instance.model_validate_json, stored))
        per_event["transition"].append(partial(state_machine.transition, ORDER_SAGA, before, event, now))
        per_event["commit"].append(partial(_commit, store, before, result, entry))
        worker["decode"].append(partial(_decode_event, incoming))
        worker["reply"].append(partial(_reply, cause, event, now))
        worker["encode"].append(partial(encode, event))
        instance, cause = result.instance, event

    def each(fns: list[Callable[[], object]]) -> Callable[[], None]:
        def run() -> None:
            for fn in fns:
                fn()

        return run

    n = len(_EVENTS)
    add("controller", "event: decode envelope + validate payload", each(per_event["decode"]), n)
    add("controller", "event: load instance (model_validate_json)", each(per_event["load"]), n)
    add("controller", "event: state_machine.transition", each(per_event["transition"]), n)
    add("controller", "event: build commit + encode spec", each(per_event["commit"]), n)
    add("worker", "decode envelope + validate payload", each(worker["decode"]), n)
    add("worker", "build reply Envelope", each(worker["reply"]), n)
    add("worker", "encode reply (envelope to JSON)", each(worker["encode"]), n)
    # the events are timed as a chain of n; report per event
    rows = [(p, s, us / n if s.startswith("event:") or p == "worker" else us, c) for p, s, us, c in rows]
    rows.append(("runner", "a batch's handlers, per message, with replies", _handling(payload, min_s), n))
    rows.append(("payment", "decode, handle (parse, model reply), commit", _payment(payload, min_s), 1))
    return rows


_BATCH = 64


def _runner(participant: Participant, cause: Envelope) -> tuple[Runner, Entry]:
    """A runner set up as entering it would, without connecting (its handlers make no call),
    and a stream entry of ``cause``."""
    runner = Runner(participant, RunnerSettings(redis_url="redis://unused"))
    pool = ConnectionPool()
    runner._redis = Redis(connection_pool=pool)
    runner._handlers_redis = AutoPipelineRedis(pool)
    fields = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in encode(cause).items()}
    stream = naming.message_stream(naming.partition_of(cause.correlation_id, PARTITIONS), cause.type)
    return runner, Entry(stream, "1-0", fields)


def _per_message(batch: Callable[[], Coroutine[None, None, None]], min_s: float) -> float:
    loop = asyncio.new_event_loop()
    try:
        return _time(lambda: loop.run_until_complete(batch()), min_s) / _BATCH
    finally:
        loop.close()


def _handling(payload: dict[str, Any], min_s: float) -> float:
    """µs per message the SDK runner spends around a handler that makes no call:
    handlers started as a batch's tasks, each with its log context, span, metrics,
    deadline and :class:`Message`, and its reply built into an envelope; then counted."""
    participant = Participant(ledger.PAYMENT)
    started = state_machine.start(ORDER_SAGA, uuid.uuid4().hex, payload, utcnow())
    cause = started.outgoing[0]
    captured = _EVENTS[0][2](payload["order"])

    @participant.on(cause.type)
    async def capture(msg: Message) -> Reply:
        return Reply("PaymentCaptured", captured)

    runner, entry = _runner(participant, cause)

    async def batch() -> None:
        async with asyncio.TaskGroup() as handlers:
            for _ in range(_BATCH):
                handlers.create_task(runner._handle(entry, cause))
        for _ in range(_BATCH):
            runner.metrics.message(cause.type, HandlerOutcome.OK)

    return _per_message(batch, min_s)


def _payment(payload: dict[str, Any], min_s: float) -> float:
    """µs per message of the payment worker's Python apart from its Redis calls: a batch's
    entries decoded (payload validated), handlers that parse the order and return a
    ``PaymentCaptured`` model, as the payment worker's does, run by the runner, and
    each outcome's commit built (the reply checked and encoded); then counted."""
    participant = Participant(ledger.PAYMENT)
    cause = state_machine.start(ORDER_SAGA, uuid.uuid4().hex, payload, utcnow()).outgoing[0]

    @participant.on(cause.type)
    async def capture(msg: Message) -> Reply:
        placed = msg.parse(OrderSubmitted).order
        total = placed.total()
        return Reply("PaymentCaptured", PaymentCaptured(order=placed, payment_id="pay_" + msg.message_id, amount=total))

    runner, entry = _runner(participant, cause)

    async def batch() -> None:
        decoded = [decode_entry_parsed(entry, PARTITIONS) for _ in range(_BATCH)]
        async with asyncio.TaskGroup() as handlers:
            tasks = [handlers.create_task(runner._handle(entry, envelope, parsed)) for envelope, parsed in decoded]
        for task, (envelope, _) in zip(tasks, decoded, strict=True):
            result = task.result()
            assert isinstance(result, _Handled)
            runner._outcome_commit(entry, envelope, result.outgoing).argv()
            runner.metrics.message(cause.type, HandlerOutcome.OK)

    return _per_message(batch, min_s)


_SCOPES = {
    "controller": "one order: HTTP + start + 4 events",
    "worker": "all four workers together",
    "runner": "the SDK runner around the four workers' handlers, replies included",
    "payment": "the payment worker's, per message, without its Redis calls",
}


def report(rows: list[tuple[str, str, float, int]]) -> str:
    lines = [f"{'process':<11} {'step':<46} {'µs/call':>8} {'×/wf':>5} {'µs/wf':>7}"]
    totals: dict[str, Decimal] = {}
    for process, step, us, calls in rows:
        lines.append(f"{process:<11} {step:<46} {us:>8.1f} {calls:>5} {us * calls:>7.0f}")
        totals[process] = totals.get(process, Decimal(0)) + Decimal(us * calls)
    lines.append("")
    for process, total in totals.items():
        scope = _SCOPES[process]
        lines.append(f"{process} Python per workflow ({scope}), without I/O: {total:.0f} µs")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.micro", description=__doc__.splitlines()[0] if __doc__ else ""
    )
    parser.add_argument("--min-seconds", type=float, default=0.2, help="shortest timing run per step")
    args = parser.parse_args(argv)
    print(report(measure(args.min_seconds)))


if __name__ == "__main__":
    main()
