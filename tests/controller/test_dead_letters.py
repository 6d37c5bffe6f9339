"""Dead letters end to end on a real Redis: every cause lands in the partition's
dead-letter stream with its reason, original fields and delivery count; the API
and ``streamsaga dlq`` list, show, filter, replay and purge them; and replaying a
fixed message completes its workflow."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from contracts import naming
from contracts.envelope import Envelope, WorkflowRef, encode, new_message_id, utcnow
from controller import dead_letters
from controller.app import create_app
from controller.cli import main
from controller.embedded_redis import free_port
from controller.settings import ControllerSettings
from participants.sdk import Message, Participant, Reply
from participants.sdk.commit import CommitScript
from participants.sdk.consumer import Entry, create_groups, dead_letter_commit
from tests.conftest import eventually
from tests.controller.test_api import Api, P, assert_problem
from tests.controller.test_cli import cli
from tests.participants.helpers import PARTITIONS, fast_settings, running

assert P == PARTITIONS  # the app and the participants under test must agree
CONSUMER = "dlq-tests"


@pytest.fixture
async def api(redis: Redis, redis_url: str) -> AsyncIterator[Api]:
    """The controller app (API and correlator) on a real socket."""
    settings = ControllerSettings(redis_url=redis_url, partitions=P, consumer=CONSUMER, block_ms=50)
    server = TestServer(create_app(settings), host="127.0.0.1")
    await server.start_server()
    try:
        async with ClientSession(base_url=str(server.make_url(""))) as session:
            client = Api(session, redis)
            await eventually(lambda: client.call("GET", "/readyz"), lambda r: r.status == 200, what="readiness")
            yield client
    finally:
        await server.close()


async def listed(api: Api, query: str = "") -> list[dict[str, Any]]:
    reply = await api.call("GET", f"/v1/dead-letters{query}")
    assert reply.status == 200, reply.body
    found: list[dict[str, Any]] = reply.body["dead_letters"]
    return found


async def until_listed(api: Api, count: int, query: str = "") -> list[dict[str, Any]]:
    return await eventually(lambda: listed(api, query), lambda found: len(found) == count, what=f"{count} dead letters")


def message(workflow_id: str, message_type: str, payload: dict[str, Any]) -> Envelope:
    return Envelope(
        message_id=new_message_id(),
        type=message_type,
        correlation_id=workflow_id,
        workflow=WorkflowRef(name="order"),
        producer="tests",
        occurred_at=utcnow(),
        payload=payload,
    )


def stream(workflow_id: str, message_type: str) -> str:
    return naming.message_stream(naming.partition_of(workflow_id, P), message_type)


async def add(redis: Redis, stream: str, fields: dict[str, str | bytes]) -> str:
    """XADD ``fields`` to ``stream``; the new entry's id."""
    entry_id = await redis.xadd(stream, dict[Any, Any](fields))
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


def text_fields(fields: dict[str, str | bytes]) -> dict[str, str]:
    return {name: value.decode() if isinstance(value, bytes) else value for name, value in fields.items()}


async def order_of(api: Api, workflow_id: str) -> dict[str, Any]:
    order: dict[str, Any] = (await api.workflow(workflow_id))["input"]["order"]
    return order


# --- what the controller dead-letters --------------------------------------------


@dataclass(frozen=True)
class Cause:
    """An entry the controller cannot apply: where it goes, its fields, and the reason it must get."""

    stream: str
    fields: dict[str, str | bytes]
    reason: Callable[[str], bool]
    type: str


def undecodable(workflow_id: str, order: dict[str, Any]) -> Cause:
    return Cause(
        stream(workflow_id, "PaymentCaptured"),
        {"type": "PaymentCaptured", "correlation_id": workflow_id, "message_id": "m-1", "envelope": "{not json"},
        lambda reason: reason.startswith("invalid envelope"),
        "PaymentCaptured",
    )


