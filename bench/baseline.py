"""The baseline: the order choreography written directly on ``redis.asyncio``.

No controller, no workflow state, no timers, no dedupe, no validation: each stage
is its own process that reads a batch of its input event with XREADGROUP,
``orjson``-decodes each envelope, writes the next event with XADD and acks the
batch with XACK — all of a batch's writes in one pipeline.  A driver XADDs
``OrderSubmitted`` events and reads the last stage's output.

It uses the same layout as streamsaga: one stream per message type per
partition, every stage reading all partitions in one XREADGROUP with the same
COUNT, envelopes of the same fields and similar size, hiredis, orjson.  The
stages are the steps of the order saga definition (payment → inventory →
shipping → notification), so both sides make the same number of hops.

Run one stage: ``python -m bench.baseline --redis-url URL --stage payment``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from bench.orders import order
from contracts import naming
from contracts.definitions import ORDER_SAGA
from participants.sdk import collector
from participants.sdk.connection import connect

log = logging.getLogger(__name__)

PREFIX = "bench"


@dataclass(frozen=True)
class Stage:
    participant: str
    input: str
    output: str


STAGES = tuple(Stage(step.participant, step.trigger, step.completed) for step in ORDER_SAGA.steps)


def stages(steps: int) -> tuple[Stage, ...]:
    """The first ``steps`` stages of the order saga."""
    if not 1 <= steps <= len(STAGES):
        raise ValueError(f"the baseline has 1 to {len(STAGES)} steps, not {steps}")
    return STAGES[:steps]


def stream(partition: int, message_type: str) -> str:
    """A baseline stream; a prefix of its own so it never mixes with streamsaga's."""
    return f"{PREFIX}:{{{partition}}}:msg:{message_type}"


def _envelope(message_type: str, workflow_id: str, causation_id: str | None, payload: dict[str, Any]) -> dict[str, Any]:
    # the same fields contracts.envelope.Envelope carries, serialised the same way
    return {
        "message_id": uuid.uuid4().hex,
        "type": message_type,
        "schema_version": 1,
        "correlation_id": workflow_id,
        "causation_id": causation_id,
        "workflow": {"name": ORDER_SAGA.name, "version": ORDER_SAGA.version},
        "producer": "bench",
        "occurred_at": datetime.now(UTC).isoformat(),
        "attempt": 1,
        "payload": payload,
    }


def _fields(envelope: dict[str, Any]) -> dict[str, bytes | str]:
    return {
        naming.FIELD_TYPE: envelope["type"],
        naming.FIELD_CORRELATION_ID: envelope["correlation_id"],
        naming.FIELD_MESSAGE_ID: envelope["message_id"],
        naming.FIELD_ENVELOPE: orjson.dumps(envelope),
    }


def _reaction(stage: Stage, incoming: dict[str, Any]) -> dict[str, Any]:
    payload = incoming.get("payload") or {}
    placed = payload.get("order", payload)
    reply = {"order": placed, f"{stage.participant}_id": uuid.uuid4().hex, "amount": "30.49"}
    return _envelope(stage.output, incoming["correlation_id"], incoming["message_id"], reply)


async def run_stage(redis: Redis, stage: Stage, partitions: int, batch: int, stop: asyncio.Event) -> int:
    """Process the stage's input until ``stop`` is set; returns the number of events handled."""
    inputs = [stream(p, stage.input) for p in range(partitions)]
    outputs = {name.encode(): stream(p, stage.output) for p, name in enumerate(inputs)}
    group = stage.participant
    consumer = f"{socket.gethostname()}-{os.getpid()}"
    await _create_groups(redis, inputs, group)
    positions: dict[str, str] = dict.fromkeys(inputs, ">")
    handled = 0
    while not stop.is_set():
        reply: Any = await redis.xreadgroup(group, consumer, positions, count=batch, block=500)  # type: ignore[arg-type]
        if not reply:
            continue
        async with redis.pipeline(transaction=False) as pipe:
            for source, entries in reply:
                target = outputs[source]
                for _, fields in entries:
                    pipe.xadd(target, _fields(_reaction(stage, orjson.loads(fields[b"envelope"]))))  # type: ignore[arg-type]
                pipe.xack(source, group, *(entry_id for entry_id, _ in entries))
                handled += len(entries)
            await pipe.execute()
    return handled


async def _create_groups(redis: Redis, streams: list[str], group: str) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        for name in streams:
            pipe.xgroup_create(name, group, id="0", mkstream=True)
        results = await pipe.execute(raise_on_error=False)
    for name, result in zip(streams, results, strict=True):
        if isinstance(result, ResponseError) and "BUSYGROUP" not in str(result):
            raise RuntimeError(f"cannot create group {group!r} on {name}: {result}")


def group_streams(partitions: int, steps: int) -> list[tuple[str, str]]:
    """(stream, group) of every stage, to wait for before driving load."""
    return [(stream(p, s.input), s.participant) for s in stages(steps) for p in range(partitions)]


def final_streams(partitions: int, steps: int) -> list[str]:
    last = stages(steps)[-1]
    return [stream(p, last.output) for p in range(partitions)]


def classify_final(fields: dict[bytes, bytes]) -> tuple[str, str] | None:
    """Every entry on a final stream completes its workflow."""
    return fields[naming.FIELD_CORRELATION_ID.encode()].decode(), "completed"


class BaselineSubmitter:
    """XADDs one ``OrderSubmitted``-like event per workflow to its partition."""

    def __init__(self, redis: Redis, partitions: int, run: str) -> None:
        self.redis = redis
        self.partitions = partitions
        self.run = run
        self._type = STAGES[0].input

    async def __call__(self, index: int) -> str:
        workflow_id = uuid.uuid4().hex
        partition = naming.partition_of(workflow_id, self.partitions)
        envelope = _envelope(self._type, workflow_id, None, {"order": order(self.run, index)})
        await self.redis.xadd(stream(partition, self._type), _fields(envelope))  # type: ignore[arg-type]
        return workflow_id


async def delete_streams(redis: Redis, partitions: int) -> None:
    """Remove every baseline stream (so a server given with --redis-url is left as found)."""
    names = {stream(p, t) for p in range(partitions) for s in STAGES for t in (s.input, s.output)}
    await redis.delete(*names)


async def _main(args: argparse.Namespace) -> None:
    stage = next((s for s in STAGES if s.participant == args.stage), None)
    if stage is None:
        raise SystemExit(f"no baseline stage {args.stage!r}; one of {[s.participant for s in STAGES]}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    redis = connect(args.redis_url, name=f"bench-baseline-{stage.participant}")
    try:
        handled = await run_stage(redis, stage, args.partitions, args.batch, stop)
        log.info("baseline stage %s handled %d events", stage.participant, handled)
    finally:
        await redis.aclose()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline", description="Run one baseline stage.")
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--stage", required=True, choices=[s.participant for s in STAGES])
    parser.add_argument("--partitions", type=int, default=naming.DEFAULT_PARTITIONS)
    parser.add_argument("--batch", type=int, default=200, help="XREADGROUP COUNT (per stream)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    collector.tune()  # as `streamsaga worker` does: the comparison is of the work, not of GC settings
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
