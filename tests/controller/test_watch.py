"""``streamsaga watch``: the Server-Sent Events client on literal streams, then the
command against a real controller (in the test's process, and as real processes)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis
from rich.console import Console, RenderableType
from rich.text import Text

from contracts.definitions import CompensationDefinition, RetryPolicy, StepDefinition, WorkflowDefinition
from contracts.envelope import WorkflowRef
from controller import terminal, watch
from controller.app import create_app
from controller.cli import main
from controller.embedded_redis import free_port
from controller.event_source import EventSource, EventSourceError, EventStreamParser, ServerSentEvent
from controller.exit_status import ExitCode
from controller.instance import StepState, StepStatus, WorkflowStatus
from tests.conftest import eventually
from tests.controller.test_api import Api, settings
from tests.controller.test_cli import cli
from tests.e2e.deployment import Deployment, order

# --- the parser, on literal streams ----------------------------------------------------


def parse(*chunks: bytes) -> list[ServerSentEvent]:
    parser = EventStreamParser()
    return [event for chunk in chunks for event in parser.feed(chunk)]


def bytewise(stream: bytes) -> list[ServerSentEvent]:
    return parse(*(stream[i : i + 1] for i in range(len(stream))))


def test_data_lines_join_with_newlines_and_a_blank_line_dispatches() -> None:
    stream = b"data: first\ndata: second\ndata:\ndata:third\n\ndata: next\n\n"

    assert parse(stream) == [
        ServerSentEvent(data="first\nsecond\n\nthird"),
        ServerSentEvent(data="next"),
    ]


def test_comments_are_ignored_and_a_block_of_only_comments_dispatches_nothing() -> None:
    stream = b": keep-alive\n\n:another\ndata: x\n: in the middle\ndata: y\n\n"

    assert parse(stream) == [ServerSentEvent(data="x\ny")]


def test_the_event_type_names_one_event_and_defaults_to_message() -> None:
    stream = b"event: PaymentCaptured\ndata: {}\n\ndata: plain\n\n"

    assert [(e.event, e.data) for e in parse(stream)] == [("PaymentCaptured", "{}"), ("message", "plain")]


def test_the_last_event_id_persists_until_changed_an_empty_id_clears_it_and_nul_is_ignored() -> None:
    stream = b"id: 1\ndata: a\n\ndata: b\n\nid: 2\x00x\ndata: c\n\nid\ndata: d\n\nid: 7\ndata: e\n\n"

    assert [(e.id, e.data) for e in parse(stream)] == [("1", "a"), ("1", "b"), ("1", "c"), ("", "d"), ("7", "e")]


def test_an_id_without_data_sets_the_id_for_the_next_event_but_dispatches_nothing() -> None:
    parser = EventStreamParser(last_event_id="5")

    assert parser.feed(b"id: 9\nevent: ignored\n\n") == []
    assert parser.last_event_id == "9"
    assert parser.feed(b"data: x\n\n") == [ServerSentEvent(data="x", id="9")]


def test_one_space_after_the_colon_is_dropped_a_line_without_colon_is_a_field_with_no_value() -> None:
    stream = b"data:  two spaces\ndata\nunknown: field\nevent\ndata:tab\tkept\n\n"

    assert parse(stream) == [ServerSentEvent(data=" two spaces\n\ntab\tkept")]


def test_crlf_cr_and_lf_all_end_lines() -> None:
    stream = b"event: a\r\ndata: 1\r\n\r\ndata: 2\r\rdata: 3\n\n"

    assert [(e.event, e.data) for e in parse(stream)] == [("a", "1"), ("message", "2"), ("message", "3")]


@pytest.mark.parametrize(
    "stream",
    [
        b"id: 3\r\nevent: x\r\ndata: caf\xc3\xa9 \xe2\x9c\x93\r\n\r\ndata: two\r\r",
        b"\xef\xbb\xbfdata: after a byte order mark\n\n: c\nid: 4\ndata: z\n\n",
    ],
)
def test_chunks_split_anywhere_parse_like_the_whole_stream(stream: bytes) -> None:
    whole = parse(stream)

    assert whole
    assert bytewise(stream) == whole
    for cut in range(1, len(stream)):
        assert parse(stream[:cut], stream[cut:]) == whole, cut


def test_a_byte_order_mark_is_dropped_once_at_the_start() -> None:
    assert parse(b"\xef\xbb\xbfdata: x\n\n") == [ServerSentEvent(data="x")]


def test_retry_sets_the_reconnection_delay_and_other_values_are_ignored() -> None:
    parser = EventStreamParser()
    parser.feed(b"retry: 2500\n\n")
    assert parser.retry_ms == 2500
    parser.feed(b"retry: soon\nretry: 1.5\n\n")
    assert parser.retry_ms == 2500


def test_an_unfinished_event_at_the_end_of_the_stream_is_not_dispatched() -> None:
    assert parse(b"data: complete\n\ndata: cut off\n") == [ServerSentEvent(data="complete")]


def test_json_data_is_parsed_on_demand() -> None:
    [event] = parse(b'event: end\ndata: {"workflow_id": "w",\ndata:  "status": "completed"}\n\n')

    assert event.json() == {"workflow_id": "w", "status": "completed"}


# --- reconnecting, over a real socket ---------------------------------------------------


@dataclass
class Script:
    """A server that answers the n-th connection with the n-th literal stream; ``None`` (and
    any connection after the last stream) is dropped without an answer.  It records the
    Last-Event-ID of every request."""

    streams: list[bytes | None]
    last_event_ids: list[str | None] = field(default_factory=list)
    cut: bool = False  # drop each connection after its stream instead of ending it cleanly

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.last_event_ids.append(request.headers.get("Last-Event-ID"))
        stream = self.streams.pop(0) if self.streams else None
        if stream is None:
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(stream)
        if self.cut:
            assert request.transport is not None
            request.transport.close()
        return response


Serve = Callable[[Script], Awaitable[str]]


@pytest.fixture
async def scripted() -> AsyncIterator[Serve]:
    servers: list[TestServer] = []

    async def serve(script: Script) -> str:
        app = web.Application()
        app.router.add_get("/stream", script.handle)
        app.router.add_get("/refused", _refuse)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("/stream"))

    try:
        yield serve
    finally:
        for server in servers:
            await server.close()


async def _refuse(request: web.Request) -> web.Response:
    return web.json_response(
        {"title": "Workflow not found", "detail": "no workflow 'x'"},
        status=404,
        content_type="application/problem+json",
    )


async def take(source: EventSource, count: int) -> list[ServerSentEvent]:
    taken: list[ServerSentEvent] = []
    events = source.events()
    async with contextlib.aclosing(events):
        async for event in events:
            taken.append(event)
            if len(taken) == count:
                break
    return taken


@pytest.mark.parametrize("cut", [False, True], ids=["server closes", "connection drops"])
async def test_the_client_reconnects_with_the_last_event_id_and_goes_on(scripted: Serve, cut: bool) -> None:
    script = Script(
        [
            b"retry: 1\nid: 1\ndata: one\n\nid: 2\ndata: two\n\ndata: never finished",
            None,  # the next try fails outright
            b"id: 3\ndata: three\n\n",
        ],
        cut=cut,
    )
    url = await scripted(script)

    async with aiohttp.ClientSession() as session:
        events = await take(EventSource(session, url), 3)

    assert [(e.id, e.data) for e in events] == [("1", "one"), ("2", "two"), ("3", "three")]
    assert script.last_event_ids == [None, "2", "2"]


async def test_a_resume_point_set_by_the_caller_is_sent_on_reconnecting(scripted: Serve) -> None:
    script = Script([b'retry: 1\nid: c-1\nevent: overflow\ndata: {"last_event_id": "c-0"}\n\n', b"data: after\n\n"])
    url = await scripted(script)

    async with aiohttp.ClientSession() as session:
        source = EventSource(session, url, last_event_id="start")
        events = source.events()
        async with contextlib.aclosing(events):
            first = await anext(events)
            source.last_event_id = first.json()["last_event_id"]
            second = await anext(events)

    assert (first.event, second.data) == ("overflow", "after")
    assert script.last_event_ids == ["start", "c-0"]


async def test_a_refused_stream_raises_with_the_problems_detail(scripted: Serve) -> None:
    url = (await scripted(Script([]))).replace("/stream", "/refused")

    async with aiohttp.ClientSession() as session:
        with pytest.raises(EventSourceError) as raised:
            await take(EventSource(session, url), 1)

    assert raised.value.status == 404
    assert "no workflow 'x'" in str(raised.value)


async def test_a_server_that_cannot_be_reached_at_first_raises_at_once() -> None:
    url = f"http://127.0.0.1:{free_port()}/stream"

    async with aiohttp.ClientSession() as session:
        with pytest.raises(EventSourceError, match="cannot connect"):
            await take(EventSource(session, url), 1)


async def test_a_server_gone_for_good_raises_after_max_failures(scripted: Serve) -> None:
    script = Script([b"retry: 1\nid: 1\ndata: one\n\n"])  # then every connection is dropped
    url = await scripted(script)

    async with aiohttp.ClientSession() as session:
        with pytest.raises(EventSourceError, match=r"cannot reconnect \(3 tries\)"):
            await take(EventSource(session, url, max_failures=3), 2)
    assert script.last_event_ids[0] is None
    assert set(script.last_event_ids[1:]) == {"1"}


# --- watch ID against a real controller --------------------------------------------------


@dataclass
class Controller:
    """The app on a real socket and a real Redis; ``api`` drives workflows like participants would."""

    api: Api
    url: str


# A saga whose one compensation is tried once: a failed undo needs attention at once.
CHARGE = WorkflowDefinition(
    name="charge",
    start="ChargeRequested",
    steps=(
        StepDefinition(
            name="charge",
            participant="biller",
            trigger="ChargeRequested",
            completed="Charged",
            compensation=CompensationDefinition(
                command="Uncharge", completed="Uncharged", failed=("UnchargeFailed",), retry=RetryPolicy(max_attempts=1)
            ),
        ),
        StepDefinition(
            name="ship", participant="shipper", trigger="Charged", completed="Shipped", failed=("ShipFailed",)
        ),
    ),
)


@pytest.fixture
async def controller(redis: Redis, redis_url: str, tmp_path: Path) -> AsyncIterator[Controller]:
    definitions = tmp_path / "definitions.json"
    definitions.write_bytes(orjson.dumps([CHARGE.model_dump(mode="json")]))
    server = TestServer(create_app(settings(redis_url, definitions_path=definitions)), host="127.0.0.1")
    await server.start_server()
    url = str(server.make_url("")).rstrip("/")
    try:
        async with aiohttp.ClientSession(base_url=url) as session:
            api = Api(session, redis)
            await eventually(lambda: api.call("GET", "/readyz"), lambda r: r.status == 200, what="readiness")
            yield Controller(api, url)
    finally:
        await server.close()


def console(*, terminal: bool = False) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=terminal, width=200, height=50), out


async def printed(out: io.StringIO, text: str) -> str:
    async def probe() -> str:
        return out.getvalue()

    return await eventually(probe, lambda value: text in value, what=f"{text!r} on the output")


@contextlib.asynccontextmanager
async def watching(
    controller: Controller, workflow_id: str, shown: Console, **options: Any
) -> AsyncIterator[asyncio.Task[ExitCode]]:
    """``watch ID`` running in the background, ended if the test leaves it."""
    async with watch.client_session() as session:
        task = asyncio.create_task(
            watch.watch_workflow(watch.ApiClient(session, controller.url), workflow_id, shown, **options)
        )
        try:
            yield task
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_watch_prints_a_line_per_event_until_completed_and_exits_0(controller: Controller) -> None:
    workflow_id = await controller.api.start_order()
    shown, out = console()

    async with watching(controller, workflow_id, shown) as task:
        await printed(out, "OrderSubmitted")  # the replay of what happened before watch began
        await controller.api.complete_order(workflow_id)
        code = await task

    assert code == ExitCode.COMPLETED
    heading, *lines, outcome = out.getvalue().splitlines()
    assert heading.startswith(f"workflow {workflow_id} (order v1): running")
    assert [line.split()[2] for line in lines] == [
        "OrderSubmitted",
        "PaymentCaptured",
        "InventoryReserved",
        "ShipmentScheduled",
        "CustomerNotified",
    ]
    assert re.search(r"out OrderSubmitted\s+payment\s+running\s+workflow running\s+deadline \d\d:\d\d:\d\d", lines[0])
    assert re.search(r"in\s+PaymentCaptured\s+payment\s+completed\s+workflow running\s+took \d", lines[1])
    assert "workflow completed" in lines[-1]
    assert re.fullmatch(rf"workflow {workflow_id} completed after \S+ \(exit 0\)", outcome)


async def test_watch_of_a_compensated_workflow_shows_the_compensation_and_exits_3(controller: Controller) -> None:
    api = controller.api
    workflow_id = await api.start_order()
    order = (await api.workflow(workflow_id))["input"]["order"]
    shown, out = console()

    async with watching(controller, workflow_id, shown) as task:
        await api.emit(workflow_id, "PaymentCaptured", {"order": order, "payment_id": "pay-1", "amount": "33.00"})
        await api.emit(workflow_id, "InventoryUnavailable", {"reason": "out of MUG-1", "skus": ["MUG-1"]})
        await printed(out, "RefundPayment")
        await api.emit(workflow_id, "PaymentRefunded", {"step": "payment", "detail": "refunded"})
        code = await task

    assert code == ExitCode.COMPENSATED
    text = out.getvalue()
    assert re.search(r"in\s+InventoryUnavailable\s+inventory\s+failed\s+workflow compensating", text)
    assert re.search(r"out RefundPayment\s+payment\s+compensating\s+workflow compensating\s+deadline", text)
    assert re.search(r"in\s+PaymentRefunded\s+payment\s+compensated\s+workflow compensated\s+compensated in \d", text)
    assert text.splitlines()[-1].endswith("(exit 3)")


async def test_watch_of_a_finished_workflow_replays_it_and_exits_with_its_outcome(controller: Controller) -> None:
    workflow_id = await controller.api.start_order()
    await controller.api.emit(workflow_id, "PaymentDeclined", {"reason": "over the limit"})
    await controller.api.until_status(workflow_id, "failed")
    shown, out = console()

    async with watching(controller, workflow_id, shown) as task:
        code = await task

    assert code == ExitCode.FAILED
    assert "PaymentDeclined" in out.getvalue()
    assert "failed after" in out.getvalue().splitlines()[-1]


async def compensating_charge(controller: Controller) -> str:
    """A ``charge`` workflow compensating its one step (whose undo is tried once)."""
    reply = await controller.api.call("POST", "/v1/workflows/charge", json={"amount": 5})
    assert reply.status == 202, reply.body
    workflow_id: str = reply.body["workflow_id"]
    await controller.api.emit(workflow_id, "Charged", {}, workflow="charge")
    await controller.api.emit(workflow_id, "ShipFailed", {"reason": "no truck"}, workflow="charge")
    await controller.api.until_status(workflow_id, "compensating")
    return workflow_id


async def test_watch_stops_at_needs_attention_with_exit_5(controller: Controller) -> None:
    shown, out = console()
    workflow_id = await compensating_charge(controller)

    async with watching(controller, workflow_id, shown) as task:
        await printed(out, "Uncharge ")
        await controller.api.emit(workflow_id, "UnchargeFailed", {"reason": "card closed"}, workflow="charge")
        code = await task

    assert code == ExitCode.NEEDS_ATTENTION
    assert re.search(r"UnchargeFailed\s+charge\s+\S+\s+workflow needs_attention", out.getvalue())
    assert out.getvalue().splitlines()[-1].endswith("(exit 5)")


async def test_watch_until_terminal_waits_through_an_operators_retry(controller: Controller) -> None:
    shown, out = console()
    workflow_id = await compensating_charge(controller)

    async with watching(controller, workflow_id, shown, until_terminal=True) as task:
        await printed(out, "Uncharge ")
        await controller.api.emit(workflow_id, "UnchargeFailed", {"reason": "card closed"}, workflow="charge")
        await printed(out, "workflow needs_attention")
        retried = await controller.api.call("POST", f"/v1/workflows/{workflow_id}/retry", json={"by": "tests"})
        assert retried.status == 202, retried.body
        await printed(out, "RetryRequested")
        await controller.api.emit(workflow_id, "Uncharged", {}, workflow="charge")
        code = await task

    assert code == ExitCode.COMPENSATED
    last = out.getvalue().splitlines()[-1]
    assert last.endswith(": ship failed: no truck (exit 3)"), last  # why it was compensated, not the give-up


async def test_a_replayed_line_shows_what_the_state_was_then_not_what_came_later(controller: Controller) -> None:
    workflow_id = await compensating_charge(controller)
    await controller.api.emit(workflow_id, "UnchargeFailed", {"reason": "card closed"}, workflow="charge")
    await controller.api.until_status(workflow_id, "needs_attention")
    shown, out = console()

    async with watching(controller, workflow_id, shown) as task:
        assert await task == ExitCode.NEEDS_ATTENTION

    lines = out.getvalue().splitlines()
    sent = next(line for line in lines if " out Uncharge " in line)
    assert "card closed" not in sent, sent  # the undo failed after this line, not before
    failed = next(line for line in lines if " in  UnchargeFailed " in line)
    assert failed.count("card closed") == 1, failed  # the line's detail, not the step's error again


async def test_watch_on_a_terminal_draws_a_live_table_of_the_steps(controller: Controller) -> None:
    workflow_id = await controller.api.start_order()
    shown, out = console(terminal=True)

    async with watching(controller, workflow_id, shown) as task:
        await printed(out, "PARTICIPANT")
        await controller.api.complete_order(workflow_id)
        code = await task

    assert code == 0
    drawn = out.getvalue()
    assert "\x1b[" in drawn  # drawn with terminal control sequences
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", drawn)
    for heading in ("STEP", "STATUS", "TOOK", "DEADLINE", "COMPENSATION", "latest events"):
        assert heading in text
    final = text[text.rindex("PARTICIPANT") :]  # the last drawing
    for step in ("payment", "inventory", "shipping", "notification"):
        assert re.search(rf"{step}\s+{step}\s+completed", final), step
    assert f"workflow {workflow_id} completed after" in text


async def test_watch_resumes_after_the_controller_restarts_without_repeating_a_line(
    redis: Redis, redis_url: str
) -> None:
    port = free_port()

    async def start() -> TestServer:
        server = TestServer(create_app(settings(redis_url)), host="127.0.0.1", port=port)
        await server.start_server()
        return server

    server = await start()
    url = f"http://127.0.0.1:{port}"
    shown, out = console()
    try:
        async with aiohttp.ClientSession(base_url=url) as session:
            api = Api(session, redis)
            await eventually(lambda: api.call("GET", "/readyz"), lambda r: r.status == 200, what="readiness")
            workflow_id = await api.start_order()
            order = (await api.workflow(workflow_id))["input"]["order"]
            async with watching(Controller(api, url), workflow_id, shown) as task:
                await api.emit(workflow_id, "PaymentCaptured", {"order": order, "payment_id": "p", "amount": "33.00"})
                await printed(out, "PaymentCaptured")
                await server.close()  # ends the stream: watch reconnects with Last-Event-ID
                server = await start()
                await api.emit(workflow_id, "InventoryReserved", {"order": order, "reservation_id": "r"})
                await api.emit(workflow_id, "ShipmentScheduled", {"order": order, "shipment_id": "s"})
                await api.emit(workflow_id, "CustomerNotified", {"customer_id": order["customer_id"]})
                code = await task
    finally:
        await server.close()

    assert code == ExitCode.COMPLETED
    _, *lines, _ = out.getvalue().splitlines()
    assert [line.split()[2] for line in lines] == [
        "OrderSubmitted",
        "PaymentCaptured",
        "InventoryReserved",
        "ShipmentScheduled",
        "CustomerNotified",
    ]


async def test_watch_exits_6_when_the_timeout_passes_first(controller: Controller) -> None:
    workflow_id = await controller.api.start_order()
    shown, _ = console()

    async with watching(controller, workflow_id, shown, timeout=0.3) as task:
        assert await task == ExitCode.TIMEOUT


async def test_watch_of_an_unknown_workflow_or_an_api_it_cannot_reach_exits_1(
    controller: Controller, capsys: pytest.CaptureFixture[str]
) -> None:
    shown, _ = console()
    async with watch.client_session() as session:
        unknown = await watch.watch_workflow(watch.ApiClient(session, controller.url), "no-such-id", shown)
        nowhere = watch.ApiClient(session, f"http://127.0.0.1:{free_port()}")
        unreachable = await watch.watch_workflow(nowhere, "no-such-id", shown)
        all_unreachable = await watch.watch_all(nowhere, shown, asyncio.Event())

    assert unknown == unreachable == all_unreachable == ExitCode.ERROR
    errors = capsys.readouterr().err.splitlines()
    assert "404 Workflow not found" in errors[0]
    assert "cannot reach the API" in errors[1]
    assert "/v1/events" in errors[2]
    assert "cannot connect" in errors[2]


# --- watch --all --------------------------------------------------------------------------


async def test_watch_all_prints_counts_and_a_line_per_event_when_not_on_a_terminal(controller: Controller) -> None:
    api = controller.api
    done = await api.start_order()
    await api.complete_order(done)
    shown, out = console()
    stop = asyncio.Event()

    async with watch.client_session() as session:
        task = asyncio.create_task(watch.watch_all(watch.ApiClient(session, controller.url), shown, stop))
        try:
            await printed(out, "counts: running=0 completed=1 compensating=0 compensated=0 failed=0 needs_attention=0")
            workflow_id = await api.start_order()
            await printed(out, "counts: running=1 completed=1")
            await api.complete_order(workflow_id)
            await printed(out, "counts: running=0 completed=2")
            stop.set()
            code = await task
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    assert code == 0
    lines = [line for line in out.getvalue().splitlines() if workflow_id in line]
    assert [line.split()[5] for line in lines][:2] == ["OrderSubmitted", "PaymentCaptured"]
    assert all(" order v1 " in line for line in lines)
    assert lines[-1].endswith("workflow completed")


async def test_watch_all_reads_the_board_again_after_a_gap_in_the_feed(controller: Controller) -> None:
    shown, out = console()
    async with watch.client_session() as session:
        overview = watch._Overview(watch.ApiClient(session, controller.url), shown, asyncio.Event(), plain=True)
        try:
            gap = ServerSentEvent(event=watch.GAP, data='{"partitions": [1], "reason": "trimmed"}', id="c-9")
            overview._apply([gap])  # no line to show, and not a line to decode
            assert overview._dirty  # the next refresh reads every workflow's state over REST
        finally:
            await overview.aclose()
    assert out.getvalue() == ""


async def test_watch_all_on_a_terminal_shows_the_in_flight_workflows(controller: Controller) -> None:
    api = controller.api
    shown, out = console(terminal=True)
    stop = asyncio.Event()

    async with watch.client_session() as session:
        task = asyncio.create_task(watch.watch_all(watch.ApiClient(session, controller.url), shown, stop))
        try:
            await printed(out, "in flight: 0")
            workflow_id = await api.start_order()
            await printed(out, workflow_id)
            await printed(out, "payment running")
            stop.set()
            assert await task == 0
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


# --- the command, as real processes ---------------------------------------------------------


def test_the_exit_statuses_are_the_documented_numbers() -> None:
    assert {code.name: int(code) for code in ExitCode} == {
        "COMPLETED": 0,
        "ERROR": 1,
        "USAGE": 2,
        "COMPENSATED": 3,
        "FAILED": 4,
        "NEEDS_ATTENTION": 5,
        "TIMEOUT": 6,
        "INTERRUPTED": 130,
    }


def test_watch_needs_an_id_or_all_but_not_both() -> None:
    for argv in (["watch"], ["watch", "some-id", "--all"], ["watch", "--all", "--until-terminal"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2, argv


@pytest.mark.parametrize("command", ["watch", "submit"])
def test_the_help_states_every_exit_status(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    help_text = capsys.readouterr().out
    for code in ExitCode:
        assert re.search(rf"^\s+{int(code)}\s+\S", help_text, flags=re.MULTILINE), code


@pytest.mark.e2e
async def test_submit_watch_follows_each_order_to_its_outcome_and_exits_with_it(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    deployment = Deployment(redis_url, tmp_path)
    try:
        deployment.start_all()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            await deployment.wait_ready(session)
        completes = await cli("submit", "-", "--watch", "--api", deployment.api, stdin=orjson.dumps(order()))
        compensates = await cli(
            "submit", "-", "--watch", "--api", deployment.api, stdin=orjson.dumps(order(country="JP"))
        )
    finally:
        deployment.stop()

    assert completes.returncode == 0, completes.stdout + completes.stderr + deployment.logs()
    workflow_id, location, heading, *lines, outcome = completes.stdout.splitlines()
    assert location.endswith(f"/v1/workflows/{workflow_id}")
    assert heading.startswith(f"workflow {workflow_id} (order v1)")
    assert [line.split()[2] for line in lines][:2] == ["OrderSubmitted", "PaymentCaptured"]
    assert outcome.startswith(f"workflow {workflow_id} completed after")

    assert compensates.returncode == 3, compensates.stdout + compensates.stderr
    text = compensates.stdout
    assert "ShipmentFailed" in text
    assert re.search(r"PaymentRefunded\s+payment\s+compensated", text)
    assert text.splitlines()[-1].endswith("(exit 3)")


def test_an_error_body_is_read_as_a_problem_document_whatever_it_is() -> None:
    from controller.event_source import problem_of

    assert problem_of(b'{"title": "Invalid input", "detail": "bad"}') == {"title": "Invalid input", "detail": "bad"}
    assert problem_of(b"  502 Bad Gateway\n") == {"detail": "502 Bad Gateway"}  # a proxy's page
    assert problem_of("[1, 2]") == {"detail": "[1, 2]"}  # JSON, but not a problem document


# --- the live views' layout ------------------------------------------------------------


def _rendered(renderable: RenderableType, width: int) -> list[str]:
    shown, out = console(terminal=True)
    shown.width = width
    shown.print(renderable)
    return [line.rstrip() for line in Text.from_ansi(out.getvalue()).plain.splitlines()]


def _compensating_view(now: datetime) -> tuple[watch.WorkflowView, list[watch.ProgressLine]]:
    ref = {"name": "order", "version": 1}
    steps = [
        StepState(
            name="payment", participant="payment", status=StepStatus.COMPENSATING, attempts=2, retrying=True,
            started_at=now - timedelta(seconds=9), finished_at=now - timedelta(seconds=8),
            compensation_started_at=now - timedelta(seconds=3), deadline_at=now + timedelta(seconds=27),
            error="compensation attempt 1 failed: the card of customer c-7 cannot be refunded",
        ),
        StepState(
            name="inventory", participant="inventory", status=StepStatus.FAILED, error="out of MUG-1",
            started_at=now - timedelta(seconds=8), finished_at=now - timedelta(seconds=3),
        ),
        StepState(name="shipping", participant="shipping", status=StepStatus.SKIPPED),
    ]  # fmt: skip
    view = watch.WorkflowView(
        workflow_id="4a95e61bca774eb88f209f0f879b3648", workflow=WorkflowRef(**ref), status=WorkflowStatus.COMPENSATING,
        created_at=now - timedelta(seconds=9), updated_at=now, error="inventory failed: out of MUG-1", steps=steps,
    )  # fmt: skip
    line = watch.ProgressLine(
        workflow_id=view.workflow_id, workflow=view.workflow, seq=3, at=now, direction="out", type="RefundPayment",
        message_id="m-3", producer="controller", step="payment", step_status=StepStatus.COMPENSATING,
        status=WorkflowStatus.COMPENSATING, detail="compensating payment: attempt 2",
    )  # fmt: skip
    return view, [line]


@pytest.mark.parametrize("width", [80, 100])
def test_on_a_narrow_terminal_the_live_views_leave_columns_out_instead_of_cutting_every_cell(width: int) -> None:
    now = datetime.now(UTC)
    view, lines = _compensating_view(now)
    board = watch.Board()
    for line in lines:
        board.apply(line)

    for rendered in (_rendered(terminal.workflow_panel(view, lines, now), width),
                     _rendered(terminal.board_panel(board, now, 40), width)):  # fmt: skip
        assert all(len(line) <= width for line in rendered), rendered
        assert not any("…" in line for line in rendered), rendered  # nothing cut short
    steps = _rendered(terminal.workflow_panel(view, lines, now), width)
    assert "PARTICIPANT" not in "\n".join(steps)
    assert any(row.split()[:5] == ["payment", "compensating", "1.0s", "in", "27.0s"] for row in steps), steps
    counts, *rows = _rendered(terminal.board_panel(board, now, 40), width)
    assert counts.endswith("needs_attention 0")  # on one line
    assert any(row.split()[:2] == [view.workflow_id, "compensating"] for row in rows), rows


def test_on_a_wide_terminal_the_live_views_show_every_column() -> None:
    now = datetime.now(UTC)
    view, lines = _compensating_view(now)
    text = "\n".join(_rendered(terminal.workflow_panel(view, lines, now), 200))
    for column in terminal.STEP_COLUMNS + terminal.TIMELINE_COLUMNS:
        assert column.name in text


async def test_watch_into_a_pipe_whose_reader_left_ends_quietly(controller: Controller) -> None:
    workflow_id = await controller.api.start_order()
    read_end, write_end = os.pipe()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controller", "watch", workflow_id, "--api", controller.url,
        stdout=write_end, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as reader:  # `| head -2`: two lines, then gone
            lines = [await asyncio.to_thread(reader.readline) for _ in range(2)]  # the loop serves the API
            assert b"OrderSubmitted" in b"".join(lines)
        await controller.api.complete_order(workflow_id)  # more lines for a reader no longer there
        _, err = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == ExitCode.ERROR
    assert err == b""  # no BrokenPipeError traceback


def test_a_step_that_timed_out_then_completed_late_shows_how_long_on_the_late_line_only() -> None:
    now = datetime.now(UTC)
    view, _ = _compensating_view(now)
    shipping = view.steps[2]
    shipping.status, shipping.error = StepStatus.COMPLETED, "timed out"
    shipping.started_at, shipping.finished_at = now - timedelta(seconds=7.2), now
    lines = [
        watch.ProgressLine(
            workflow_id=view.workflow_id, workflow=view.workflow, seq=seq, at=now, direction="in", type=message_type,
            message_id=f"m-{seq}", producer="tests", step="shipping", step_status=status, status=view.status,
        )
        for seq, message_type, status in (
            (4, "TimerFired", StepStatus.TIMED_OUT),
            (5, "ShipmentScheduled", StepStatus.COMPLETED),
        )
    ]  # fmt: skip
    timed_out, late = (terminal.line_text(line, view, latest=line is lines[-1]) for line in lines)
    assert "took" not in timed_out, timed_out  # 7.2 s is when it completed, not when it timed out
    assert late.endswith("took 7.2s"), late
