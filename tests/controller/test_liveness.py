"""Participant liveness: heartbeats, subscriptions, lag and uncovered steps.

Real SDK runners in-process (heartbeat every 0.1 s), the API over a real socket,
real Redis — the tests' server, and the bundled Redis 6.2 where lag is counted
without XINFO's ``lag``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from contracts import naming
from contracts.definitions import CompensationDefinition, StepDefinition, WorkflowDefinition
from controller import liveness
from controller.embedded_redis import EmbeddedRedis, bundled_server
from controller.liveness import ConsumerView, Lag, ParticipantView, SubscriptionView, Uncovered
from participants.sdk import Message, Participant, Runner
from participants.sdk.connection import connect
from participants.workers import WORKER_NAMES, WorkerSettings, build
from tests.conftest import definitions_file, eventually
from tests.controller import test_api
from tests.controller.test_api import Api, ApiFactory, settings
from tests.participants.helpers import PARTITIONS, envelope, fast_settings, publish, running

serve = test_api.serve  # the fixture that serves the app over a real socket

GREETING = WorkflowDefinition(
    name="greeting",
    start="GreetingRequested",
    steps=(
        StepDefinition(
            name="greet",
            participant="greeter",
            trigger="GreetingRequested",
            completed="Greeted",
            compensation=CompensationDefinition(command="Ungreet", completed="Ungreeted"),
        ),
    ),
)
ORDER_NEEDS = {
    ("payment", "OrderSubmitted"),
    ("payment", "RefundPayment"),
    ("inventory", "PaymentCaptured"),
    ("inventory", "ReleaseInventory"),
    ("shipping", "InventoryReserved"),
    ("shipping", "CancelShipment"),
    ("notification", "ShipmentScheduled"),
}
GREETING_NEEDS = {("greet", "GreetingRequested"), ("greet", "Ungreet")}


def greeter() -> Participant:
    p = Participant("greeter")

    @p.on("GreetingRequested")
    async def greet(msg: Message) -> None:
        return None

    @p.compensates("Ungreet")
    async def ungreet(msg: Message) -> None:
        return None

    return p


def gated_echo(gate: asyncio.Event) -> Participant:
    """Handles Ping (a type no definition names, so the controller never reads it) once ``gate`` opens."""
    p = Participant("echo")

    @p.on("Ping")
    async def ping(msg: Message) -> None:
        await gate.wait()

    return p


async def start(serve: ApiFactory, redis_url: str, tmp_path: Path, **changes: Any) -> Api:
    """The controller with the order and greeting definitions, ready."""
    path = definitions_file(tmp_path / "definitions.json", GREETING)
    client = await serve(settings(redis_url, definitions_path=path, **changes))
    await eventually(lambda: client.call("GET", "/readyz"), lambda r: r.status == 200, what="readiness")
    return client


async def listing(api: Api) -> dict[str, Any]:
    reply = await api.call("GET", "/v1/participants")
    assert reply.status == 200, reply.body
    assert reply.content_type == "application/json"
    body: dict[str, Any] = reply.body
    return body


def named(body: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((view for view in body["participants"] if view["name"] == name), None)


def subscription(body: dict[str, Any], participant: str, message_type: str) -> dict[str, Any] | None:
    view = named(body, participant)
    if view is None:
        return None
    return next((sub for sub in view["subscriptions"] if sub["type"] == message_type), None)


def ping_lag(body: dict[str, Any]) -> dict[str, Any]:
    """The lag members of the echo participant's Ping subscription ({} while it is not listed)."""
    sub = subscription(body, "echo", "Ping") or {}
    return {name: sub[name] for name in ("lag", "undelivered", "pending", "exact") if name in sub}


def uncovered(body: dict[str, Any], workflow: str = "greeting") -> set[tuple[str, str]]:
    return {(u["step"], u["type"]) for u in body["uncovered"] if u["workflow"] == workflow}


# --- GET /v1/participants -------------------------------------------------------------