def invalid_payload(workflow_id: str, order: dict[str, Any]) -> Cause:
    declined = message(workflow_id, "PaymentDeclined", {"amount": "-1"})  # no reason, negative amount
    return Cause(
        stream(workflow_id, "PaymentDeclined"),
        encode(declined),
        lambda reason: reason.startswith("invalid PaymentDeclined payload at payload."),
        "PaymentDeclined",
    )


def no_such_workflow(workflow_id: str, order: dict[str, Any]) -> Cause:
    ghost = next(f"ghost-{i}" for i in range(100) if naming.partition_of(f"ghost-{i}", P) == 1)
    captured = message(ghost, "PaymentCaptured", {"order": order, "payment_id": "pay-1", "amount": "33.00"})
    return Cause(
        stream(ghost, "PaymentCaptured"),
        encode(captured),
        lambda reason: reason == f"no such workflow {ghost!r}",
        "PaymentCaptured",
    )


def type_not_of_the_stream(workflow_id: str, order: dict[str, Any]) -> Cause:
    captured = message(workflow_id, "PaymentCaptured", {"order": order, "payment_id": "pay-1", "amount": "33.00"})
    return Cause(
        stream(workflow_id, "ShipmentFailed"),
        encode(captured),
        lambda reason: reason == "type 'PaymentCaptured' does not belong on the ShipmentFailed stream",
        "PaymentCaptured",
    )


@pytest.mark.parametrize("cause", [undecodable, invalid_payload, no_such_workflow, type_not_of_the_stream])
async def test_the_controller_dead_letters_what_it_cannot_apply_with_reason_fields_and_deliveries_and_goes_on(
    api: Api, cause: Callable[[str, dict[str, Any]], Cause]
) -> None:
    workflow_id = await api.start_order()
    order = await order_of(api, workflow_id)
    bad = cause(workflow_id, order)
    source_id = await add(api.redis, bad.stream, bad.fields)

    [letter] = await until_listed(api, 1)

    assert bad.reason(letter["reason"]), letter["reason"]
    assert letter["partition"] == naming.partition_of_key(bad.stream)
    assert letter["id"].startswith(f"{letter['partition']}-")
    assert (letter["source_stream"], letter["source_id"]) == (bad.stream, source_id)
    assert (letter["group"], letter["consumer"], letter["deliveries"]) == (naming.CONTROLLER_GROUP, CONSUMER, 1)
    assert letter["fields"] == text_fields(bad.fields)
    assert letter["type"] == bad.type
    assert letter["correlation_id"] == text_fields(bad.fields)["correlation_id"]
    assert letter["links"]["self"] == f"/v1/dead-letters/{letter['id']}"
    shown = await api.call("GET", letter["links"]["self"])
    assert (shown.status, shown.body) == (200, letter)
    # acked, and the controller goes on with the next event
    assert (await api.redis.xpending(bad.stream, naming.CONTROLLER_GROUP))["pending"] == 0
    await api.emit(workflow_id, "PaymentCaptured", {"order": order, "payment_id": "pay-1", "amount": "33.00"})
    await eventually(
        lambda: api.workflow(workflow_id),
        lambda view: view["steps"][0]["status"] == "completed",
        what="the payment step completed",
    )


# --- what a worker dead-letters ------------------------------------------------------


async def test_a_worker_dead_letters_a_message_whose_handler_keeps_failing_after_max_deliveries(
    redis: Redis, redis_url: str
) -> None:
    attempts: list[int] = []
    flaky = Participant("flaky")

    @flaky.on("Ping")
    async def ping(msg: Message) -> None:
        attempts.append(msg.attempt)
        raise RuntimeError("card gateway down")

    ping_message = message("wf-1", "Ping", {"n": 1})
    sent = encode(ping_message)
    async with running(flaky, fast_settings(redis_url, max_deliveries=3)):
        source_id = await add(redis, stream("wf-1", "Ping"), sent)
        [letter] = await eventually(
            lambda: dead_letters.list_dead_letters(redis, P, limit=10), lambda found: len(found) == 1, what="a letter"
        )

    assert attempts == [1, 2, 3]
    assert letter.reason == "gave up after 3 deliveries: RuntimeError: card gateway down"
    assert letter.deliveries == 3
    assert (letter.group, letter.consumer) == ("flaky", "live")
    assert (letter.source_stream, letter.source_id) == (stream("wf-1", "Ping"), source_id)
    assert letter.partition == naming.partition_of("wf-1", P)
    assert (letter.type, letter.correlation_id, letter.message_id) == ("Ping", "wf-1", ping_message.message_id)
    assert letter.fields == text_fields(sent)
    assert await dead_letters.get(redis, letter.id) == letter
    assert (await redis.xpending(letter.source_stream, "flaky"))["pending"] == 0


