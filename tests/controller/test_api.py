"""The HTTP API over a real socket, with the correlator running inside the app on a real Redis."""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer
from multidict import CIMultiDictProxy
from redis.asyncio import Redis

from contracts import naming
from contracts.definitions import ORDER_SAGA, StepDefinition, WorkflowDefinition
from contracts.envelope import Envelope, WorkflowRef, decode, encode, new_message_id, utcnow
from contracts.messages import PAYLOADS
from controller.app import create_app
from controller.definitions import Definitions, NoDefinitions
from controller.embedded_redis import free_port
from controller.settings import ControllerSettings
from tests.conftest import definitions_file, eventually
from tests.faults import RedisProxy, refusing_writes

P = 4
ORDER: dict[str, Any] = {
    "customer_id": "c-1",
    "items": [
        {"sku": "BOOK-1", "quantity": 2, "unit_price": "12.50"},
        {"sku": "MUG-1", "quantity": 1, "unit_price": "8.00"},
    ],
    "currency": "USD",
    "ship_to": {"country": "us", "city": "Boston"},
}
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
GREETING = WorkflowDefinition(
    name="greeting",
    start="GreetingRequested",
    steps=(StepDefinition(name="greet", participant="greeter", trigger="GreetingRequested", completed="Greeted"),),
)


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: Any

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "").split(";")[0]


class Api:
    """A client of the app under test, over a real socket."""

    def __init__(self, session: ClientSession, redis: Redis) -> None:
        self.session = session
        self.redis = redis

    async def call(
        self, method: str, path: str, *, json: Any = None, data: Any = None, headers: dict[str, str] | None = None
    ) -> Reply:
        if json is not None:
            data = orjson.dumps(json)
            headers = {"Content-Type": "application/json", **(headers or {})}
        async with self.session.request(method, path, data=data, headers=headers) as response:
            raw = await response.read()
            return Reply(response.status, response.headers, orjson.loads(raw) if raw else None)

    async def start_order(self, order: dict[str, Any] = ORDER, headers: dict[str, str] | None = None) -> str:
        reply = await self.call("POST", "/v1/orders", json=order, headers=headers)
        assert reply.status == 202, reply.body
        workflow_id: str = reply.body["workflow_id"]
        return workflow_id

    async def workflow(self, workflow_id: str) -> dict[str, Any]:
        reply = await self.call("GET", f"/v1/workflows/{workflow_id}")
        assert reply.status == 200, reply.body
        view: dict[str, Any] = reply.body
        return view

    async def until_status(self, workflow_id: str, status: str) -> dict[str, Any]:
        return await eventually(
            lambda: self.workflow(workflow_id), lambda view: view["status"] == status, what=f"status {status}"
        )

    async def emit(self, workflow_id: str, message_type: str, payload: dict[str, Any], workflow: str = "order") -> None:
        """What a participant does: publish an event on its type's stream in the workflow's partition."""
        envelope = Envelope(
            message_id=new_message_id(),
            type=message_type,
            correlation_id=workflow_id,
            workflow=WorkflowRef(name=workflow),
            producer="tests",
            occurred_at=utcnow(),
            payload=payload,
        )
        stream = naming.message_stream(naming.partition_of(workflow_id, P), message_type)
        await self.redis.xadd(stream, encode(envelope))  # type: ignore[arg-type]

    async def complete_order(self, workflow_id: str) -> dict[str, Any]:
        order = (await self.workflow(workflow_id))["input"]["order"]
        await self.emit(workflow_id, "PaymentCaptured", {"order": order, "payment_id": "pay-1", "amount": "33.00"})
        await self.emit(workflow_id, "InventoryReserved", {"order": order, "reservation_id": "res-1"})
        await self.emit(workflow_id, "ShipmentScheduled", {"order": order, "shipment_id": "shp-1"})
        await self.emit(workflow_id, "CustomerNotified", {"customer_id": order["customer_id"]})
        return await self.until_status(workflow_id, "completed")


ApiFactory = Callable[[ControllerSettings], Awaitable[Api]]