async def test_a_running_worker_is_listed_live_with_its_consumer_and_subscriptions(
    serve: ApiFactory, redis_url: str, tmp_path: Path
) -> None:
    api = await start(serve, redis_url, tmp_path)
    async with running(greeter(), fast_settings(redis_url, consumer="w-1")):
        body = await eventually(lambda: listing(api), lambda b: named(b, "greeter") is not None, what="the greeter")

    view = named(body, "greeter")
    assert view is not None
    assert (view["group"], view["live"], view["lag"]) == ("greeter", True, 0)
    [consumer] = view["consumers"]
    assert consumer["name"] == "w-1"
    assert consumer["live"] is True
    assert (consumer["host"], consumer["pid"]) == (socket.gethostname(), os.getpid())
    assert consumer["interval_ms"] == 100
    assert 0 <= consumer["age_ms"] <= 300
    assert consumer["partitions"] == PARTITIONS
    assert consumer["last_beat_at"] >= consumer["started_at"]
    assert {"handled", "failed", "dead_lettered", "in_flight"} <= set(consumer["stats"])
    no_lag = {"live": True, "lag": 0, "undelivered": 0, "pending": 0, "exact": True}
    assert view["subscriptions"] == [
        {"type": "GreetingRequested", "compensation": False, **no_lag},
        {"type": "Ungreet", "compensation": True, **no_lag},
    ]
    assert uncovered(body) == set()
    assert uncovered(body, "order") == ORDER_NEEDS  # no order worker runs