# --- replay ------------------------------------------------------------------------


async def test_replaying_a_fixed_message_completes_its_workflow(api: Api, redis_url: str) -> None:
    fixed = False
    gateway = Participant("gateway")

    @gateway.on("OrderSubmitted")
    async def capture(msg: Message) -> Reply:
        if not fixed:
            raise RuntimeError("payment gateway unreachable")
        return Reply("PaymentCaptured", {"order": msg.payload["order"], "payment_id": "pay-1", "amount": "33.00"})

    async with running(gateway, fast_settings(redis_url, max_deliveries=2)):
        workflow_id = await api.start_order()
        [letter] = await until_listed(api, 1, "?group=gateway")
        assert letter["reason"] == "gave up after 2 deliveries: RuntimeError: payment gateway unreachable"
        assert (letter["type"], letter["correlation_id"], letter["deliveries"]) == ("OrderSubmitted", workflow_id, 2)
        assert (await api.workflow(workflow_id))["steps"][0]["status"] == "running"

        fixed = True
        reply = await api.call("POST", f"/v1/dead-letters/{letter['id']}/replay")

        assert reply.status == 202, reply.body
        assert reply.body["stream"] == letter["source_stream"]
        assert reply.body["entry_id"] != letter["source_id"]
        assert (reply.body["correlation_id"], reply.body["message_id"]) == (workflow_id, letter["message_id"])
        assert reply.body["links"]["workflow"] == f"/v1/workflows/{workflow_id}"
        entries: Any = await api.redis.xrange(reply.body["stream"], min=reply.body["entry_id"], max="+")
        [(_, fields)] = entries
        assert text_fields({k.decode(): v for k, v in fields.items()}) == letter["fields"]
        await eventually(
            lambda: api.workflow(workflow_id),
            lambda view: view["steps"][0]["status"] == "completed",
            what="payment completed by the replayed message",
        )
    assert_problem(await api.call("GET", f"/v1/dead-letters/{letter['id']}"), 404, "id")
    assert await listed(api) == []
    order = await order_of(api, workflow_id)
    await api.emit(workflow_id, "InventoryReserved", {"order": order, "reservation_id": "res-1"})
    await api.emit(workflow_id, "ShipmentScheduled", {"order": order, "shipment_id": "shp-1"})
    await api.emit(workflow_id, "CustomerNotified", {"customer_id": order["customer_id"]})
    view = await api.until_status(workflow_id, "completed")
    assert view["steps"][0]["result"]["payment_id"] == "pay-1"


async def test_a_dead_letter_that_could_not_stand_on_its_stream_is_not_replayed(api: Api) -> None:
    bad_stream = naming.message_stream(0, "PaymentCaptured")
    await api.redis.xadd(bad_stream, {"type": "PaymentCaptured", "envelope": "{}"})
    [letter] = await until_listed(api, 1)

    reply = await api.call("POST", f"/v1/dead-letters/{letter['id']}/replay")

    assert_problem(reply, 409, "id")
    assert "lacks the fields correlation_id, message_id" in reply.body["detail"]
    assert await listed(api) == [letter]
    assert await api.redis.xlen(bad_stream) == 1


