"""Logs and traces: every log line says which workflow, step and attempt it is about, and a
client's ``traceparent`` reaches every message of its workflow, through the controller and
the workers."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, contextmanager
from typing import Any

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from contracts import naming
from contracts.envelope import Envelope, decode
from contracts.messages import TIMER_FIRED
from controller.definitions import Definitions
from controller.embedded_redis import free_port
from participants.sdk import Message, Participant, logs, tracing
from participants.sdk.logs import ContextFilter, JsonFormatter, TextFormatter, log_context
from participants.workers import WORKER_NAMES, WorkerSettings, build
from tests.conftest import eventually
from tests.controller import test_api
from tests.controller.test_api import ORDER, Api, ApiFactory, P, changed, settings
from tests.participants.helpers import envelope, fast_settings, publish, running

serve = test_api.serve  # the fixture that serves the app over a real socket

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"
handler_log = logging.getLogger("tests.handler")


def record(message: str = "hello %s", *args: object, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("tests.logs", logging.INFO, __file__, 1, message, args or ("world",), None)
    for name, value in extra.items():
        setattr(made, name, value)
    return made


@contextmanager
def json_lines(logger: logging.Logger) -> Iterator[list[dict[str, Any]]]:
    """What ``logger`` logs meanwhile, formatted as JSON lines and parsed."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    lines: list[dict[str, Any]] = []
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        lines += [orjson.loads(line) for line in stream.getvalue().splitlines()]


# --- the formatters ------------------------------------------------------------------


def test_a_text_line_ends_with_the_correlation_id_step_and_attempt_it_carries() -> None:
    line = TextFormatter().format(record(correlation_id="wf-1", step="payment", attempt=2, message_type="Ping"))

    assert line.endswith("INFO tests.logs: hello world [correlation_id=wf-1 step=payment attempt=2]")


def test_a_text_line_without_context_is_just_the_message() -> None:
    assert TextFormatter().format(record()).endswith("INFO tests.logs: hello world")


def test_a_json_line_is_one_object_with_the_context_the_trace_id_and_the_traceback() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        failed = record(correlation_id="wf-1", step="payment", attempt=2, traceparent=TRACEPARENT)
        failed.exc_info = sys.exc_info()

    line = JsonFormatter().format(failed)

    assert "\n" not in line
    parsed = orjson.loads(line)
    assert parsed.pop("ts").endswith("+00:00")
    assert parsed.pop("exc").endswith("RuntimeError: boom")
    assert parsed == {
        "level": "INFO",
        "logger": "tests.logs",
        "msg": "hello world",
        "correlation_id": "wf-1",
        "step": "payment",
        "attempt": 2,
        "traceparent": TRACEPARENT,
        "trace_id": TRACE_ID,
    }


def test_a_log_context_reaches_every_line_inside_it_and_extra_wins() -> None:
    with json_lines(handler_log) as lines:
        with log_context(correlation_id="wf-1", step="payment", attempt=1):
            handler_log.info("inside")
            with log_context(attempt=2):
                handler_log.info("nested")
            handler_log.info("own", extra={"correlation_id": "wf-2"})
        handler_log.info("outside")

    assert [(line["msg"], line.get("correlation_id"), line.get("attempt")) for line in lines] == [
        ("inside", "wf-1", 1),
        ("nested", "wf-1", 2),
        ("own", "wf-2", 1),
        ("outside", None, None),
    ]


def test_an_unknown_log_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log format 'xml'"):
        logs.formatter("xml")  # type: ignore[arg-type]


# --- traceparent ------------------------------------------------------------------------


def test_a_traceparent_parses_into_its_parts_and_an_invalid_one_is_ignored() -> None:
    parsed = tracing.TraceParent.parse(TRACEPARENT)
    assert parsed == tracing.TraceParent("00", TRACE_ID, "b7ad6b7169203331", "01")
    assert parsed.sampled
    assert str(parsed) == TRACEPARENT
    assert tracing.TraceParent.parse(f"01-{TRACE_ID}-b7ad6b7169203331-00-future") is not None
    for invalid in (
        None,
        "",
        "junk",
        f"ff-{TRACE_ID}-b7ad6b7169203331-01",  # version ff is invalid
        f"00-{'0' * 32}-b7ad6b7169203331-01",  # all-zero trace id
        f"00-{TRACE_ID}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE_ID.upper()}-b7ad6b7169203331-01",  # upper case
        f"00-{TRACE_ID}-b7ad6b7169203331-01-extra",  # version 00 has four fields
    ):
        assert tracing.TraceParent.parse(invalid) is None, invalid