@pytest.fixture
async def serve(redis: Redis, redis_url: str) -> AsyncIterator[ApiFactory]:
    """Start the app on 127.0.0.1 with given settings; stopped (correlator and clients) after the test."""
    servers: list[TestServer] = []
    sessions: list[ClientSession] = []

    async def start(settings: ControllerSettings) -> Api:
        server = TestServer(create_app(settings), host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        session = ClientSession(base_url=str(server.make_url("")))
        sessions.append(session)
        return Api(session, redis)

    try:
        yield start
    finally:
        for session in sessions:
            await session.close()
        for server in servers:
            await server.close()


def settings(redis_url: str, **changes: Any) -> ControllerSettings:
    return ControllerSettings(redis_url=redis_url, partitions=P, consumer="api-tests", block_ms=50, **changes)


@pytest.fixture
async def api(serve: ApiFactory, redis_url: str) -> Api:
    return await ready(await serve(settings(redis_url)))


@pytest.fixture
async def proxied(serve: ApiFactory, redis_url: str) -> AsyncIterator[tuple[Api, RedisProxy]]:
    """The app, ready, reaching the test's Redis through a proxy that can fail (tests/faults.py)."""
    async with RedisProxy(redis_url) as proxy:
        yield await ready(await serve(settings(proxy.url))), proxy


async def ready(client: Api) -> Api:
    await eventually(lambda: client.call("GET", "/readyz"), lambda r: r.status == 200, what="readiness")
    return client


def changed(path: str, value: Any) -> dict[str, Any]:
    """ORDER with the field at a dotted path set to ``value``."""
    order = copy.deepcopy(ORDER)
    *parents, last = path.split(".")
    node: Any = order
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return order


def without(name: str) -> dict[str, Any]:
    order = copy.deepcopy(ORDER)
    del order[name]
    return order


def assert_problem(reply: Reply, status: int, field: str | None) -> None:
    assert reply.status == status, reply.body
    assert reply.content_type == "application/problem+json"
    problem = reply.body
    assert problem["status"] == status
    assert problem["type"].startswith("urn:streamsaga:problem:")
    assert problem["title"]
    assert problem["detail"]
    assert problem["field"] == field
    if field is not None:
        assert problem["errors"][0]["field"] == field
        assert problem["errors"][0]["message"]


def at(text: str | None) -> datetime:
    assert text is not None
    return datetime.fromisoformat(text)


# --- starting an order --------------------------------------------------------------


async def test_posting_an_order_answers_202_with_its_location_and_the_workflow_shows_its_steps(api: Api) -> None:
    reply = await api.call("POST", "/v1/orders", json=ORDER)

    assert reply.status == 202
    workflow_id = reply.body["workflow_id"]
    assert reply.headers["Location"] == f"/v1/workflows/{workflow_id}"
    assert reply.body["status"] == "running"
    assert reply.body["links"]["self"] == reply.headers["Location"]
    assert "Idempotent-Replayed" not in reply.headers

    view = (await api.call("GET", reply.headers["Location"])).body
    assert view["workflow_id"] == workflow_id
    assert view["workflow"] == {"name": "order", "version": 1}
    assert view["status"] == "running"
    assert view["input"]["order"]["ship_to"]["country"] == "US"  # the order as validated
    steps = {step["name"]: step for step in view["steps"]}
    assert list(steps) == ["payment", "inventory", "shipping", "notification"]
    assert steps["payment"]["status"] == "running"
    assert at(steps["payment"]["started_at"]) >= at(view["created_at"])
    assert steps["inventory"] == steps["inventory"] | {"status": "pending", "started_at": None, "finished_at": None}


async def test_participant_events_drive_the_order_to_completed_with_step_timestamps(api: Api) -> None:
    workflow_id = await api.start_order()

    view = await api.complete_order(workflow_id)

    assert view["error"] is None
    assert at(view["finished_at"]) >= at(view["created_at"])
    for step in view["steps"]:
        assert step["status"] == "completed"
        assert at(step["started_at"]) <= at(step["finished_at"])
    assert view["steps"][0]["result"]["payment_id"] == "pay-1"


async def test_history_lists_every_message_oldest_first(api: Api) -> None:
    workflow_id = await api.start_order()
    await api.complete_order(workflow_id)

    reply = await api.call("GET", f"/v1/workflows/{workflow_id}/history")

    assert reply.status == 200
    events = reply.body["events"]
    assert [(e["direction"], e["type"]) for e in events] == [
        ("out", "OrderSubmitted"),
        ("in", "PaymentCaptured"),
        ("in", "InventoryReserved"),
        ("in", "ShipmentScheduled"),
        ("in", "CustomerNotified"),
    ]
    assert [e["seq"] for e in events] == list(range(len(events)))
    moments = [at(e["at"]) for e in events]
    assert moments == sorted(moments)
    assert events[-1]["status"] == "completed"


async def test_list_filters_by_status_and_honours_limit(api: Api) -> None:
    done = await api.start_order()
    running = await api.start_order()
    await api.complete_order(done)

    def ids(reply: Reply) -> list[str]:
        assert reply.status == 200, reply.body
        return [w["workflow_id"] for w in reply.body["workflows"]]

    assert ids(await api.call("GET", "/v1/workflows?status=completed")) == [done]
    assert ids(await api.call("GET", "/v1/workflows?status=running")) == [running]
    assert ids(await api.call("GET", "/v1/workflows")) == [done, running]  # newest update first
    assert len(ids(await api.call("GET", "/v1/workflows?limit=1"))) == 1


@pytest.mark.parametrize(("query", "field"), [("status=bogus", "status"), ("limit=0", "limit"), ("limit=x", "limit")])
async def test_list_rejects_an_unknown_status_or_a_bad_limit(api: Api, query: str, field: str) -> None:
    assert_problem(await api.call("GET", f"/v1/workflows?{query}"), 422, field)


# --- idempotency --------------------------------------------------------------------


async def test_the_same_idempotency_key_and_body_replays_the_same_workflow(api: Api) -> None:
    first = await api.call("POST", "/v1/orders", json=ORDER, headers={"Idempotency-Key": "order-42"})
    again = await api.call("POST", "/v1/orders", json=ORDER, headers={"Idempotency-Key": "order-42"})

    assert first.status == again.status == 202
    assert again.body["workflow_id"] == first.body["workflow_id"]
    assert again.headers["Location"] == first.headers["Location"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert len((await api.call("GET", "/v1/workflows")).body["workflows"]) == 1


async def test_the_same_idempotency_key_with_another_body_is_a_conflict(api: Api) -> None:
    key = {"Idempotency-Key": "order-43"}
    await api.start_order(headers=key)

    reply = await api.call("POST", "/v1/orders", json=changed("currency", "EUR"), headers=key)

    assert_problem(reply, 409, "Idempotency-Key")


async def test_concurrent_requests_with_one_idempotency_key_start_one_workflow(api: Api) -> None:
    key = {"Idempotency-Key": "order-44"}
    replies = await asyncio.gather(
        *(api.call("POST", "/v1/orders", json=ORDER, headers=key) for _ in range(6)),
        api.call("POST", "/v1/orders", json=changed("currency", "EUR"), headers=key),
        *(api.call("POST", "/v1/orders", json=ORDER) for _ in range(3)),
    )

    same, other, fresh = replies[:6], replies[6], replies[7:]
    assert [r.status for r in same] == [202] * 6
    assert len({r.body["workflow_id"] for r in same}) == 1
    assert sorted(r.headers.get("Idempotent-Replayed", "") for r in same) == [""] + ["true"] * 5
    assert_problem(other, 409, "Idempotency-Key")
    assert [r.status for r in fresh] == [202] * 3
    assert len({r.body["workflow_id"] for r in [*fresh, same[0]]}) == 4
    assert len((await api.call("GET", "/v1/workflows")).body["workflows"]) == 4


async def test_an_unusable_idempotency_key_is_rejected(api: Api) -> None:
    reply = await api.call("POST", "/v1/orders", json=ORDER, headers={"Idempotency-Key": "k" * 201})
    assert_problem(reply, 422, "Idempotency-Key")


@pytest.mark.parametrize("path", ["/v1/orders", "/v1/workflows/order"])
async def test_one_answer_lists_what_is_wrong_in_the_body_the_headers_and_the_query(api: Api, path: str) -> None:
    bad = changed("items.0.quantity", 0)
    body = {"order": bad} if path.endswith("/order") else bad  # the start event's payload, or the order
    reply = await api.call("POST", f"{path}?sla_seconds=-1", json=body, headers={"Idempotency-Key": "k" * 201})

    assert_problem(reply, 422, "order.items.0.quantity" if path.endswith("/order") else "items.0.quantity")
    assert [error["field"] for error in reply.body["errors"]][1:] == ["Idempotency-Key", "sla_seconds"]


# --- bad input ----------------------------------------------------------------------

BAD_ORDERS = [
    pytest.param(without("customer_id"), "customer_id", id="missing field"),
    pytest.param(changed("customer_id", 7), "customer_id", id="wrong-typed field"),
    pytest.param(changed("items.0.quantity", "many"), "items.0.quantity", id="wrong-typed quantity"),
    pytest.param(changed("items.0.quantity", 0), "items.0.quantity", id="zero quantity"),
    pytest.param(changed("items.1.quantity", -3), "items.1.quantity", id="negative quantity"),
    pytest.param(changed("items.1.unit_price", "-0.01"), "items.1.unit_price", id="negative price"),
    pytest.param(changed("currency", "XYZ"), "currency", id="unknown currency"),
    pytest.param(changed("items", []), "items", id="empty items"),
    pytest.param(changed("ship_to", "US"), "ship_to", id="wrong-typed object"),
    pytest.param(changed("colour", "red"), "colour", id="unknown field"),
    pytest.param(changed("items.0.colour", "red"), "items.0.colour", id="unknown field in an item"),
    pytest.param(changed("ship_to.colour", "red"), "ship_to.colour", id="unknown field in the address"),
    pytest.param([ORDER], "body", id="not an object"),
]


@pytest.mark.parametrize(("body", "field"), BAD_ORDERS)
async def test_an_invalid_order_is_422_naming_the_field(api: Api, body: Any, field: str) -> None:
    reply = await api.call("POST", "/v1/orders", json=body)

    assert_problem(reply, 422, field)
    assert (await api.call("GET", "/v1/workflows")).body["workflows"] == []


async def test_every_invalid_field_is_listed(api: Api) -> None:
    body = changed("currency", "XYZ") | {"customer_id": ""}

    reply = await api.call("POST", "/v1/orders", json=body)

    assert_problem(reply, 422, "customer_id")
    assert [e["field"] for e in reply.body["errors"]] == ["customer_id", "currency"]
    assert "unknown currency 'XYZ'" in reply.body["errors"][1]["message"]


@pytest.mark.parametrize("raw", [b"{", b"", b"\xff", b'{"customer_id": }'])
async def test_malformed_json_is_400_naming_the_body(api: Api, raw: bytes) -> None:
    reply = await api.call("POST", "/v1/orders", data=raw, headers={"Content-Type": "application/json"})
    assert_problem(reply, 400, "body")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
async def test_a_body_that_is_not_json_is_415(api: Api, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else None
    reply = await api.call("POST", "/v1/orders", data=orjson.dumps(ORDER), headers=headers)
    assert_problem(reply, 415, "Content-Type")


async def test_a_body_over_one_mebibyte_is_413(api: Api) -> None:
    big = changed("customer_id", "x" * (1 << 20))

    reply = await api.call("POST", "/v1/orders", json=big)

    assert_problem(reply, 413, "body")


async def test_a_streamed_body_over_one_mebibyte_is_413(api: Api) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):  # no Content-Length: the size is found while reading
            yield b" " * (1 << 19)

    reply = await api.call("POST", "/v1/orders", data=chunks(), headers={"Content-Type": "application/json"})

    assert_problem(reply, 413, "body")


# --- not found ----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/workflows/no-such-id", "/v1/workflows/no-such-id/history"])
async def test_an_unknown_workflow_is_404(api: Api, path: str) -> None:
    assert_problem(await api.call("GET", path), 404, "id")


@pytest.mark.parametrize("request_name", ["cancel", "retry"])
async def test_an_operator_request_for_an_unknown_workflow_is_404(api: Api, request_name: str) -> None:
    reply = await api.call("POST", f"/v1/workflows/no-such-id/{request_name}", json={"by": "ops"})

    assert_problem(reply, 404, "id")


async def test_an_operator_request_the_workflow_state_does_not_allow_is_409(api: Api) -> None:
    workflow_id = await api.start_order()
    await api.complete_order(workflow_id)

    reply = await api.call("POST", f"/v1/workflows/{workflow_id}/cancel", json={"by": "ops"})

    assert_problem(reply, 409, "id")
    assert (await api.call("GET", f"/v1/workflows/{workflow_id}")).body["status"] == "completed"


async def test_an_unknown_workflow_definition_is_404(api: Api) -> None:
    reply = await api.call("POST", "/v1/workflows/no-such-saga", json={})

    assert_problem(reply, 404, "name")
    assert reply.body["title"] == "Workflow definition not found"


async def test_an_unknown_route_is_a_404_problem(api: Api) -> None:
    reply = await api.call("GET", "/v2/orders")

    assert_problem(reply, 404, None)
    assert reply.body["instance"] == "/v2/orders"


async def test_a_wrong_method_is_a_405_problem_with_allow(api: Api) -> None:
    reply = await api.call("DELETE", "/v1/orders")

    assert_problem(reply, 405, None)
    assert reply.headers["Allow"] == "POST"


# --- generic start ------------------------------------------------------------------


async def test_a_workflow_starts_by_name_with_its_start_payload(api: Api) -> None:
    reply = await api.call("POST", "/v1/workflows/order", json={"order": ORDER})

    assert reply.status == 202
    view = await api.workflow(reply.body["workflow_id"])
    assert view["workflow"]["name"] == "order"
    assert view["input"] == {"order": ORDER}  # the payload as sent


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"order": changed("items.0.quantity", 0)}, "order.items.0.quantity"),
        ({"order": without("currency")}, "order.currency"),
        ({}, "order"),
        (["not", "an", "object"], "body"),
    ],
)
async def test_a_start_payload_that_does_not_fit_its_type_is_422(api: Api, body: Any, field: str) -> None:
    assert_problem(await api.call("POST", "/v1/workflows/order", json=body), 422, field)