async def test_replay_refuses_a_dead_letter_whose_type_does_not_belong_on_its_source_stream(redis: Redis) -> None:
    [letter] = await write_letters(redis, [("wf-1", "ShipmentFailed", "controller")], type_field="PaymentCaptured")

    with pytest.raises(dead_letters.NotReplayable, match="'PaymentCaptured' does not belong on the ShipmentFailed"):
        await dead_letters.replay(redis, letter.id, partitions=P)
    assert await dead_letters.get(redis, letter.id) == letter


# --- listing, filtering, purging ---------------------------------------------------


async def write_letters(
    redis: Redis, specs: list[tuple[str, str, str]], *, type_field: str | None = None
) -> list[dead_letters.DeadLetter]:
    """One dead letter per (workflow id, type, group), oldest first, each in a later
    millisecond than the one before; written the way every consumer writes them."""
    script = CommitScript()
    written = []
    for workflow_id, message_type, group in specs:
        fields = encode(message(workflow_id, type_field or message_type, {}))
        source = stream(workflow_id, message_type)
        source_id = await add(redis, source, fields)
        # held by the consumer that gives up on it, as a dead-lettered entry always is
        await create_groups(redis, [(source, group)])
        await redis.xclaim(source, group, "c-1", 0, [source_id], force=True, justid=True)
        raw = {name.encode(): value if isinstance(value, bytes) else value.encode() for name, value in fields.items()}
        entry = Entry(source, source_id, raw)
        await next_ms(redis)
        await script.run(redis, [dead_letter_commit(entry, group, "c-1", f"{group} gave up on {message_type}")])
        [newest] = await dead_letters.list_dead_letters(redis, P, limit=1)
        written.append(newest)
    return written