def test_without_opentelemetry_a_span_is_a_plain_block() -> None:
    assert not tracing.enabled()  # the otel extra is not installed for the tests
    with tracing.span("payment OrderSubmitted", TRACEPARENT, {"streamsaga.correlation_id": "wf-1"}):
        ran = True
    assert ran


# --- in the processes ---------------------------------------------------------------------


async def test_a_handlers_own_log_lines_carry_the_workflow_step_attempt_and_traceparent(
    redis: Redis, redis_url: str
) -> None:
    done = asyncio.Event()
    p = Participant("refunder")

    @p.compensates("RefundPayment")
    async def refund(msg: Message) -> None:
        handler_log.info("refunding")  # no extra: the runner's context fills it in
        done.set()

    with json_lines(handler_log) as lines:
        async with running(p, fast_settings(redis_url)):
            command = envelope(
                "RefundPayment", {"step": "payment", "reason": "r"}, correlation_id="wf-9", traceparent=TRACEPARENT
            )
            await publish(redis, command)
            await asyncio.wait_for(done.wait(), 10)

    [line] = lines
    assert line["msg"] == "refunding"
    assert (line["correlation_id"], line["step"], line["attempt"]) == ("wf-9", "payment", 1)
    assert (line["message_type"], line["traceparent"], line["trace_id"]) == ("RefundPayment", TRACEPARENT, TRACE_ID)


@pytest.fixture
async def workers(redis_url: str) -> AsyncIterator[None]:
    """The four example workers, in-process."""
    async with AsyncExitStack() as stack:
        for name in WORKER_NAMES:
            participant = build(name, WorkerSettings(redis_url=redis_url, partitions=P))
            await stack.enter_async_context(running(participant, fast_settings(redis_url, consumer=name)))
        yield


async def workflow_messages(redis: Redis, workflow_id: str) -> list[Envelope]:
    """Every message of ``workflow_id`` on the message streams of its partition."""
    p = naming.partition_of(workflow_id, P)
    types = sorted(Definitions().all_types() | {TIMER_FIRED})
    async with redis.pipeline(transaction=False) as pipe:
        for message_type in types:
            pipe.xrange(naming.message_stream(p, message_type))
        rows = await pipe.execute()
    messages = [decode(fields) for entries in rows for _, fields in entries]
    return [message for message in messages if message.correlation_id == workflow_id]


async def test_a_clients_traceparent_reaches_every_message_of_its_workflow_through_controller_and_workers(
    serve: ApiFactory, redis_url: str, redis: Redis, workers: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="controller.correlator")
    caplog.handler.addFilter(ContextFilter())
    api: Api = await serve(settings(redis_url))
    await eventually(lambda: api.call("GET", "/readyz"), lambda r: r.status == 200, what="readiness")
    # shipping fails for Japan: the controller commands two compensations, the workers answer
    order = changed("ship_to.country", "JP")
    workflow_id = await api.start_order(order, headers={"traceparent": TRACEPARENT})
    await api.until_status(workflow_id, "compensated")

    messages = await workflow_messages(redis, workflow_id)

    assert {m.type for m in messages} >= {
        "OrderSubmitted",
        "PaymentCaptured",
        "InventoryReserved",
        "ShipmentFailed",
        "ReleaseInventory",
        "InventoryReleased",
        "RefundPayment",
        "PaymentRefunded",
    }
    assert {m.producer for m in messages} == {"controller", "payment", "inventory", "shipping"}
    for message in messages:
        parsed = tracing.TraceParent.parse(message.traceparent)
        assert parsed is not None, message
        assert parsed.trace_id == TRACE_ID, message
    # the controller's log says what happened, in the workflow's trace
    changes = [r for r in caplog.records if r.name == "controller.correlator" and " -> " in r.getMessage()]
    assert [r.getMessage().split(": ")[1].split(" on ")[0] for r in changes] == [
        "running -> compensating",
        "compensating -> compensated",
    ]
    for change in changes:
        assert getattr(change, "correlation_id", None) == workflow_id
        assert getattr(change, "traceparent", None) == TRACEPARENT
    assert getattr(changes[0], "step", None) == "shipping"