async def test_a_loaded_definition_starts_with_any_object_and_is_correlated(
    serve: ApiFactory, redis_url: str, tmp_path: Path
) -> None:
    api = await serve(settings(redis_url, definitions_path=definitions_file(tmp_path / "defs.json", GREETING)))
    await ready(api)

    reply = await api.call("POST", "/v1/workflows/greeting", json={"to": "world"})
    assert reply.status == 202, reply.body
    workflow_id = reply.body["workflow_id"]
    await api.emit(workflow_id, "Greeted", {"said": "hello"}, workflow="greeting")

    view = await api.until_status(workflow_id, "completed")
    assert view["input"] == {"to": "world"}
    assert view["steps"][0]["result"] == {"said": "hello"}


async def test_definitions_lists_every_loaded_definition_with_its_deadlines(
    serve: ApiFactory, redis_url: str, tmp_path: Path
) -> None:
    api = await serve(settings(redis_url, definitions_path=definitions_file(tmp_path / "defs.json", GREETING)))

    reply = await api.call("GET", "/v1/definitions")

    assert reply.status == 200
    assert [(d["name"], d["version"]) for d in reply.body["definitions"]] == [("greeting", 1), ("order", 1)]
    order = reply.body["definitions"][1]
    assert order == ORDER_SAGA.model_dump(mode="json")
    assert {step["name"]: step["timeout_s"] for step in order["steps"]} == {
        "payment": 30.0,
        "inventory": 30.0,
        "shipping": 60.0,
        "notification": 30.0,
    }


