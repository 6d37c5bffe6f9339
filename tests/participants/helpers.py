"""Factories for participant tests: envelopes, publishing, a running participant,
and readers of replies, dead letters and pending entries."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

from redis.asyncio import Redis

from contracts import naming
from contracts.envelope import Envelope, WorkflowRef, decode, encode, new_message_id, utcnow
from participants.sdk import Message, Participant, Runner, RunnerSettings
from participants.sdk.consumer import DLQ_FIELD_PREFIX

PARTITIONS = 4


def fast_settings(redis_url: str, **overrides: Any) -> RunnerSettings:
    """Settings that make retries, takeovers and drains happen within a second."""
    settings = RunnerSettings(
        redis_url=redis_url,
        partitions=PARTITIONS,
        consumer="live",
        block_ms=100,
        max_deliveries=3,
        retry_base_ms=20,
        retry_max_ms=200,
        claim_idle_ms=300,
        pending_interval_s=0.05,
        heartbeat_interval_s=0.1,
    )
    return dataclasses.replace(settings, **overrides)


def envelope(
    message_type: str,
    payload: dict[str, Any] | None = None,
    *,
    correlation_id: str | None = None,
    message_id: str | None = None,
    traceparent: str | None = None,
) -> Envelope:
    return Envelope(
        message_id=message_id or new_message_id(),
        type=message_type,
        correlation_id=correlation_id or uuid.uuid4().hex,
        workflow=WorkflowRef(name="order", version=1),
        producer="tests",
        occurred_at=utcnow(),
        traceparent=traceparent,
        payload=payload or {},
    )


def stream_of(message: Envelope) -> str:
    return naming.message_stream(naming.partition_of(message.correlation_id, PARTITIONS), message.type)


async def publish(redis: Redis, message: Envelope) -> str:
    """Append ``message`` to its stream; the entry id."""
    entry_id = await redis.xadd(stream_of(message), encode(message))  # type: ignore[arg-type]
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


async def emitted(redis: Redis, message_type: str) -> list[Envelope]:
    """Every message of ``message_type`` in every partition, oldest first per partition."""
    async with redis.pipeline(transaction=False) as pipe:
        for p in range(PARTITIONS):
            pipe.xrange(naming.message_stream(p, message_type))
        rows = await pipe.execute()
    return [decode(fields) for entries in rows for _, fields in entries]


async def dead_letters(redis: Redis) -> list[dict[str, str]]:
    """Every dead-lettered entry, as text fields (original fields keep their ``f:`` prefix)."""
    async with redis.pipeline(transaction=False) as pipe:
        for p in range(PARTITIONS):
            pipe.xrange(naming.dead_letter_stream(p))
        rows = await pipe.execute()
    return [
        {name.decode(): value.decode() for name, value in fields.items()} for entries in rows for _, fields in entries
    ]


def original_type(dead_letter: dict[str, str]) -> str | None:
    return dead_letter.get(DLQ_FIELD_PREFIX + naming.FIELD_TYPE)


async def pending_count(redis: Redis, stream: str, group: str) -> int:
    summary = await redis.xpending(stream, group)
    return int(summary["pending"])


@asynccontextmanager
async def running(participant: Participant, settings: RunnerSettings) -> AsyncIterator[Runner]:
    """``participant`` running in the background; stopped (and drained) on exit."""
    stop = asyncio.Event()
    async with Runner(participant, settings) as runner:
        task = asyncio.create_task(runner.run(stop))
        try:
            yield runner
        finally:
            stop.set()
            await task


def message(redis: Redis, participant: str, env: Envelope, attempt: int = 1) -> Message:
    """A delivery of ``env`` to ``participant``, for calling handlers directly."""
    return Message(env, redis, participant, stream_of(env), "0-1", attempt)


def order(
    *items: tuple[str, int, str],
    customer_id: str = "cust-1",
    country: str = "US",
    order_id: str | None = "order-1",
    currency: str = "USD",
) -> dict[str, Any]:
    """An order payload; items are (sku, quantity, unit price)."""
    return {
        "customer_id": customer_id,
        "items": [
            {"sku": sku, "quantity": quantity, "unit_price": str(Decimal(price))} for sku, quantity, price in items
        ],
        "currency": currency,
        "ship_to": {"country": country},
        "order_id": order_id,
    }