async def server_ms(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def next_ms(redis: Redis) -> None:
    """Wait until the server's clock has moved on by a millisecond, so entries added next sort after all before."""
    before = await server_ms(redis)
    await eventually(lambda: server_ms(redis), lambda now: now > before, interval=0.001, what="the next ms")


def in_partition(p: int, prefix: str = "wf") -> str:
    return next(f"{prefix}-{i}" for i in range(1000) if naming.partition_of(f"{prefix}-{i}", P) == p)


async def test_the_list_is_newest_first_across_partitions_and_filters_by_group_type_and_workflow(api: Api) -> None:
    a, b, c = in_partition(2, "a"), in_partition(0, "b"), in_partition(3, "c")
    written = await write_letters(
        api.redis,
        [(a, "Ping", "controller"), (b, "Pong", "payment"), (c, "Ping", "inventory")],  # streams no consumer reads
    )
    newest_first = [letter.id for letter in reversed(written)]

    def ids(found: list[dict[str, Any]]) -> list[str]:
        return [letter["id"] for letter in found]

    assert ids(await listed(api)) == newest_first
    assert [int(i.split("-")[0]) for i in newest_first] == [3, 0, 2]
    assert ids(await listed(api, "?limit=2")) == newest_first[:2]
    assert ids(await listed(api, "?group=payment")) == [written[1].id]
    assert ids(await listed(api, "?type=Ping")) == [written[2].id, written[0].id]
    assert ids(await listed(api, f"?workflow_id={a}")) == [written[0].id]
    assert ids(await listed(api, f"?type=Ping&group=controller&workflow_id={a}")) == [written[0].id]
    assert await listed(api, "?group=nobody") == []


async def test_a_filter_finds_a_match_behind_a_page_of_others(redis: Redis) -> None:
    [match] = await write_letters(redis, [(in_partition(0), "PaymentCaptured", "payment")])
    others = range(dead_letters.MAX_SCAN_PAGE + 10)  # newer letters of another group, in the same partition
    async with redis.pipeline(transaction=False) as pipe:
        for i in others:
            fields: dict[Any, Any] = {"reason": "x", "source_stream": naming.message_stream(0, "Ping")}
            pipe.xadd(
                naming.dead_letter_stream(0), {**fields, "source_id": f"1-{i}", "group": "noise", "f:type": "Ping"}
            )
        await pipe.execute()

    found = await dead_letters.list_dead_letters(redis, P, limit=1, group="payment")

    assert found == [match]
    assert len(await dead_letters.list_dead_letters(redis, P, limit=1000)) == len(others) + 1


async def test_delete_removes_one_dead_letter_and_purge_removes_the_old_ones_then_all(api: Api) -> None:
    old, kept = await write_letters(api.redis, [("wf-1", "Ping", "echo"), ("wf-2", "Ping", "echo")])

    deleted = await api.call("DELETE", f"/v1/dead-letters/{kept.id}")
    assert (deleted.status, deleted.body) == (204, None)
    assert_problem(await api.call("DELETE", f"/v1/dead-letters/{kept.id}"), 404, "id")
    assert [letter["id"] for letter in await listed(api)] == [old.id]

    old_ms = int(old.id.split("-")[1])
    await eventually(lambda: server_ms(api.redis), lambda now: now >= old_ms + 1000, what="a second to pass")
    [new] = await write_letters(api.redis, [("wf-3", "Ping", "echo")])
    purged = await api.call("POST", "/v1/dead-letters/purge", json={"older_than_s": 0.5})
    assert (purged.status, purged.body) == (200, {"purged": 1})
    assert [letter["id"] for letter in await listed(api)] == [new.id]

    everything = await api.call("POST", "/v1/dead-letters/purge")
    assert (everything.status, everything.body) == (200, {"purged": 1})
    assert await listed(api) == []


async def test_purge_by_ids_skips_ids_of_no_dead_letter(redis: Redis) -> None:
    first, second = await write_letters(redis, [("wf-1", "Ping", "echo"), ("wf-2", "Ping", "echo")])

    assert await dead_letters.purge(redis, P, ids=[first.id, first.id, "3-1-0"]) == 1
    assert await dead_letters.list_dead_letters(redis, P, limit=10) == [second]
    with pytest.raises(dead_letters.InvalidDeadLetterId):
        await dead_letters.purge(redis, P, ids=[second.id, "not-an-id"])
    assert await dead_letters.list_dead_letters(redis, P, limit=10) == [second]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "field"),
    [
        ("GET", "/v1/dead-letters/not-an-id", None, 422, "id"),
        ("GET", "/v1/dead-letters/1-2", None, 422, "id"),
        ("GET", "/v1/dead-letters/0-1-0", None, 404, "id"),
        ("GET", "/v1/dead-letters/99-1-0", None, 404, "id"),
        ("POST", "/v1/dead-letters/x/replay", None, 422, "id"),
        ("POST", "/v1/dead-letters/0-1-0/replay", None, 404, "id"),
        ("DELETE", "/v1/dead-letters/0-1-0", None, 404, "id"),
        ("DELETE", "/v1/dead-letters/0-1-x", None, 422, "id"),
        ("GET", "/v1/dead-letters?limit=0", None, 422, "limit"),
        ("GET", "/v1/dead-letters?limit=1001", None, 422, "limit"),
        ("GET", "/v1/dead-letters?group=", None, 422, "group"),
        ("POST", "/v1/dead-letters/purge", {"older_than_s": -1}, 422, "older_than_s"),
        ("POST", "/v1/dead-letters/purge", {"older_than_s": "soon"}, 422, "older_than_s"),
        ("POST", "/v1/dead-letters/purge", {"ids": ["0-1-0"]}, 422, "ids"),
        ("POST", "/v1/dead-letters/purge", [], 422, "body"),
    ],
)
async def test_bad_dead_letter_requests_are_problems_naming_the_field(
    api: Api, method: str, path: str, body: Any, status: int, field: str
) -> None:
    reply = await api.call(method, path, json=body)
    assert_problem(reply, status, field)
    assert reply.body["title"] in {"Invalid input", "Dead letter not found"}


# --- streamsaga dlq ------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def dlq(capsys: pytest.CaptureFixture[str], redis_url: str, *args: str) -> tuple[int, str, str]:
    """``streamsaga dlq ARGS`` in this process (in a thread: it runs its own event loop)."""
    capsys.readouterr()
    code = await asyncio.to_thread(
        main, ["dlq", *args[:1], "--redis-url", redis_url, "--partitions", str(P), *args[1:]]
    )
    out, err = capsys.readouterr()
    return code, out, err


