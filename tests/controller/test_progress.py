"""Live progress over Server-Sent Events: the app on a real socket, its correlator on a real Redis."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import ClientResponse, ClientSession, ClientTimeout, web
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from contracts import naming
from contracts.envelope import utcnow
from controller.api import PROGRESS
from controller.app import create_app
from controller.instance import HistoryEntry, WorkflowStatus
from controller.progress import ProgressHub, decode_cursor, encode_cursor
from controller.settings import ControllerSettings
from controller.store import workflow_id_for
from tests.conftest import definitions_file, eventually
from tests.controller.test_api import GREETING, Api, P

READ_TIMEOUT_S = 15.0  # a guard against a hung test, not a wait for anything
NO_TIMEOUT = ClientTimeout(total=None, sock_read=None)

LET_THE_RUN_ADVANCE = 0  # one turn of the event loop between connections


# --- a client of event streams ------------------------------------------------------


@dataclass(frozen=True)
class Event:
    id: str | None
    event: str
    data: Any


@dataclass
class _Parser:
    """Lines of a ``text/event-stream`` to events, keeping what a browser would hide (comments, ids per event)."""

    comments: list[str] = field(default_factory=list)
    retry: int | None = None
    _fields: dict[str, str] = field(default_factory=dict)
    _data: list[str] = field(default_factory=list)

    def line(self, line: str) -> Event | None:
        if not line:
            fields, data = self._fields, self._data
            self._fields, self._data = {}, []
            if not data:
                return None
            return Event(fields.get("id"), fields.get("event", "message"), orjson.loads("\n".join(data)))
        if line.startswith(":"):
            self.comments.append(line[1:].strip())
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "retry":
            self.retry = int(value)
        else:
            self._fields[name] = value
        return None

    def text(self, text: str) -> list[Event]:
        return [event for line in text.split("\n") if (event := self.line(line)) is not None]


class Stream:
    """An open event stream and what came on it so far."""

    def __init__(self, response: ClientResponse) -> None:
        self.response = response
        self.parser = _Parser()
        self.events: list[Event] = []
        self.closed = False

    @property
    def comments(self) -> list[str]:
        return self.parser.comments

    async def _line(self) -> str | None:
        raw = await self.response.content.readline()
        if not raw:
            self.closed = True
            return None
        return raw.decode().removesuffix("\n")

    async def next(self) -> Event | None:
        """The next event; None when the server closed the stream."""
        async with asyncio.timeout(READ_TIMEOUT_S):
            while (line := await self._line()) is not None:
                if (event := self.parser.line(line)) is not None:
                    self.events.append(event)
                    return event
        return None

    async def take(self, count: int) -> list[Event]:
        taken: list[Event] = []
        for _ in range(count):
            event = await self.next()
            assert event is not None, f"the stream closed after {taken}"
            taken.append(event)
        return taken

    async def rest(self) -> list[Event]:
        """Every event up to the end of the stream."""
        events = []
        while (event := await self.next()) is not None:
            events.append(event)
        return events

    async def comment(self) -> str:
        """Read on until a comment comes."""
        seen = len(self.comments)
        async with asyncio.timeout(READ_TIMEOUT_S):
            while len(self.comments) == seen:
                line = await self._line()
                assert line is not None, "the stream closed"
                if (event := self.parser.line(line)) is not None:
                    self.events.append(event)
        return self.comments[-1]

    async def follow(self) -> None:
        """Read everything until the stream ends (run it as a task)."""
        while not self.closed:
            await self.next()

    def close(self) -> None:
        self.response.close()


class SlowClient:
    """A client that sends its request and then reads nothing until told to: a tiny receive
    buffer and no reading, so the server's writes to it back up."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    async def connect(cls, port: int, path: str) -> SlowClient:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", port))
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n\r\n"
        await loop.sock_sendall(sock, request.encode())
        return cls(sock)

    async def read_to_end(self) -> tuple[str, list[Event]]:
        """Read everything the server sent until it closed: (status line, events)."""
        loop = asyncio.get_running_loop()
        raw = bytearray()
        async with asyncio.timeout(READ_TIMEOUT_S):
            while chunk := await loop.sock_recv(self.sock, 1 << 20):
                raw += chunk
        head, _, body = bytes(raw).partition(b"\r\n\r\n")
        return head.split(b"\r\n")[0].decode(), _Parser().text(_unchunk(body).decode())

    def close(self) -> None:
        self.sock.close()