async def test_the_controller_process_logs_json_lines_with_the_correlation_id(redis: Redis, redis_url: str) -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "controller", "--log-format", "json", "controller"],
        *["--redis-url", redis_url, "--port", str(port), "--partitions", str(P), "--consumer", "json-logs"],
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stderr is not None
    lines: list[bytes] = []

    async def collect() -> None:
        assert process.stderr is not None
        async for line in process.stderr:
            lines.append(line)

    collector = asyncio.create_task(collect())
    try:
        async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}") as session:

            async def ready() -> int:
                try:
                    async with session.get("/readyz") as response:
                        return response.status
                except aiohttp.ClientConnectionError:
                    return 0

            await eventually(ready, lambda status: status == 200, what="the controller to be ready")
            headers = {"traceparent": TRACEPARENT}
            async with session.post("/v1/orders", json=ORDER, headers=headers) as response:
                assert response.status == 202
                workflow_id = (await response.json())["workflow_id"]

            async def logged() -> list[dict[str, Any]]:
                return [orjson.loads(line) for line in list(lines) if line.strip()]

            found = await eventually(
                logged,
                lambda parsed: any(line.get("correlation_id") == workflow_id for line in parsed),
                what="a log line of the workflow",
            )
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 30)
        await collector

    assert process.returncode == 0
    for line in found:
        assert {"ts", "level", "logger", "msg"} <= line.keys(), line
    [started] = [line for line in found if line.get("correlation_id") == workflow_id]
    assert started["logger"] == "controller.api"
    assert started["msg"] == f"started order workflow {workflow_id}"
    assert started["level"] == "INFO"
    assert (started["traceparent"], started["trace_id"]) == (TRACEPARENT, TRACE_ID)


def test_an_outage_is_logged_when_it_starts_now_and_then_while_it_lasts_and_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    outage = logs.Outage(logging.getLogger("outage-test"), "timer poll", every_s=30.0, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="outage-test")
    outage.recovered()  # nothing failed: nothing to say
    for _ in range(40):  # twice a second for 20 s
        outage.failed(ConnectionError("Connection refused"))
        now[0] += 0.5
    assert outage.failing
    assert [r.getMessage() for r in caplog.records] == ["timer poll failed: ConnectionError: Connection refused"]
    for _ in range(40):  # 20 s more: one reminder, at 30 s
        outage.failed(TimeoutError())
        now[0] += 0.5
    outage.recovered()  # half a second after a failure: not over yet
    assert outage.failing
    now[0] += 0.5
    outage.recovered()  # a second without one: over
    outage.recovered()
    assert [(r.levelname, r.getMessage()) for r in caplog.records[1:]] == [
        ("WARNING", "timer poll still failing after 30s (61 failures): TimeoutError"),
        ("INFO", "timer poll works again after 40.5s (80 failures)"),
    ]
    assert not outage.failing


def test_an_outage_that_flaps_is_one_outage_until_it_has_held_for_a_second(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    outage = logs.Outage(logging.getLogger("flap-test"), "the API's Redis writes", every_s=30.0, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="flap-test")
    for _ in range(100):  # a Redis at its memory limit: every other write refused, for 50 s
        outage.failed(OSError("OOM"))
        now[0] += 0.25
        outage.recovered()
        now[0] += 0.25
    now[0] += 1.0
    outage.recovered()
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "the API's Redis writes failed: OSError: OOM"),
        ("WARNING", "the API's Redis writes still failing after 30s (61 failures): OSError: OOM"),
        ("INFO", "the API's Redis writes works again after 51.0s (100 failures)"),
    ]