async def test_a_controller_without_the_order_saga_runs_only_its_own_workflows(
    serve: ApiFactory, redis_url: str, tmp_path: Path
) -> None:
    own = definitions_file(tmp_path / "defs.json", GREETING)
    api = await ready(await serve(settings(redis_url, definitions_path=own, order_saga=False)))

    assert [d["name"] for d in (await api.call("GET", "/v1/definitions")).body["definitions"]] == ["greeting"]
    refused = await api.call("POST", "/v1/orders", json=ORDER)
    assert_problem(refused, 404, "name")  # the definition it names
    assert refused.body["type"].endswith("definition-not-found")
    headers = {"Content-Type": "application/json"}
    assert (await api.call("POST", "/v1/orders", data=b"{not json", headers=headers)).status == 404
    uncovered = (await api.call("GET", "/v1/participants")).body["uncovered"]
    assert {entry["workflow"] for entry in uncovered} == {"greeting"}  # no order step is missed
    assert (await api.call("POST", "/v1/workflows/greeting", json={"to": "world"})).status == 202


def test_a_controller_without_the_order_saga_needs_definitions_of_its_own(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="give the workflows to run with --definitions"):
        settings("redis://unused", order_saga=False)
    with pytest.raises(NoDefinitions):
        Definitions.load(definitions_file(tmp_path / "none.json"), order_saga=False)