def _unchunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out += body[:size]
        body = body[size + 2 :]
    return bytes(out)


# --- the app under test -------------------------------------------------------------


@dataclass
class Controller:
    app: web.Application
    server: TestServer
    session: ClientSession
    api: Api
    streams: list[Stream] = field(default_factory=list)

    @property
    def hub(self) -> ProgressHub:
        return self.app[PROGRESS]

    async def stream(self, path: str, headers: dict[str, str] | None = None) -> Stream:
        response = await self.session.get(path, headers=headers, timeout=NO_TIMEOUT)
        assert response.status == 200, await response.text()
        stream = Stream(response)
        self.streams.append(stream)
        return stream

    async def problem(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        async with self.session.get(path, headers=headers) as response:
            assert response.content_type == "application/problem+json"
            return response.status, await response.json()

    async def events_of(self, workflow_id: str) -> list[Event]:
        """The whole per-workflow stream of a finished workflow."""
        stream = await self.stream(f"/v1/workflows/{workflow_id}/events")
        return await stream.rest()


ControllerFactory = Callable[..., Awaitable[Controller]]


@pytest.fixture
async def start(redis: Redis, redis_url: str, tmp_path: Path) -> AsyncIterator[ControllerFactory]:
    """Start the app (correlator and all) with settings changed as given; stopped after the test."""
    definitions = definitions_file(tmp_path / "definitions.json", GREETING)
    started: list[Controller] = []

    async def start(**changes: Any) -> Controller:
        settings = ControllerSettings(
            redis_url=redis_url,
            partitions=P,
            consumer=f"progress-tests-{len(started)}",
            block_ms=50,
            definitions_path=definitions,
            **changes,
        )
        app = create_app(settings)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        session = ClientSession(base_url=str(server.make_url("")))
        controller = Controller(app, server, session, Api(session, redis))
        started.append(controller)
        await eventually(lambda: controller.api.call("GET", "/readyz"), lambda r: r.status == 200, what="readiness")
        return controller

    try:
        yield start
    finally:
        for controller in started:
            for stream in controller.streams:
                stream.close()
            await controller.session.close()
            await controller.server.close()


@pytest.fixture
async def controller(start: ControllerFactory) -> Controller:
    return await start()


def lines(events: list[Event]) -> list[tuple[str, int]]:
    """(workflow id, seq) of every history-line event."""
    return [(e.data["workflow_id"], e.data["seq"]) for e in events if e.event not in ("end", "overflow")]


def assert_no_gap_or_duplicate(events: list[Event]) -> None:
    """Each workflow's lines come once each, in order, from its first line on."""
    by_workflow: dict[str, list[int]] = {}
    for workflow_id, seq in lines(events):
        by_workflow.setdefault(workflow_id, []).append(seq)
    for workflow_id, seqs in by_workflow.items():
        assert seqs == list(range(len(seqs))), (workflow_id, seqs)


async def burst(redis: Redis, workflow_id: str, count: int, *, first: int = 0, detail_bytes: int = 0) -> None:
    """Progress records of a made-up workflow, written as the store writes them (wire contract,
    "Progress records"): a burst far faster than any correlator, to fill a client's buffers."""
    stream = naming.progress_stream(naming.partition_of(workflow_id, P))
    async with redis.pipeline(transaction=False) as pipe:
        for seq in range(first, first + count):
            entry = HistoryEntry(
                seq=seq,
                at=utcnow(),
                direction="in",
                type="Burst",
                message_id=f"{workflow_id}-{seq}",
                producer="tests",
                status=WorkflowStatus.RUNNING,
                detail="x" * detail_bytes or None,
            )
            fields = {
                "workflow_id": workflow_id,
                "workflow": "order",
                "version": "1",
                "status": "running",
                "seq": str(seq),
                "type": "Burst",
                "entry": entry.model_dump_json(),
            }
            pipe.xadd(stream, fields)  # type: ignore[arg-type]
        await pipe.execute()


# --- one workflow --------------------------------------------------------------------


async def test_a_workflow_stream_replays_the_history_then_sends_each_new_line_live(controller: Controller) -> None:
    workflow_id = await controller.api.start_order()

    stream = await controller.stream(f"/v1/workflows/{workflow_id}/events")
    [submitted] = await stream.take(1)
    order = (await controller.api.workflow(workflow_id))["input"]["order"]
    await controller.api.emit(workflow_id, "PaymentCaptured", {"order": order, "payment_id": "p-1", "amount": "33.00"})
    [captured] = await stream.take(1)

    headers = stream.response.headers
    assert headers["Content-Type"] == "text/event-stream"
    assert headers["Cache-Control"] == "no-cache"
    assert headers["X-Accel-Buffering"] == "no"
    assert stream.parser.retry == 2000
    assert (submitted.id, submitted.event) == ("0", "OrderSubmitted")
    assert (captured.id, captured.event) == ("1", "PaymentCaptured")
    assert captured.data["workflow_id"] == workflow_id
    assert captured.data["workflow"] == {"name": "order", "version": 1}
    assert captured.data["status"] == "running"
    assert (captured.data["direction"], captured.data["step"], captured.data["step_status"]) == (
        "in",
        "payment",
        "completed",
    )
    # a live line is exactly the line the history shows
    history = (await controller.api.call("GET", f"/v1/workflows/{workflow_id}/history")).body["events"]
    shown = [{k: v for k, v in e.data.items() if k not in ("workflow_id", "workflow")} for e in stream.events]
    assert shown == history


async def test_the_stream_ends_with_end_once_the_workflow_is_terminal_and_closes(controller: Controller) -> None:
    workflow_id = await controller.api.start_order()
    stream = await controller.stream(f"/v1/workflows/{workflow_id}/events")
    await stream.take(1)

    view = await controller.api.complete_order(workflow_id)
    rest = await stream.rest()

    assert [(e.id, e.event) for e in rest] == [
        ("1", "PaymentCaptured"),
        ("2", "InventoryReserved"),
        ("3", "ShipmentScheduled"),
        ("4", "CustomerNotified"),
        (None, "end"),
    ]
    assert rest[-1].data == {"workflow_id": workflow_id, "status": "completed", "finished_at": view["finished_at"]}
    assert stream.closed
    await eventually(lambda: asyncio.sleep(0, controller.hub.clients), lambda n: n == 0, what="the client forgotten")


async def test_a_finished_workflow_replays_its_history_then_ends(controller: Controller) -> None:
    workflow_id = await controller.api.start_order()
    order = (await controller.api.workflow(workflow_id))["input"]["order"]
    await controller.api.emit(workflow_id, "PaymentCaptured", {"order": order, "payment_id": "p-1", "amount": "33.00"})
    await controller.api.emit(workflow_id, "InventoryUnavailable", {"order": order, "reason": "out of stock"})
    await controller.api.until_status(workflow_id, "compensating")
    await controller.api.emit(workflow_id, "PaymentRefunded", {"order": order, "refund_id": "r-1"})
    view = await controller.api.until_status(workflow_id, "compensated")

    events = await controller.events_of(workflow_id)

    assert [e.event for e in events] == [
        "OrderSubmitted",
        "PaymentCaptured",
        "InventoryUnavailable",
        "RefundPayment",
        "PaymentRefunded",
        "end",
    ]
    assert [e.id for e in events] == ["0", "1", "2", "3", "4", None]
    statuses = [e.data["status"] for e in events[:-1]]
    assert statuses == ["running", "running", "compensating", "compensating", "compensated"]
    assert events[-1].data == {"workflow_id": workflow_id, "status": "compensated", "finished_at": view["finished_at"]}


@pytest.mark.parametrize("how", ["header", "query"])
async def test_last_event_id_resumes_a_workflow_stream_after_that_line(controller: Controller, how: str) -> None:
    workflow_id = await controller.api.start_order()
    view = await controller.api.complete_order(workflow_id)
    path = f"/v1/workflows/{workflow_id}/events"

    if how == "header":
        stream = await controller.stream(path, headers={"Last-Event-ID": "2"})
    else:
        stream = await controller.stream(f"{path}?last_event_id=2")
    events = await stream.rest()

    assert [(e.id, e.event) for e in events] == [("3", "ShipmentScheduled"), ("4", "CustomerNotified"), (None, "end")]
    assert events[-1].data["finished_at"] == view["finished_at"]


async def test_a_client_that_has_every_line_of_a_finished_workflow_gets_just_the_end(controller: Controller) -> None:
    workflow_id = await controller.api.start_order()
    await controller.api.complete_order(workflow_id)

    stream = await controller.stream(f"/v1/workflows/{workflow_id}/events", headers={"Last-Event-ID": "4"})

    assert [e.event for e in await stream.rest()] == ["end"]


async def test_a_resumed_stream_of_a_running_workflow_continues_live(controller: Controller) -> None:
    workflow_id = await controller.api.start_order()
    stream = await controller.stream(f"/v1/workflows/{workflow_id}/events", headers={"Last-Event-ID": "0"})

    order = (await controller.api.workflow(workflow_id))["input"]["order"]
    await controller.api.emit(workflow_id, "PaymentCaptured", {"order": order, "payment_id": "p-1", "amount": "33.00"})

    assert [(e.id, e.event) for e in await stream.take(1)] == [("1", "PaymentCaptured")]


async def test_lines_committed_while_a_client_connects_come_once_each_in_order(controller: Controller) -> None:
    """Subscribing before reading the history leaves no gap at the seam, and seq dedupe no duplicate."""
    for _ in range(3):
        workflow_id = await controller.api.start_order()
        driving = asyncio.create_task(controller.api.complete_order(workflow_id))
        streams = []
        for _ in range(4):  # connecting at different moments of the same run
            streams.append(await controller.stream(f"/v1/workflows/{workflow_id}/events"))
            await asyncio.sleep(LET_THE_RUN_ADVANCE)
        await driving
        for stream in streams:
            events = await stream.rest()
            assert [e.id for e in events] == ["0", "1", "2", "3", "4", None]


async def test_an_unknown_workflow_is_a_404_before_any_streaming(controller: Controller) -> None:
    status, problem = await controller.problem("/v1/workflows/no-such-id/events")

    assert status == 404
    assert problem["field"] == "id"


@pytest.mark.parametrize(
    ("path", "headers", "field"),
    [
        ("/v1/workflows/{id}/events", {"Last-Event-ID": "two"}, "Last-Event-ID"),
        ("/v1/workflows/{id}/events?last_event_id=-1", None, "last_event_id"),
        ("/v1/events", {"Last-Event-ID": "not-a-cursor"}, "Last-Event-ID"),
        ("/v1/events?last_event_id=0.0", None, "last_event_id"),
        ("/v1/events?workflow=no-such-definition", None, "workflow"),
        ("/v1/events?status=done", None, "status"),
        ("/v1/events?status=completed,", None, "status"),
    ],
)
async def test_an_invalid_resume_position_or_filter_is_422_naming_it(
    controller: Controller, path: str, headers: dict[str, str] | None, field: str
) -> None:
    workflow_id = await controller.api.start_order()

    status, problem = await controller.problem(path.format(id=workflow_id), headers)

    assert status == 422
    assert problem["field"] == field


# --- every workflow ------------------------------------------------------------------


async def test_the_feed_sends_every_workflows_new_lines_live(controller: Controller) -> None:
    before = await controller.api.start_order()
    stream = await controller.stream("/v1/events")
    follower = asyncio.create_task(stream.follow())

    first = await controller.api.start_order()
    second = await controller.api.start_order()
    await controller.api.complete_order(first)
    await controller.api.complete_order(second)
    await eventually(lambda: asyncio.sleep(0, len(stream.events)), lambda n: n >= 10, what="ten lines")
    follower.cancel()

    assert Counter(workflow_id for workflow_id, _ in lines(stream.events)) == {first: 5, second: 5}
    assert before not in {e.data["workflow_id"] for e in stream.events}  # live: nothing from before it connected
    assert_no_gap_or_duplicate(stream.events)
    done = [e for e in stream.events if e.event == "CustomerNotified"]
    assert [e.data["status"] for e in done] == ["completed", "completed"]
    assert all(len(decode_cursor(e.id or "", P)) == P for e in stream.events)


async def test_the_feed_filters_by_definition_and_by_the_status_after_the_line(controller: Controller) -> None:
    greetings = await controller.stream("/v1/events?workflow=greeting")
    finished = await controller.stream("/v1/events?status=completed,failed")
    both = await controller.stream("/v1/events?workflow=order&status=completed")
    everything = await controller.stream("/v1/events")

    order_id = await controller.api.start_order()
    reply = await controller.api.call("POST", "/v1/workflows/greeting", json={"to": "world"})
    greeting_id = reply.body["workflow_id"]
    await controller.api.emit(greeting_id, "Greeted", {"said": "hello"}, workflow="greeting")
    await controller.api.until_status(greeting_id, "completed")
    await controller.api.complete_order(order_id)

    assert lines(await greetings.take(2)) == [(greeting_id, 0), (greeting_id, 1)]
    assert lines(await finished.take(2)) == [(greeting_id, 1), (order_id, 4)]
    assert lines(await both.take(1)) == [(order_id, 4)]
    assert len(await everything.take(7)) == 7
    # the filtered feeds got nothing else: the next thing each sees is a line that matches
    await controller.api.start_order()
    late = await controller.api.call("POST", "/v1/workflows/greeting", json={"to": "you"})
    [next_greeting] = await greetings.take(1)
    assert next_greeting.data["workflow_id"] == late.body["workflow_id"]


async def test_the_feed_resumes_after_last_event_id_without_gaps_or_duplicates(start: ControllerFactory) -> None:
    controller = await start()
    reference = await controller.stream("/v1/events")
    following = asyncio.create_task(reference.follow())
    leaving = await controller.stream("/v1/events")

    workflows = [await controller.api.start_order() for _ in range(6)]
    await controller.api.complete_order(workflows[0])
    got = await leaving.take(8)
    leaving.close()
    for workflow_id in workflows[1:4]:
        await controller.api.complete_order(workflow_id)  # missed while away

    resumed = await controller.stream("/v1/events", headers={"Last-Event-ID": got[-1].id or ""})
    for workflow_id in workflows[4:]:
        await controller.api.complete_order(workflow_id)  # live again
    total = 6 * 5
    await eventually(lambda: asyncio.sleep(0, len(reference.events)), lambda n: n >= total, what="every line")
    again = await resumed.take(total - 8)
    following.cancel()

    assert sorted(lines(got + again)) == sorted(lines(reference.events))
    assert_no_gap_or_duplicate(got + again)


async def test_a_resumed_feed_says_gap_for_the_partitions_whose_missed_lines_were_trimmed(
    start: ControllerFactory, redis: Redis
) -> None:
    keys = _keys_by_partition()
    controller = await start()

    async def start_in(partition: int) -> str:
        return await controller.api.start_order(headers={"Idempotency-Key": keys[partition].pop()})

    leaving = await controller.stream("/v1/events")
    await start_in(0)
    [seen] = await leaving.take(1)
    leaving.close()
    for partition in (0, 1, 2):  # missed while away...
        await start_in(partition)
    for p in range(P):  # ...and trimmed meanwhile, as a small --progress-maxlen does
        await redis.xtrim(naming.progress_stream(p), maxlen=0, approximate=False)
    kept = await start_in(3)  # after the trim: still there

    resumed = await controller.stream("/v1/events", headers={"Last-Event-ID": seen.id or ""})
    server: Any = await redis.info("server")

    if int(str(server["redis_version"]).split(".")[0]) >= 7:
        gap, line = await resumed.take(2)
        assert gap.event == "gap"
        assert gap.data["partitions"] == [0, 1, 2]
    else:  # Redis 6.2 does not count what a stream trimmed (docs/api.md): no gap is told
        [line] = await resumed.take(1)
    assert line.data["workflow_id"] == kept  # and the feed goes on


def _keys_by_partition() -> dict[int, list[str]]:
    """Two Idempotency-Keys per partition: each starts an order in that partition."""
    keys: dict[int, list[str]] = {p: [] for p in range(P)}
    n = 0
    while any(len(found) < 2 for found in keys.values()):
        n += 1
        keys[naming.partition_of(workflow_id_for("order", f"gap-{n}"), P)].append(f"gap-{n}")
    return keys


async def test_a_feed_cursor_resumes_on_another_controller_with_its_filter(start: ControllerFactory) -> None:
    first = await start()
    finished = await first.stream("/v1/events?status=completed")

    workflows = [await first.api.start_order() for _ in range(4)]
    await first.api.complete_order(workflows[0])
    [done] = await finished.take(1)
    finished.close()
    for workflow_id in workflows[1:]:
        await first.api.complete_order(workflow_id)

    second = await start()  # (not earlier: two correlators racing on one workflow is another test's business)
    resumed = await second.stream("/v1/events?status=completed", headers={"Last-Event-ID": done.id or ""})
    rest = await resumed.take(3)

    assert sorted(lines(rest)) == sorted((workflow_id, 4) for workflow_id in workflows[1:])
    assert lines([done]) == [(workflows[0], 4)]


# --- slow clients, keep-alives, one reader --------------------------------------------


async def test_a_client_that_stops_reading_is_cut_off_with_overflow_and_slows_nobody(start: ControllerFactory) -> None:
    controller = await start(sse_buffer_events=20)
    slow = await SlowClient.connect(controller.server.port or 0, "/v1/events")
    fast = await controller.stream("/v1/events")
    following = asyncio.create_task(fast.follow())
    await eventually(lambda: asyncio.sleep(0, controller.hub.clients), lambda n: n == 2, what="both subscribed")

    # far more than the kernel buffers (megabytes on loopback) and the client's 20 events hold
    for round_ in range(10):
        await burst(controller.api.redis, "burst", 20, first=20 * round_, detail_bytes=50_000)
    await eventually(lambda: asyncio.sleep(0, controller.hub.overflows), lambda n: n == 1, what="the slow one cut off")
    # the correlator commits and the fast client gets every line, while the slow one is still stuck
    workflow_id = await controller.api.start_order()
    await controller.api.complete_order(workflow_id)
    await eventually(lambda: asyncio.sleep(0, len(fast.events)), lambda n: n == 205, what="every line, fast")
    status, seen = await slow.read_to_end()
    slow.close()

    assert status == "HTTP/1.1 200 OK"
    overflow = seen[-1]
    assert overflow.event == "overflow"
    assert overflow.id is None
    assert overflow.data["reason"]
    received = seen[:-1]
    assert 0 < len(received) < 200
    assert overflow.data["last_event_id"] == received[-1].id
    resumed = await controller.stream("/v1/events", headers={"Last-Event-ID": overflow.data["last_event_id"]})
    rest = await resumed.take(205 - len(received))
    assert sorted(lines(received + rest)) == sorted(lines(fast.events))
    assert_no_gap_or_duplicate(received + rest)
    following.cancel()


async def test_an_idle_stream_gets_keep_alive_comments(start: ControllerFactory) -> None:
    controller = await start(sse_keepalive_s=0.05)
    workflow_id = await controller.api.start_order()
    feed = await controller.stream("/v1/events")
    one = await controller.stream(f"/v1/workflows/{workflow_id}/events")

    assert await feed.comment() == "keep-alive"
    assert await one.comment() == "keep-alive"
    assert [e.event for e in one.events] == ["OrderSubmitted"]


async def test_a_client_that_goes_away_is_forgotten_with_its_tasks(start: ControllerFactory) -> None:
    controller = await start(sse_keepalive_s=0.05)
    workflow_id = await controller.api.start_order()
    feed = await controller.stream("/v1/events?status=running")
    one = await controller.stream(f"/v1/workflows/{workflow_id}/events")
    await one.take(1)
    assert controller.hub.clients == 2

    feed.close()
    one.close()

    await eventually(lambda: asyncio.sleep(0, controller.hub.clients), lambda n: n == 0, what="clients forgotten")
    writers = lambda: asyncio.sleep(0, [t for t in asyncio.all_tasks() if t.get_name().startswith("sse ")])  # noqa: E731
    await eventually(writers, lambda tasks: not tasks, what="writer tasks gone")


async def test_one_read_loop_serves_every_client(controller: Controller) -> None:
    redis = controller.api.redis
    workflow_id = await controller.api.start_order()
    streams = [await controller.stream("/v1/events") for _ in range(20)]
    streams += [await controller.stream("/v1/events?status=completed") for _ in range(5)]
    streams += [await controller.stream(f"/v1/workflows/{workflow_id}/events") for _ in range(5)]
    followers = [asyncio.create_task(stream.follow()) for stream in streams]
    before = await _calls(redis)
    reads_before = controller.hub.reads

    await controller.api.complete_order(workflow_id)
    await eventually(
        lambda: asyncio.sleep(0, [len(s.events) for s in streams]),
        lambda counts: counts == [4] * 20 + [1] * 5 + [6] * 5,
        what="every client got every line",
    )
    after = await _calls(redis)
    reads = controller.hub.reads - reads_before
    for follower in followers:
        follower.cancel()

    # every XREAD on the server is the hub's (give or take the one in flight), whatever the client count
    assert 0 <= (after["xread"] - before["xread"]) - reads <= 1
    assert after["xrange"] == before["xrange"]  # live clients never read Redis themselves
    names = [client["name"] for client in await redis.client_list()]
    assert sum(name.startswith("streamsaga-progress-") for name in names) == 1


async def _calls(redis: Redis) -> dict[str, int]:
    stats = await redis.info("commandstats")
    return {command: int(stats.get(f"cmdstat_{command}", {}).get("calls", 0)) for command in ("xread", "xrange")}


async def test_stopping_the_controller_ends_open_streams_at_once(start: ControllerFactory) -> None:
    controller = await start()
    workflow_id = await controller.api.start_order()
    feed = await controller.stream("/v1/events")
    one = await controller.stream(f"/v1/workflows/{workflow_id}/events")
    await one.take(1)

    async with asyncio.timeout(5):  # not the server's 60 s wait for handlers that never finish
        await controller.server.close()

    assert await feed.rest() == []
    assert await one.rest() == []


# --- cursors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "positions",
    [
        [(0, 0)] * 4,
        [(1_747_000_000_123, 0), (1_747_000_000_999, 7), (0, 0), (1_746_000_000_000, 123_456)],
        [(1_000, 0), (999, 1), (1_001, 0), (1, 35)],
    ],
)
def test_a_cursor_decodes_to_the_positions_it_encodes(positions: list[tuple[int, int]]) -> None:
    cursor = encode_cursor(positions)

    assert decode_cursor(cursor, len(positions)) == positions
    assert len(cursor) <= 9 + len(positions) * 10


@pytest.mark.parametrize("text", ["", "abc", "1.0.0.0", "1.0.0.0.0.0", "1.0.0.0.zzzz", "1.0.0.0.A", "1.0.0.0.1_0"])
def test_a_malformed_cursor_is_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="cursor"):
        decode_cursor(text, 4)


async def test_the_cursor_is_short_for_busy_partitions(controller: Controller) -> None:
    stream = await controller.stream("/v1/events")
    await controller.api.start_order()

    [event] = await stream.take(1)

    assert event.id is not None
    assert len(event.id) < 40  # the time in seconds, then a few characters a partition
    assert len(decode_cursor(event.id, P)) == P