async def test_lag_counts_undelivered_then_pending_entries_and_drops_to_zero_when_the_worker_catches_up(
    serve: ApiFactory, redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    api = await start(serve, redis_url, tmp_path)
    gate = asyncio.Event()
    stop = asyncio.Event()
    async with Runner(gated_echo(gate), fast_settings(redis_url)) as runner:  # groups and heartbeat, not reading yet
        for n in range(3):
            await publish(redis, envelope("Ping", {"n": n}, correlation_id=f"wf-{n}"))

        body = await eventually(lambda: listing(api), lambda b: ping_lag(b).get("lag") == 3, what="lag 3")
        assert ping_lag(body) == {"lag": 3, "undelivered": 3, "pending": 0, "exact": True}
        echo = named(body, "echo")
        assert echo is not None
        assert (echo["live"], echo["lag"], echo["undelivered"], echo["pending"]) == (True, 3, 3, 0)

        reading = asyncio.create_task(runner.run(stop))
        try:
            body = await eventually(lambda: listing(api), lambda b: ping_lag(b).get("pending") == 3, what="3 pending")
            assert ping_lag(body) == {"lag": 3, "undelivered": 0, "pending": 3, "exact": True}

            gate.set()
            await eventually(lambda: listing(api), lambda b: ping_lag(b).get("lag") == 0, what="lag 0")
        finally:
            gate.set()
            stop.set()
            await reading


async def test_a_worker_that_stops_disappears_and_its_steps_become_uncovered(
    serve: ApiFactory, redis_url: str, tmp_path: Path
) -> None:
    api = await start(serve, redis_url, tmp_path)
    async with running(greeter(), fast_settings(redis_url)):
        await eventually(lambda: listing(api), lambda b: uncovered(b) == set(), what="the greeter covering its step")

    await eventually(lambda: listing(api), lambda b: named(b, "greeter") is None, what="the greeter gone")
    started = await api.call("POST", "/v1/workflows/greeting", json={"to": "nobody"})  # its trigger waits
    assert started.status == 202, started.body
    body = await listing(api)

    assert uncovered(body) == GREETING_NEEDS
    [trigger] = [u for u in body["uncovered"] if u["type"] == "GreetingRequested"]
    assert trigger == {
        "workflow": "greeting",
        "version": 1,
        "step": "greet",
        "participant": "greeter",
        "type": "GreetingRequested",
        "role": "trigger",
        "lag": 1,  # what waits for the worker nobody runs
        "undelivered": 1,
        "pending": 0,
        "exact": True,
    }


async def test_a_worker_that_dies_without_stopping_is_shown_not_live_after_three_intervals_then_forgotten(
    serve: ApiFactory, redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    api = await start(serve, redis_url, tmp_path, liveness_forget_s=2.0)
    beat_field = "greeter/w-dead"
    async with running(greeter(), fast_settings(redis_url, consumer="w-dead")):
        last_beat = await eventually(
            lambda: redis.hget(naming.heartbeat_key(), beat_field), lambda raw: raw is not None, what="a beat"
        )
    assert last_beat is not None
    await redis.hset(naming.heartbeat_key(), beat_field, last_beat)  # what a killed worker leaves behind

    body = await eventually(
        lambda: listing(api),
        lambda b: (view := named(b, "greeter")) is not None and not view["live"],
        what="the greeter not live",
    )
    view = named(body, "greeter")
    assert view is not None
    [consumer] = view["consumers"]
    assert (consumer["name"], consumer["live"]) == ("w-dead", False)
    assert consumer["age_ms"] > 3 * consumer["interval_ms"]
    assert [sub["live"] for sub in view["subscriptions"]] == [False, False]
    assert uncovered(body) == GREETING_NEEDS

    await eventually(lambda: listing(api), lambda b: named(b, "greeter") is None, what="the beat forgotten")
    assert await redis.hget(naming.heartbeat_key(), beat_field) is None


async def test_the_controller_group_lag_is_reported_per_type_it_reads(
    serve: ApiFactory, redis_url: str, tmp_path: Path
) -> None:
    api = await start(serve, redis_url, tmp_path)

    body = await listing(api)

    controller = body["controller"]
    assert (controller["group"], controller["lag"], controller["exact"]) == ("controller", 0, True)
    types = {entry["type"] for entry in controller["types"]}
    assert {"PaymentCaptured", "Greeted", "TimerFired"} <= types
    assert "Ping" not in types


# --- lag on either server --------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_6_2_url() -> Iterator[str]:
    binary = bundled_server()
    if binary is None:
        pytest.skip("no bundled redis-server")
    with EmbeddedRedis(binary=binary) as server:
        yield server.url


@pytest.fixture(params=["tests' server", "bundled 6.2"])
async def any_redis(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[Redis]:
    url = redis_url if request.param == "tests' server" else request.getfixturevalue("redis_6_2_url")
    client = connect(url, name="liveness-tests")
    await client.flushdb()
    try:
        yield client
    finally:
        await client.aclose()


async def test_lag_is_exact_whether_or_not_redis_reports_it(any_redis: Redis) -> None:
    """Redis 6.2 has no XINFO ``lag``; Redis 7 has none after an XDEL inside the undelivered range."""
    stream = naming.message_stream(1, "Ping")
    ids = [await any_redis.xadd(stream, {"n": str(n)}) for n in range(6)]
    await any_redis.xgroup_create(stream, "echo", id="0")
    await any_redis.xgroup_create(stream, naming.CONTROLLER_GROUP, id="0")
    await any_redis.xreadgroup("echo", "c-1", {stream: ">"}, count=2)  # 2 pending
    await any_redis.xdel(stream, ids[4])  # 3 undelivered left
    beat = {"participant": "echo", "consumer": "c-1", "at_ms": 1_000, "subscriptions": [{"type": "Ping"}]}
    await any_redis.hset(naming.heartbeat_key(), "echo/c-1", orjson.dumps(beat))

    found = await liveness.survey(any_redis, PARTITIONS, ["Ping", "Pong"], now_ms=1_050)

    [echo] = found.participants
    assert echo.live
    assert echo.subscriptions == (SubscriptionView("Ping", False, True, Lag(undelivered=3, pending=2)),)
    assert found.controller.types == {"Ping": Lag(undelivered=5), "Pong": Lag()}  # no Pong stream yet
    assert found.controller.lag.total == 5


async def test_a_lag_redis_miscounts_after_replaying_its_aof_is_counted_again(any_redis: Redis) -> None:
    """After a restart that replayed the AOF, Redis 7 forgets how many entries a group read
    (entries-read) and reports every entry as undelivered, though it delivered them all."""
    stream = naming.message_stream(1, "Ping")
    for n in range(6):
        await any_redis.xadd(stream, {"n": str(n)})
    await any_redis.xgroup_create(stream, naming.CONTROLLER_GROUP, id="0")
    await any_redis.xreadgroup(naming.CONTROLLER_GROUP, "c-1", {stream: ">"})
    try:  # what the replay leaves: the group at the last entry, having read none (Redis 7)
        await any_redis.xgroup_setid(stream, naming.CONTROLLER_GROUP, "$", entries_read=0)
    except ResponseError:  # Redis 6.2 keeps no such count
        await any_redis.xgroup_setid(stream, naming.CONTROLLER_GROUP, "$")

    found = await liveness.survey(any_redis, PARTITIONS, ["Ping"])

    assert found.controller.types["Ping"].undelivered == 0


async def test_a_malformed_heartbeat_is_skipped_and_a_beat_without_an_interval_uses_the_sdk_default(
    redis: Redis,
) -> None:
    await redis.hset(naming.heartbeat_key(), "junk/1", b"{not json")
    beat = {"participant": "old", "consumer": "c", "at_ms": 100_000}
    await redis.hset(naming.heartbeat_key(), "old/c", orjson.dumps(beat))

    assert [v.name for v in await liveness.participants(redis, PARTITIONS, now_ms=100_000 + 15_000)] == ["old"]
    [fresh] = await liveness.participants(redis, PARTITIONS, now_ms=100_000 + 15_000)
    [stale] = await liveness.participants(redis, PARTITIONS, now_ms=100_000 + 15_001)
    [custom] = await liveness.participants(redis, PARTITIONS, now_ms=100_000 + 15_001, stale_after_s=20)
    assert (fresh.live, stale.live, custom.live) == (True, False, True)


# --- uncovered steps -------------------------------------------------------------------


def view(name: str, *types: str, live: bool = True) -> ParticipantView:
    consumer = ConsumerView(name="c", live=live, age_ms=0, last_beat_ms=0, interval_ms=100)
    subs = tuple(SubscriptionView(t, False, live, Lag()) for t in types)
    return ParticipantView(name, name, (consumer,), subs)


def test_a_step_is_covered_only_by_a_live_consumer_of_its_own_participant() -> None:
    views = [view("greeter", "GreetingRequested"), view("other", "Ungreet"), view("ghost", live=False)]

    missing = liveness.uncovered_steps([GREETING], views)

    assert [(m.step.name, m.message_type, m.role) for m in missing] == [("greet", "Ungreet", "compensation")]
    assert liveness.uncovered_steps([GREETING], [view("greeter", "GreetingRequested", "Ungreet", live=False)]) == [
        Uncovered(GREETING, GREETING.steps[0], "GreetingRequested"),
        Uncovered(GREETING, GREETING.steps[0], "Ungreet"),
    ]


def test_an_orchestrated_step_needs_its_command_not_its_trigger() -> None:
    audited = WorkflowDefinition(
        name="audited",
        start="AuditRequested",
        steps=(
            StepDefinition(
                name="audit",
                participant="auditor",
                trigger="AuditRequested",
                completed="Audited",
                orchestrated=True,
                command="RunAudit",
            ),
        ),
    )

    assert liveness.uncovered_steps([audited], [view("auditor", "RunAudit")]) == []
    [missing] = liveness.uncovered_steps([audited], [view("auditor", "AuditRequested")])
    assert (missing.message_type, missing.role) == ("RunAudit", "command")


# --- the warning at start-up -----------------------------------------------------------


def warned(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "controller.app" and r.levelno == logging.WARNING]


def warned_steps(caplog: pytest.LogCaptureFixture) -> set[tuple[str, str]]:
    return {(str(r.args[0]), str(r.args[4])) for r in warned(caplog) if isinstance(r.args, tuple)}


async def test_with_no_workers_the_controller_warns_once_per_uncovered_step_after_the_grace_period(
    serve: ApiFactory, redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="controller.app")
    await start(serve, redis_url, tmp_path, liveness_grace_s=0.2)

    await eventually(lambda: _value(len(warned(caplog))), lambda n: n > 0, what="the warnings")

    # in the order saga each step is named after its participant
    assert warned_steps(caplog) == ORDER_NEEDS | GREETING_NEEDS
    assert len(warned(caplog)) == len(ORDER_NEEDS | GREETING_NEEDS)
    messages = {r.getMessage() for r in warned(caplog)}
    assert "step shipping of order v1: no live worker of shipping subscribes to InventoryReserved" in messages
    assert "step greet of greeting v1: no live worker of greeter subscribes to Ungreet" in messages


async def test_a_running_worker_silences_the_warnings_about_its_steps(
    serve: ApiFactory, redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="controller.app")
    async with running(greeter(), fast_settings(redis_url)):
        await start(serve, redis_url, tmp_path, liveness_grace_s=0.2)
        await eventually(lambda: _value(len(warned(caplog))), lambda n: n > 0, what="the warnings")

    assert warned_steps(caplog) == ORDER_NEEDS


async def test_with_every_worker_running_the_controller_warns_about_nothing(
    serve: ApiFactory, redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="controller.app")
    worker_settings = WorkerSettings(redis_url=redis_url, partitions=PARTITIONS)
    async with AsyncExitStack() as workers:
        for name in WORKER_NAMES:
            await workers.enter_async_context(running(build(name, worker_settings), fast_settings(redis_url)))
        await workers.enter_async_context(running(greeter(), fast_settings(redis_url)))
        await start(serve, redis_url, tmp_path, liveness_grace_s=0.2)

        await eventually(
            lambda: _value([r.getMessage() for r in caplog.records if r.name == "controller.app"]),
            lambda messages: any(m.startswith("every step has a live worker") for m in messages),
            what="the all-clear",
        )

    assert warned(caplog) == []


async def test_the_start_up_check_delays_neither_readiness_nor_shutdown(
    serve: ApiFactory, redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="controller.app")

    api = await start(serve, redis_url, tmp_path, liveness_grace_s=3_600)  # ready although the check waits

    assert (await api.call("GET", "/readyz")).status == 200
    assert warned(caplog) == []  # the fixture's teardown then cancels the waiting check


async def _value(value: Any) -> Any:
    return value
