"""The runner against a real Redis: emission, idempotency, retries, takeover, dead letters."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection
from decimal import Decimal
from typing import Any

import orjson
import pytest
from pydantic import BaseModel
from redis.asyncio import Redis
from redis.asyncio.retry import Retry as ConnectionRetry
from redis.backoff import NoBackoff

from contracts import naming
from contracts.envelope import derived_message_id, encode
from contracts.messages import OrderSubmitted, PaymentCaptured, ShipmentFailed
from controller.embedded_redis import free_port
from participants.sdk import Message, Participant, Reject, Reply, Retry
from participants.sdk.consumer import Entry, GroupReader
from participants.sdk.runner import run_participant
from tests.conftest import eventually
from tests.faults import refusing_writes, through_proxy
from tests.participants.helpers import (
    PARTITIONS,
    dead_letters,
    emitted,
    envelope,
    fast_settings,
    order,
    original_type,
    pending_count,
    publish,
    running,
    stream_of,
)

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

SLOW_WORK_S = 1.0  # a handler that runs longer than a peer's claim time
WORK_S = 0.05  # a handler's work, long enough for handlers to overlap


def echo(calls: list[Message], *, idempotent: bool = False) -> Participant:
    """Answers every Ping with a Pong; also subscribes to OrderSubmitted (a type with a schema)."""
    p = Participant("echo")

    @p.on("Ping", idempotent=idempotent)
    async def ping(msg: Message) -> Reply:
        calls.append(msg)
        return Reply("Pong", {"n": msg.payload.get("n")})

    @p.on("OrderSubmitted")
    async def submitted(msg: Message) -> None:
        calls.append(msg)

    return p


async def test_a_reply_carries_the_workflow_and_a_derived_id_and_the_entry_is_acked(
    redis: Redis, redis_url: str
) -> None:
    calls: list[Message] = []
    incoming = envelope("Ping", {"n": 7}, traceparent=TRACEPARENT)
    async with running(echo(calls), fast_settings(redis_url)) as runner:
        await publish(redis, incoming)
        [pong] = await eventually(lambda: emitted(redis, "Pong"), lambda found: len(found) == 1, what="a Pong")
    assert pong.message_id == derived_message_id(incoming.message_id, "echo", "Pong")
    assert pong.correlation_id == incoming.correlation_id
    assert pong.causation_id == incoming.message_id
    assert pong.workflow == incoming.workflow
    assert (pong.producer, pong.attempt, pong.traceparent) == ("echo", 1, TRACEPARENT)
    assert pong.payload == {"n": 7}
    assert stream_of(pong) == naming.message_stream(naming.partition_of(incoming.correlation_id, PARTITIONS), "Pong")
    assert await pending_count(redis, stream_of(incoming), "echo") == 0
    outcome = await redis.get(
        naming.outcome_key(naming.partition_of_key(stream_of(incoming)), "echo", incoming.message_id)
    )
    assert outcome is not None
    assert orjson.loads(outcome) == [pong.message_id]
    assert runner.stats.handled == 1
    assert runner.stats.emitted == 1


@pytest.mark.parametrize(
    ("idempotent", "runs"),
    [
        (False, 1),  # looked up first: acked without running the handler again
        (True, 2),  # no look-up on a first delivery: the handler runs again, its replies are not emitted again
    ],
)
async def test_a_message_written_twice_is_emitted_once(
    redis: Redis, redis_url: str, idempotent: bool, runs: int
) -> None:
    calls: list[Message] = []
    incoming = envelope("Ping", {"n": 1})
    async with running(echo(calls, idempotent=idempotent), fast_settings(redis_url)) as runner:
        await publish(redis, incoming)
        await eventually(lambda: emitted(redis, "Pong"), lambda found: len(found) == 1, what="a Pong")
        await publish(redis, incoming)  # a producer's retried XADD: a new entry, the same message
        await eventually(lambda: asyncio.sleep(0, runner.stats.duplicates), lambda n: n == 1, what="the duplicate")
    assert len(calls) == runs
    assert len(await emitted(redis, "Pong")) == 1
    assert await pending_count(redis, stream_of(incoming), "echo") == 0


async def test_the_same_message_twice_in_one_batch_runs_once(redis: Redis, redis_url: str) -> None:
    calls: list[Message] = []
    incoming = envelope("Ping")
    await publish(redis, incoming)
    await publish(redis, incoming)
    async with running(echo(calls), fast_settings(redis_url)) as runner:
        await eventually(lambda: pending_count(redis, stream_of(incoming), "echo"), lambda n: n == 0, what="both acked")
    assert len(calls) == 1
    assert len(await emitted(redis, "Pong")) == 1
    assert (runner.stats.handled, runner.stats.duplicates) == (1, 1)


@pytest.mark.parametrize("idempotent", [False, True])  # a redelivery is looked up either way
async def test_a_reclaimed_entry_whose_message_was_handled_is_only_acked(
    redis: Redis, redis_url: str, idempotent: bool
) -> None:
    calls: list[Message] = []
    incoming = envelope("Ping")
    stream = stream_of(incoming)
    await publish(redis, incoming)
    dead = GroupReader(redis, "echo", "dead", [stream], block_ms=10)
    await dead.ensure_groups()
    assert len(await dead.read()) == 1  # the dead consumer holds this entry and never acks it
    await publish(redis, incoming)  # the same message again, handled by the live consumer
    async with running(echo(calls, idempotent=idempotent), fast_settings(redis_url)) as runner:
        await eventually(lambda: pending_count(redis, stream, "echo"), lambda n: n == 0, what="the takeover")
    assert len(calls) == 1
    assert len(await emitted(redis, "Pong")) == 1
    assert runner.stats.duplicates == 1


async def test_a_dead_consumers_pending_entry_is_taken_over(redis: Redis, redis_url: str) -> None:
    calls: list[Message] = []
    incoming = envelope("Ping", {"n": 3})
    stream = stream_of(incoming)
    await publish(redis, incoming)
    dead = GroupReader(redis, "echo", "dead", [stream], block_ms=10)
    await dead.ensure_groups()
    assert len(await dead.read()) == 1
    started = time.monotonic()
    async with running(echo(calls), fast_settings(redis_url, claim_idle_ms=300)):
        [pong] = await eventually(lambda: emitted(redis, "Pong"), lambda found: len(found) == 1, what="a Pong")
    assert time.monotonic() - started >= 0.3 * 0.9
    assert [msg.message_id for msg in calls] == [incoming.message_id]
    assert calls[0].attempt == pong.attempt == 2
    assert await pending_count(redis, stream, "echo") == 0


async def test_a_slow_handler_keeps_its_entry_from_live_peers(redis: Redis, redis_url: str) -> None:
    calls: list[Message] = []
    slow = Participant("slow")

    @slow.on("Ping")
    async def ping(msg: Message) -> Reply:
        calls.append(msg)
        await asyncio.sleep(SLOW_WORK_S)  # the work: three times the peers' claim time
        return Reply("Pong")

    async with (
        running(slow, fast_settings(redis_url, consumer="a", claim_idle_ms=300)),
        running(slow, fast_settings(redis_url, consumer="b", claim_idle_ms=300)),
    ):
        await publish(redis, envelope("Ping"))
        [pong] = await eventually(lambda: emitted(redis, "Pong"), lambda found: len(found) == 1, what="a Pong")
    assert len(calls) == 1
    assert pong.attempt == 1
    assert await dead_letters(redis) == []


async def test_an_entry_a_batch_took_while_a_pending_scan_ran_is_left_to_that_batch(
    redis: Redis, redis_url: str
) -> None:
    # A pending scan excludes what the runner held when the scan started.  A scan that
    # waits (for a connection, say) can find an entry a batch read meanwhile, claim it and
    # hand it back while the batch still holds it, or after the batch settled it.
    calls: list[int] = []
    release = asyncio.Event()
    slow = Participant("slow")

    @slow.on("Ping")
    async def ping(msg: Message) -> Reply:
        calls.append(msg.attempt)
        await release.wait()
        return Reply("Pong")

    incoming = envelope("Ping")
    stream = stream_of(incoming)
    scans = 0
    handed_back: list[str] = []
    async with running(slow, fast_settings(redis_url)) as runner:
        real = runner.reader.pending

        async def stale_scan(
            exclude: Collection[tuple[str, str]] = (), limit: int | None = None
        ) -> tuple[list[Entry], list[Entry]]:
            nonlocal scans
            scans += 1
            # the scan waited: what the runner refreshed just before it has been idle since
            rows: Any = await redis.xpending_range(stream, "slow", "-", "+", 10)
            if rows:
                await redis.xclaim(
                    stream, "slow", "live", 0, [row["message_id"] for row in rows], idle=1_000, justid=True
                )
            retry, exhausted = await real((), limit)  # as if the runner held nothing when the scan started
            handed_back.extend(entry.id for entry in retry)
            if len(handed_back) == 2:
                release.set()  # this time the batch finishes, and acks the entry, before the scan returns
                await eventually(lambda: pending_count(redis, stream, "slow"), lambda n: n == 0, what="the ack")
            return retry, exhausted

        runner.reader.pending = stale_scan  # type: ignore[method-assign]
        await publish(redis, incoming)
        await eventually(lambda: asyncio.sleep(0, release.is_set()), lambda done: done, what="two claims")
        after = scans
        await eventually(lambda: asyncio.sleep(0, scans), lambda n: n > after, what="the scan after them")
    assert handed_back == [handed_back[0]] * 2
    assert calls == [1]
    assert (runner.stats.handled, runner.stats.duplicates) == (1, 0)
    assert len(await emitted(redis, "Pong")) == 1


async def test_a_failing_handler_is_retried_then_dead_lettered_and_later_messages_go_on(
    redis: Redis, redis_url: str
) -> None:
    attempts: list[int] = []
    flaky = Participant("flaky")

    @flaky.on("Ping")
    async def ping(msg: Message) -> Reply:
        if msg.payload.get("fail"):
            attempts.append(msg.attempt)
            raise RuntimeError("card gateway down")
        return Reply("Pong")

    bad = envelope("Ping", {"fail": True})
    good = envelope("Ping")
    async with running(flaky, fast_settings(redis_url, max_deliveries=3)) as runner:
        await publish(redis, bad)
        [dead] = await eventually(lambda: dead_letters(redis), lambda found: len(found) == 1, what="a dead letter")
        await publish(redis, good)
        await eventually(lambda: emitted(redis, "Pong"), lambda found: len(found) == 1, what="the later message")
    assert attempts == [1, 2, 3]
    assert dead["reason"] == "gave up after 3 deliveries: RuntimeError: card gateway down"
    assert dead["deliveries"] == "3"
    assert (dead["source_stream"], dead["group"]) == (stream_of(bad), "flaky")
    assert dead["f:message_id"] == bad.message_id
    assert await pending_count(redis, stream_of(bad), "flaky") == 0
    assert runner.stats.failed == 2
    assert runner.stats.dead_lettered == 1


@pytest.mark.parametrize("where", ["handler", "commit"])
async def test_an_outage_spends_no_delivery_however_long_it_lasts(redis: Redis, redis_url: str, where: str) -> None:
    tries: list[int] = []
    outage_begun = asyncio.Event()
    keeper = Participant("keeper")

    @keeper.on("Ping")
    async def ping(msg: Message) -> Reply:
        tries.append(msg.attempt)
        await outage_begun.wait()
        if where == "handler":
            await msg.redis.set(f"kept:{msg.correlation_id}", "1")  # refused while Redis is full
        return Reply("Pong")

    message = envelope("Ping")
    # a retry backoff of 200 ms (not fast_settings' 20): a pending scan claims only what has been idle
    # that long, so a machine slow enough to take 20 ms between a read and a scan cannot claim the
    # entry the batch just read (a delivery this test would take for the outage's)
    settings = fast_settings(redis_url, max_deliveries=2, retry_base_ms=200, retry_max_ms=400)
    async with running(keeper, settings) as runner:
        await publish(redis, message)
        await eventually(lambda: asyncio.sleep(0, tries), lambda found: found == [1], what="the first try")
        async with refusing_writes(redis):
            outage_begun.set()
            # three tries in place (0.5 + 1 s): longer than two deliveries' backoff (200 ms), so a
            # retry through a claim would have spent both and dead-lettered the message
            await eventually(lambda: asyncio.sleep(0, runner.stats.unavailable), lambda n: n >= 3, what="tries")
            [entry] = await redis.xpending_range(stream_of(message), "keeper", "-", "+", 1)
            assert (entry["consumer"], entry["times_delivered"]) == (b"live", 1)
        [pong] = await eventually(lambda: emitted(redis, "Pong"), lambda found: len(found) == 1, what="the reply")
    assert pong.attempt == 1
    assert set(tries) == {1}  # never delivered again
    if where == "commit":
        assert len(tries) == 1  # the handler's work stood: only the commit was tried again
    else:
        assert len(tries) >= 2  # tried again in place
    assert await dead_letters(redis) == []
    assert await pending_count(redis, stream_of(message), "keeper") == 0
    assert (runner.stats.failed, runner.stats.dead_lettered) == (0, 0)


async def test_while_redis_refuses_the_commits_no_more_is_read(redis: Redis, redis_url: str) -> None:
    outage_begun = asyncio.Event()
    quick = Participant("quick")

    @quick.on("Ping")
    async def ping(msg: Message) -> Reply:
        await outage_begun.wait()
        return Reply("Pong")  # touches no Redis: only the commits are refused

    messages = [envelope("Ping", correlation_id=f"wf-{i}") for i in range(40)]
    streams = {stream_of(message) for message in messages}
    async with running(quick, fast_settings(redis_url, concurrency=2, batch=2)) as runner:
        for message in messages:
            await publish(redis, message)
        await eventually(lambda: pending(redis, streams), lambda n: n >= 1, what="the first batch taken")
        async with refusing_writes(redis):
            outage_begun.set()  # handlers finish, their slots free up: Redis would hand out the rest
            await eventually(lambda: asyncio.sleep(0, runner.stats.unavailable), lambda n: n >= 3, what="refusals")
            # the reads before the first refusal (a read takes up to READ_BOUND x batch = 8), not all 40
            taken = await pending(redis, streams)
            assert taken <= 16
            await eventually(lambda: asyncio.sleep(0, runner.stats.unavailable), lambda n: n >= 6, what="more")
            assert await pending(redis, streams) == taken  # and nothing more since, retries included
        await eventually(lambda: emitted(redis, "Pong"), lambda found: len(found) == 40, what="every reply")


async def pending(redis: Redis, streams: Collection[str]) -> int:
    return sum([await pending_count(redis, stream, "quick") for stream in streams])


async def test_a_handlers_own_redis_failing_is_its_failure_not_an_outage(redis: Redis, redis_url: str) -> None:
    tries: list[int] = []
    dependent = Participant("dependent")

    @dependent.on("Ping")
    async def ping(msg: Message) -> Reply:
        tries.append(msg.attempt)
        other = Redis(port=free_port(), retry=ConnectionRetry(NoBackoff(), 0))  # a store of its own, down
        try:
            await other.ping()
        finally:
            await other.aclose()
        return Reply("Pong")

    async with running(dependent, fast_settings(redis_url, max_deliveries=2)) as runner:
        await publish(redis, envelope("Ping"))
        [dead] = await eventually(lambda: dead_letters(redis), lambda found: len(found) == 1, what="a dead letter")
    assert tries == [1, 2]  # retried as deliveries, then given up: the runner's own Redis was fine
    assert dead["reason"].startswith("gave up after 2 deliveries: ConnectionError:")
    assert runner.stats.unavailable == 0


async def test_a_participant_started_while_redis_cannot_be_reached_waits_for_it(
    redis: Redis, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="participants.sdk.runner")
    async with through_proxy(redis_url) as (proxy, _):
        proxy.go_down()
        stop = asyncio.Event()
        task = asyncio.create_task(run_participant(echo([]), fast_settings(proxy.url), stop))
        try:
            await eventually(lambda: asyncio.sleep(0, proxy.refused), lambda n: n >= 2, what="tries refused")
            assert not task.done()  # waiting, not exited
            proxy.come_back()
            await eventually(
                lambda: redis.hkeys(naming.heartbeat_key()), lambda keys: b"echo/live" in keys, what="a beat"
            )
        finally:
            stop.set()
            await task
    lines = [r.getMessage() for r in caplog.records if r.name == "participants.sdk.runner"]
    assert sum("echo/live starting failed: ConnectionError" in line for line in lines) == 1, lines
    assert sum("echo/live starting works again" in line for line in lines) == 1, lines


async def test_a_rejected_message_is_dead_lettered_at_once(redis: Redis, redis_url: str) -> None:
    attempts: list[int] = []
    strict = Participant("strict")

    @strict.on("Ping")
    async def ping(msg: Message) -> Reply:
        attempts.append(msg.attempt)
        raise Reject(f"unknown customer {msg.payload['customer']!r}")

    incoming = envelope("Ping", {"customer": "cust-9"})
    async with running(strict, fast_settings(redis_url, max_deliveries=5)):
        await publish(redis, incoming)
        [dead] = await eventually(lambda: dead_letters(redis), lambda found: len(found) == 1, what="a dead letter")
    assert attempts == [1]
    assert dead["reason"] == "rejected by strict: unknown customer 'cust-9'"
    assert dead["deliveries"] == "1"
    assert await pending_count(redis, stream_of(incoming), "strict") == 0


async def test_malformed_entries_are_dead_lettered_with_the_reason(redis: Redis, redis_url: str) -> None:
    calls: list[Message] = []
    stream = naming.message_stream(0, "Ping")
    elsewhere = next(cid for cid in (f"wf-{i}" for i in range(100)) if naming.partition_of(cid, PARTITIONS) != 0)
    in_partition_0 = next(cid for cid in (f"wf-{i}" for i in range(100)) if naming.partition_of(cid, PARTITIONS) == 0)
    async with running(echo(calls), fast_settings(redis_url)):
        await redis.xadd(stream, {"type": "Ping", "correlation_id": "c", "message_id": "m", "envelope": b"{not json"})
        await redis.xadd(stream, {"garbage": "1"})
        await redis.xadd(stream, encode(envelope("Pong", correlation_id=in_partition_0)))  # type: ignore[arg-type]
        await redis.xadd(stream, encode(envelope("Ping", correlation_id=elsewhere)))  # type: ignore[arg-type]
        bad_order = envelope("OrderSubmitted", {"order": {"customer_id": "c"}})
        await publish(redis, bad_order)
        found = await eventually(lambda: dead_letters(redis), lambda found: len(found) == 5, what="5 dead letters")
    reasons = {dead["reason"] for dead in found}
    assert any(reason.startswith("invalid envelope") for reason in reasons), reasons
    assert "missing stream field 'type'" in reasons
    assert "type 'Pong' does not belong on the Ping stream" in reasons
    assert f"correlation_id {elsewhere!r} belongs to another partition" in reasons
    assert any(reason.startswith("invalid OrderSubmitted payload at payload.order.items") for reason in reasons)
    assert calls == []
    assert await pending_count(redis, stream, "echo") == 0


async def test_retry_with_a_delay_tries_again_no_sooner(redis: Redis, redis_url: str) -> None:
    # the delay is longer than the whole backoff schedule: the entry must be held, not exhausted
    times: list[float] = []
    busy = Participant("busy")

    @busy.on("Ping")
    async def ping(msg: Message) -> Reply:
        times.append(time.monotonic())
        if msg.attempt == 1:
            raise Retry("inventory service busy", delay=0.4)
        return Reply("Pong")

    async with running(busy, fast_settings(redis_url, max_deliveries=3, retry_base_ms=20)):
        await publish(redis, envelope("Ping"))
        [pong] = await eventually(lambda: emitted(redis, "Pong"), lambda found: len(found) == 1, what="a Pong")
    assert pong.attempt == 2
    assert times[1] - times[0] >= 0.4
    assert await dead_letters(redis) == []


async def test_a_handler_that_overruns_its_timeout_is_retried(redis: Redis, redis_url: str) -> None:
    stuck = Participant("stuck")

    @stuck.on("Ping")
    async def ping(msg: Message) -> Reply:
        if msg.attempt == 1:
            await asyncio.Event().wait()  # never finishes on its own
        return Reply("Pong")

    async with running(stuck, fast_settings(redis_url, handler_timeout_s=0.1)):
        await publish(redis, envelope("Ping"))
        [pong] = await eventually(lambda: emitted(redis, "Pong"), lambda found: len(found) == 1, what="a Pong")
    assert pong.attempt == 2


async def test_an_invalid_reply_payload_is_a_failure_of_the_handler(redis: Redis, redis_url: str) -> None:
    buggy = Participant("buggy")

    @buggy.on("Ping")
    async def ping(msg: Message) -> Reply:
        return Reply("PaymentCaptured", {"payment_id": "p1"})

    async with running(buggy, fast_settings(redis_url, max_deliveries=2)):
        await publish(redis, envelope("Ping"))
        [dead] = await eventually(lambda: dead_letters(redis), lambda found: len(found) == 1, what="a dead letter")
    assert dead["reason"].startswith("gave up after 2 deliveries: PayloadError: invalid PaymentCaptured payload at")
    assert await emitted(redis, "PaymentCaptured") == []


async def test_a_handler_parses_the_very_payload_model_validated_at_decode(redis: Redis, redis_url: str) -> None:
    seen: list[tuple[BaseModel | None, OrderSubmitted, OrderSubmitted]] = []
    plain: list[BaseModel | None] = []
    typed = Participant("typed")

    @typed.on("OrderSubmitted")
    async def submitted(msg: Message) -> None:
        seen.append((msg.payload_model, msg.parse(OrderSubmitted), msg.parse(OrderSubmitted)))

    @typed.on("Ping")
    async def ping(msg: Message) -> None:
        plain.append(msg.payload_model)

    async with running(typed, fast_settings(redis_url)) as runner:
        await publish(redis, envelope("OrderSubmitted", {"order": order(("SKU-1", 2, "5.00"))}))
        await publish(redis, envelope("Ping", {"n": 1}))
        await eventually(lambda: asyncio.sleep(0, runner.stats.handled), lambda n: n == 2, what="both handled")
    [(decoded, first, second)] = seen
    assert type(decoded) is OrderSubmitted
    assert first is decoded
    assert second is decoded
    assert decoded.order.items[0].sku == "SKU-1"
    assert plain == [None]  # a type without a registered model: nothing was validated, nothing kept


async def test_a_reply_model_is_emitted_as_its_json_dump(redis: Redis, redis_url: str) -> None:
    pay = Participant("pay")

    @pay.on("OrderSubmitted")
    async def capture(msg: Message) -> Reply:
        placed = msg.parse(OrderSubmitted).order
        return Reply("PaymentCaptured", PaymentCaptured(order=placed, payment_id="pay-1", amount=placed.total()))

    incoming = envelope("OrderSubmitted", {"order": order(("SKU-1", 2, "5.25"), order_id=None)})
    async with running(pay, fast_settings(redis_url)):
        await publish(redis, incoming)
        [captured] = await eventually(
            lambda: emitted(redis, "PaymentCaptured"), lambda found: len(found) == 1, what="a PaymentCaptured"
        )
    expected = PaymentCaptured(
        order=OrderSubmitted.model_validate(incoming.payload).order, payment_id="pay-1", amount=Decimal("10.50")
    )
    assert captured.payload == expected.model_dump(mode="json", exclude_none=True)
    assert "order_id" not in captured.payload["order"]  # None fields are left out, as before
    assert PaymentCaptured.model_validate(captured.payload) == expected


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (
            {"order": order(("SKU-1", 1, "1.00")), "payment_id": "p", "amount": "-3"},
            "PayloadError: invalid PaymentCaptured payload at payload.amount: Input should be greater than or equal",
        ),
        (ShipmentFailed(reason="wrong model"), "PayloadError: invalid PaymentCaptured payload at payload.order:"),
    ],
)
async def test_a_reply_that_is_not_the_registered_model_is_still_checked_before_it_is_emitted(
    redis: Redis, redis_url: str, payload: BaseModel | dict[str, object], reason: str
) -> None:
    buggy = Participant("buggy")

    @buggy.on("Ping")
    async def ping(msg: Message) -> Reply:
        return Reply("PaymentCaptured", payload)

    async with running(buggy, fast_settings(redis_url, max_deliveries=1)):
        await publish(redis, envelope("Ping"))
        [dead] = await eventually(lambda: dead_letters(redis), lambda found: len(found) == 1, what="a dead letter")
    assert dead["reason"].startswith(f"gave up after 1 deliveries: {reason}"), dead["reason"]
    assert await emitted(redis, "PaymentCaptured") == []


async def test_making_a_parsed_model_invalid_fails_the_handler(redis: Redis, redis_url: str) -> None:
    # the decoded model is shared with the handler; assignments to it are validated
    sloppy = Participant("sloppy")

    @sloppy.on("OrderSubmitted")
    async def capture(msg: Message) -> Reply:
        placed = msg.parse(OrderSubmitted).order
        placed.currency = "XXX"
        return Reply("PaymentCaptured", PaymentCaptured(order=placed, payment_id="p", amount=placed.total()))

    async with running(sloppy, fast_settings(redis_url, max_deliveries=1)):
        await publish(redis, envelope("OrderSubmitted", {"order": order(("SKU-1", 1, "1.00"))}))
        [dead] = await eventually(lambda: dead_letters(redis), lambda found: len(found) == 1, what="a dead letter")
    assert dead["reason"].startswith(
        "gave up after 1 deliveries: ValidationError: 1 validation error for Order\ncurrency"
    )
    assert await emitted(redis, "PaymentCaptured") == []


async def test_overrunning_handlers_fail_as_timeouts_and_a_handlers_own_timeout_error_as_an_error(
    redis: Redis, redis_url: str
) -> None:
    mixed = Participant("mixed")

    @mixed.on("Ping")
    async def ping(msg: Message) -> Reply:
        kind = msg.payload["kind"]
        if kind == "stuck":
            await asyncio.Event().wait()  # never finishes on its own
        if kind == "own":
            raise TimeoutError("the bank did not answer")
        return Reply("Pong", {"n": msg.payload["n"]})

    kinds = ["stuck", "own", "quick"] * 10
    for n, kind in enumerate(kinds):
        await publish(redis, envelope("Ping", {"kind": kind, "n": n}))  # waiting before the runner starts: one batch
    started = time.monotonic()
    async with running(mixed, fast_settings(redis_url, max_deliveries=1, handler_timeout_s=0.2)) as runner:
        found = await eventually(lambda: dead_letters(redis), lambda found: len(found) == 20, what="20 dead letters")
        assert time.monotonic() - started >= 0.2
    reasons = sorted(dead["reason"] for dead in found)
    assert reasons == sorted(
        ["gave up after 1 deliveries: handler did not finish within 0.2s"] * 10
        + ["gave up after 1 deliveries: TimeoutError: the bank did not answer"] * 10
    )
    pongs = await emitted(redis, "Pong")
    assert sorted(pong.payload["n"] for pong in pongs) == [n for n, kind in enumerate(kinds) if kind == "quick"]
    assert (runner.stats.handled, runner.stats.dead_lettered) == (10, 20)


async def test_several_replies_get_distinct_ids_and_no_reply_just_acks(redis: Redis, redis_url: str) -> None:
    fan = Participant("fan")

    @fan.on("Ping")
    async def ping(msg: Message) -> list[Reply]:
        return [Reply("Pong", {"i": i}) for i in range(3)]

    @fan.on("Ignore")
    async def ignore(msg: Message) -> None:
        return None

    ignored = envelope("Ignore")
    async with running(fan, fast_settings(redis_url)):
        await publish(redis, envelope("Ping"))
        await publish(redis, ignored)
        pongs = await eventually(lambda: emitted(redis, "Pong"), lambda found: len(found) == 3, what="3 Pongs")
        await eventually(lambda: pending_count(redis, stream_of(ignored), "fan"), lambda n: n == 0, what="the ack")
    assert len({pong.message_id for pong in pongs}) == 3
    assert [pong.payload["i"] for pong in pongs] == [0, 1, 2]


async def test_the_redis_calls_of_one_batchs_handlers_share_one_round_trip(redis: Redis, redis_url: str) -> None:
    shared = Participant("shared")

    @shared.on("Ping")
    async def ping(msg: Message) -> Reply:
        # each handler's business call, answered with the id of the connection that carried it
        return Reply("Pong", {"connection": await msg.redis.client_id(), "n": msg.payload["n"]})

    for n in range(8):
        await publish(redis, envelope("Ping", {"n": n}))  # waiting before the runner starts: one batch
    async with running(shared, fast_settings(redis_url)):
        pongs = await eventually(lambda: emitted(redis, "Pong"), lambda found: len(found) == 8, what="8 Pongs")
    assert sorted(pong.payload["n"] for pong in pongs) == list(range(8))
    # one client each would have taken a connection each, the calls being in flight at once
    assert len({pong.payload["connection"] for pong in pongs}) == 1


async def test_no_more_handlers_run_at_once_than_the_concurrency(redis: Redis, redis_url: str) -> None:
    running_now = 0
    most = 0
    gate = Participant("gate")

    @gate.on("Ping")
    async def ping(msg: Message) -> Reply:
        nonlocal running_now, most
        running_now += 1
        most = max(most, running_now)
        await asyncio.sleep(WORK_S)  # the work
        running_now -= 1
        return Reply("Pong")

    for _ in range(6):
        await publish(redis, envelope("Ping", correlation_id="one-workflow"))
    async with running(gate, fast_settings(redis_url, concurrency=2)):
        await eventually(lambda: emitted(redis, "Pong"), lambda found: len(found) == 6, what="6 Pongs")
    assert most == 2


async def test_a_heartbeat_lists_the_consumer_and_its_subscriptions_while_it_runs(redis: Redis, redis_url: str) -> None:
    async with running(echo([]), fast_settings(redis_url, consumer="c-1")):
        raw = await eventually(
            lambda: redis.hget(naming.heartbeat_key(), "echo/c-1"), lambda value: value is not None, what="a beat"
        )
        assert raw is not None
        beat = orjson.loads(raw)
    assert beat["participant"] == "echo"
    assert beat["consumer"] == "c-1"
    assert [sub["type"] for sub in beat["subscriptions"]] == ["OrderSubmitted", "Ping"]
    assert await redis.hget(naming.heartbeat_key(), "echo/c-1") is None


async def test_original_fields_are_kept_in_the_dead_letter(redis: Redis, redis_url: str) -> None:
    strict = Participant("strict")

    @strict.on("Ping")
    async def ping(msg: Message) -> None:
        raise Reject("no")

    incoming = envelope("Ping")
    async with running(strict, fast_settings(redis_url)):
        await publish(redis, incoming)
        [dead] = await eventually(lambda: dead_letters(redis), lambda found: len(found) == 1, what="a dead letter")
    assert original_type(dead) == "Ping"
    assert dead["f:correlation_id"] == incoming.correlation_id