# --- tracing, contracts, health -----------------------------------------------------


async def _start_event(redis: Redis, workflow_id: str) -> Envelope:
    stream = naming.message_stream(naming.partition_of(workflow_id, P), "OrderSubmitted")
    entries: Any = await redis.xrange(stream)
    [(_, fields)] = entries
    return decode(fields)


async def test_traceparent_is_passed_to_the_start_event(api: Api) -> None:
    workflow_id = await api.start_order(headers={"traceparent": TRACEPARENT})

    event = await _start_event(api.redis, workflow_id)
    assert event.traceparent == TRACEPARENT
    assert event.payload["order"]["customer_id"] == ORDER["customer_id"]


@pytest.mark.parametrize(
    "traceparent",
    ["00-zz-not-a-trace-01", TRACEPARENT.upper(), TRACEPARENT + "-more"],  # ids are lowercase; 00 has 4 fields
)
async def test_an_invalid_traceparent_is_ignored(api: Api, traceparent: str) -> None:
    workflow_id = await api.start_order(headers={"traceparent": traceparent})

    assert (await _start_event(api.redis, workflow_id)).traceparent is None


async def test_contracts_has_a_schema_for_the_envelope_every_payload_and_the_order_body(api: Api) -> None:
    reply = await api.call("GET", "/v1/contracts")

    assert reply.status == 200
    assert {"Envelope", "OrderIn", "WorkflowDefinition", *PAYLOADS} <= set(reply.body)
    assert reply.body["OrderIn"]["additionalProperties"] is False