async def test_dlq_list_prints_a_table_newest_first_and_json_like_the_api(
    redis: Redis, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    older, newer = await write_letters(redis, [("wf-1", "Ping", "echo"), ("wf-2", "OrderSubmitted", "payment")])

    code, out, _ = await dlq(capsys, redis_url, "list")
    assert code == 0
    header, rule, first, second = out.splitlines()
    assert header.split() == ["ID", "FAILED", "AT", "(UTC)", "TRIES", "GROUP", "TYPE", "WORKFLOW", "REASON"]
    assert set(rule) <= {"-", " "}
    assert first.split()[0] == newer.id
    assert first.split()[3:] == [
        "1",
        "payment",
        "OrderSubmitted",
        "wf-2",
        "payment",
        "gave",
        "up",
        "on",
        "OrderSubmitted",
    ]
    assert second.split()[0] == older.id

    code, out, _ = await dlq(capsys, redis_url, "list", "--group", "echo", "--json")
    assert code == 0
    assert orjson.loads(out) == {"dead_letters": [older.model_dump(mode="json")]}

    code, out, _ = await dlq(capsys, redis_url, "list", "--workflow", "nobody")
    assert (code, out) == (0, "no dead letters match\n")


async def test_dlq_show_prints_every_field_and_the_envelope_indented(
    redis: Redis, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    [letter] = await write_letters(redis, [("wf-1", "Ping", "echo")])

    code, out, _ = await dlq(capsys, redis_url, "show", letter.id)

    assert code == 0
    assert f"id:           {letter.id}" in out
    assert "reason:       echo gave up on Ping" in out
    assert f"source:       {letter.source_stream} entry {letter.source_id}" in out
    assert "given up by:  group echo, consumer c-1" in out
    assert "  type: Ping" in out
    assert '  envelope: {\n    "message_id"' in out
    code, out, _ = await dlq(capsys, redis_url, "show", letter.id, "--json")
    assert orjson.loads(out) == letter.model_dump(mode="json")

    code, _, err = await dlq(capsys, redis_url, "show", "0-1-0")
    assert code == 1
    assert "no dead letter '0-1-0'" in err
    code, _, err = await dlq(capsys, redis_url, "show", "nope")
    assert code == 2
    assert "'nope' is not a dead letter id" in err


async def test_dlq_replay_sends_each_back_and_reports_the_ones_it_cannot(
    redis: Redis, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    good, wrong = await write_letters(redis, [("wf-1", "Ping", "echo"), ("wf-2", "Ping", "echo")])
    await dead_letters.purge(redis, P, ids=[wrong.id])  # gone by the time it is replayed

    code, out, err = await dlq(capsys, redis_url, "replay", good.id, wrong.id)

    assert code == 1
    [line] = out.splitlines()
    assert line.startswith(f"replayed {good.id} to {good.source_stream} as ")
    new_id = line.rsplit(" ", 1)[1]
    entries: Any = await redis.xrange(good.source_stream, min=new_id, max=new_id)
    assert {k.decode(): v.decode() for k, v in entries[0][1].items()} == good.fields
    assert f"no dead letter {wrong.id!r}" in err
    assert await dead_letters.list_dead_letters(redis, P, limit=10) == []

    code, _, err = await dlq(capsys, redis_url, "replay", good.id, "bad")
    assert code == 2
    assert "nothing replayed" in err


async def test_dlq_replay_sends_a_workflows_letters_back_oldest_first_whatever_order_they_are_given_in(
    redis: Redis, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # the events of one workflow, the last its step's deadline, dead-lettered in that order
    letters = await write_letters(
        redis, [("wf-1", "InventoryReserved", "controller"), ("wf-1", "ShipmentScheduled", "controller"),
                ("wf-1", "TimerFired", "controller")]
    )  # fmt: skip
    newest_first = [letter.id for letter in await dead_letters.list_dead_letters(redis, P, limit=10)]
    assert newest_first == [letter.id for letter in reversed(letters)]  # as `dlq list` shows them

    code, out, _ = await dlq(capsys, redis_url, "replay", *newest_first)

    assert code == 0
    assert [line.split()[1] for line in out.splitlines()] == [letter.id for letter in letters]


async def test_dlq_replay_orders_a_letter_without_source_id_by_its_own_id(
    redis: Redis, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    [written] = await write_letters(redis, [("wf-1", "Ping", "echo")])
    by_hand: dict[Any, Any] = {**{f"f:{name}": value for name, value in written.fields.items()}, "reason": "by hand"}
    by_hand["source_stream"] = written.source_stream  # and no source_id
    await redis.xadd(naming.dead_letter_stream(written.partition), by_hand)
    [hand, _] = await dead_letters.list_dead_letters(redis, P, limit=10)

    code, out, err = await dlq(capsys, redis_url, "replay", hand.id, written.id)

    assert (code, err) == (0, "")
    assert [line.split()[1] for line in out.splitlines()] == [written.id, hand.id]


async def test_dlq_purge_asks_on_a_terminal_and_refuses_elsewhere_without_yes(
    redis: Redis, redis_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second, third = await write_letters(
        redis, [("wf-1", "Ping", "echo"), ("wf-2", "Ping", "echo"), ("wf-3", "Ping", "echo")]
    )

    code, _, err = await dlq(capsys, redis_url, "purge", "--all")  # pytest's stdin is not a terminal
    assert code == 2
    assert "refusing to purge every dead letter of 4 partitions without --yes" in err

    monkeypatch.setattr("sys.stdin", _Terminal("n\n"))
    code, out, err = await dlq(capsys, redis_url, "purge", first.id)
    assert code == 1
    assert "Purge 1 dead letter from" in out
    assert "nothing purged" in err

    monkeypatch.setattr("sys.stdin", _Terminal("y\n"))
    code, out, _ = await dlq(capsys, redis_url, "purge", first.id)
    assert code == 0
    assert out.endswith("purged 1 dead letter\n")
    assert [letter.id for letter in await dead_letters.list_dead_letters(redis, P, limit=10)] == [third.id, second.id]

    code, out, _ = await dlq(capsys, redis_url, "purge", "--older-than", "3600", "--yes")
    assert (code, out) == (0, "purged 0 dead letters\n")
    code, out, _ = await dlq(capsys, redis_url, "purge", "--all", "--yes")
    assert (code, out) == (0, "purged 2 dead letters\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "give exactly one of --all, IDs or --older-than"),
        (("--all", "0-1-0"), "give exactly one of --all, IDs or --older-than, not --all and ID"),
        (("--older-than", "5", "--all"), "not --all and --older-than"),
        (("bad-id", "--yes"), "'bad-id' is not a dead letter id"),
    ],
)
async def test_dlq_purge_wants_exactly_one_selection(
    redis_url: str, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], message: str
) -> None:
    code, _, err = await dlq(capsys, redis_url, "purge", *args)
    assert code == 2
    assert message in err


async def test_dlq_runs_as_a_command_and_reports_a_redis_it_cannot_reach(redis: Redis, redis_url: str) -> None:
    [letter] = await write_letters(redis, [("wf-1", "Ping", "echo")])

    run = await cli("dlq", "list", "--redis-url", redis_url, "--partitions", str(P))
    assert run.returncode == 0, run.stderr
    assert letter.id in run.stdout

    run = await cli("dlq", "purge", "--all", "--redis-url", redis_url, "--partitions", str(P))  # stdin is a pipe
    assert run.returncode == 2
    assert await dead_letters.get(redis, letter.id) == letter

    run = await cli("dlq", "list", "--redis-url", f"redis://127.0.0.1:{free_port()}/0")
    assert run.returncode == 1
    assert "streamsaga dlq list: cannot use Redis at" in run.stderr