async def test_healthz_and_readyz_answer_when_redis_and_the_correlator_are_up(api: Api) -> None:
    assert (await api.call("GET", "/healthz")).body == {"status": "ok"}
    ready = await api.call("GET", "/readyz")
    assert ready.status == 200
    assert ready.body["checks"] == {"redis": True, "correlator": True}


async def test_readyz_is_503_while_redis_does_not_answer(serve: ApiFactory) -> None:
    api = await serve(settings(f"redis://127.0.0.1:{free_port()}/0"))

    reply = await api.call("GET", "/readyz")

    assert_problem(reply, 503, None)
    assert reply.body["checks"] == {"redis": False, "correlator": False}
    assert (await api.call("GET", "/healthz")).status == 200


async def test_a_start_whose_commit_reply_is_lost_is_503_with_the_workflow_id_it_may_have(
    proxied: tuple[Api, RedisProxy],
) -> None:
    api, proxy = proxied
    await api.start_order()  # the commit script is loaded: the next start runs it at once
    proxy.drop_reply(b"EVALSHA")  # the retry's reply too
    reply = await api.call("POST", "/v1/orders", json=ORDER, headers={"Idempotency-Key": "lost-reply"})
    proxy.drop_reply(None)

    assert_problem(reply, 503, None)
    assert reply.body["type"].endswith(":start-outcome-unknown")
    workflow_id = reply.body["workflow_id"]
    assert reply.headers["Location"] == f"/v1/workflows/{workflow_id}"
    assert proxy.dropped >= 1
    # it did start: the client finds it where the 503 said, and a retry with the key returns it
    assert (await api.workflow(workflow_id))["status"] == "running"
    again = await api.call("POST", "/v1/orders", json=ORDER, headers={"Idempotency-Key": "lost-reply"})
    assert (again.status, again.body["workflow_id"]) == (202, workflow_id)
    assert again.headers["Idempotent-Replayed"] == "true"


async def test_a_start_whose_first_reply_is_lost_is_retried_once_and_started_once(
    proxied: tuple[Api, RedisProxy],
) -> None:
    api, proxy = proxied
    await api.start_order()  # the commit script is loaded: the next start runs it at once
    proxy.drop_reply(b"EVALSHA", once=True)
    keyed = await api.call("POST", "/v1/orders", json=ORDER, headers={"Idempotency-Key": "one-lost-reply"})
    proxy.drop_reply(b"EVALSHA", once=True)
    keyless = await api.call("POST", "/v1/orders", json=ORDER)

    assert proxy.dropped == 2
    # each retry found the start already made, exactly as it would have made it: its own
    # first run, so created by this request and not a replay
    for reply in (keyed, keyless):
        assert reply.status == 202, reply.body
        assert "Idempotent-Replayed" not in reply.headers
        assert (await api.workflow(reply.body["workflow_id"]))["status"] == "running"
    again = await api.call("POST", "/v1/orders", json=ORDER, headers={"Idempotency-Key": "one-lost-reply"})
    assert (again.body["workflow_id"], again.headers["Idempotent-Replayed"]) == (keyed.body["workflow_id"], "true")


async def test_while_redis_refuses_writes_a_start_is_503_and_reading_goes_on(api: Api) -> None:
    workflow_id = await api.start_order()
    async with refusing_writes(api.redis):
        refused = await api.call("POST", "/v1/orders", json=ORDER)
        assert_problem(refused, 503, None)
        assert refused.body["type"].endswith(":unavailable")
        assert refused.body["detail"].startswith("Redis refuses writes: ")
        assert (await api.call("GET", f"/v1/workflows/{workflow_id}")).status == 200
        # still ready: every controller shares this Redis, and reads work (docs/api.md)
        assert (await api.call("GET", "/readyz")).status == 200
    assert (await api.call("POST", "/v1/orders", json=ORDER)).status == 202


async def test_an_outage_is_503_for_every_request_and_one_warning_in_the_log(
    proxied: tuple[Api, RedisProxy], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="controller.api")
    api, proxy = proxied
    proxy.go_down()
    replies = [await api.call("GET", "/v1/workflows") for _ in range(10)]
    replies += [await api.call("POST", "/v1/orders", json=ORDER) for _ in range(10)]
    assert {reply.status for reply in replies} == {503}
    assert (await api.call("GET", "/v1/contracts")).status == 200  # needs no Redis: says nothing of it
    proxy.come_back()
    assert (await api.call("GET", "/v1/workflows")).status == 200
    await ready(api)

    async def told_it_works() -> bool:  # once requests have gone through for a second (logs.OUTAGE_SETTLES_S)
        assert (await api.call("GET", "/readyz")).status == 200
        return any("works again" in r.getMessage() for r in caplog.records if r.name == "controller.api")

    await eventually(told_it_works, bool, what="the recovery told")
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "controller.api"]
    outage = [line for line in lines if "the API's Redis requests" in line[1]]
    assert [level for level, _ in outage] == ["WARNING", "INFO"], lines  # failed once, then works again
    assert "works again" in outage[1][1]
    assert not [line for line in lines if line[0] == "WARNING" and line not in outage]
