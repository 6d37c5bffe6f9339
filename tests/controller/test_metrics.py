"""``GET /metrics``: workflows driven through a real app on a real Redis, then scraped over a real socket."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from contracts import naming
from contracts.definitions import CompensationDefinition, RetryPolicy, StepDefinition, WorkflowDefinition
from contracts.envelope import Envelope, WorkflowRef, encode, new_message_id, utcnow
from tests.conftest import definitions_file, eventually
from tests.controller import test_api
from tests.controller.test_api import Api, ApiFactory, P, settings

serve = test_api.serve  # the fixture that serves the app over a real socket
api = test_api.api  # the app with the default definitions, ready

FAMILIES = {
    "streamsaga_workflows_started": "counter",
    "streamsaga_workflows_finished": "counter",
    "streamsaga_workflows_needs_attention": "counter",
    "streamsaga_workflow_duration_seconds": "histogram",
    "streamsaga_step_duration_seconds": "histogram",
    "streamsaga_step_timeouts": "counter",
    "streamsaga_sla_breaches": "counter",
    "streamsaga_compensations": "counter",
    "streamsaga_dead_letters": "counter",
    "streamsaga_events_applied": "counter",
    "streamsaga_events_duplicate": "counter",
    "streamsaga_timers_fired": "counter",
    "streamsaga_consumer_lag": "gauge",
    "streamsaga_sse_clients": "gauge",
}
# two steps: "wave" fails on WaveFailed, so "greet" is undone (once only, then it needs attention)
GREETING = WorkflowDefinition(
    name="greeting",
    start="GreetingRequested",
    steps=(
        StepDefinition(
            name="greet",
            participant="greeter",
            trigger="GreetingRequested",
            completed="Greeted",
            compensation=CompensationDefinition(
                command="Ungreet",
                completed="Ungreeted",
                failed=("UngreetFailed",),
                retry=RetryPolicy(max_attempts=1),
            ),
        ),
        StepDefinition(name="wave", participant="waver", trigger="Greeted", completed="Waved", failed=("WaveFailed",)),
    ),
)

# the same, in a hurry: "greet" times out after 0.3 s
HURRY = GREETING.model_copy(
    update={
        "name": "hurry",
        "start": "HurryRequested",
        "steps": (
            GREETING.steps[0].model_copy(update={"trigger": "HurryRequested", "timeout_s": 0.3}),
            GREETING.steps[1],
        ),
    }
)


class Scrape:
    """One exposition, parsed: sample values by name and labels, and the families' types."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.types: dict[str, str] = {}
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def labels(self, name: str) -> list[dict[str, str]]:
        return [dict(labels) for sample, labels in self.samples if sample == name]


async def scrape(api: Api) -> Scrape:
    async with api.session.get("/metrics") as response:
        assert response.status == 200
        return Scrape(await response.text())


async def scraped_until(api: Api, name: str, value: float, **labels: str) -> Scrape:
    return await eventually(
        lambda: scrape(api), lambda found: found.value(name, **labels) == value, what=f"{name}{labels} == {value}"
    )


async def serve_greeting(serve: ApiFactory, redis_url: str, tmp_path: Path) -> Api:
    path = definitions_file(tmp_path / "greeting.json", GREETING, HURRY)
    client = await serve(settings(redis_url, definitions_path=path))
    await eventually(lambda: client.call("GET", "/readyz"), lambda r: r.status == 200, what="readiness")
    return client


async def start_greeting(api: Api, query: str = "", name: str = "greeting") -> str:
    reply = await api.call("POST", f"/v1/workflows/{name}{query}", json={"name": "Ada"})
    assert reply.status == 202, reply.body
    workflow_id: str = reply.body["workflow_id"]
    return workflow_id


# --- the exposition ------------------------------------------------------------------


async def test_metrics_answer_in_the_prometheus_text_format_with_every_family_and_known_series_at_zero(
    api: Api,
) -> None:
    async with api.session.get("/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        found = Scrape(await response.text())

    for name, kind in FAMILIES.items():
        assert found.types.get(name) == kind, name
    assert found.value("streamsaga_workflows_started_total", workflow="order") == 0
    for outcome in ("completed", "compensated", "failed"):
        assert found.value("streamsaga_workflows_finished_total", workflow="order", outcome=outcome) == 0
    for step in ("payment", "inventory", "shipping"):
        assert found.value("streamsaga_compensations_total", workflow="order", step=step) == 0
    assert found.value("streamsaga_consumer_lag", group="controller") == 0
    assert found.value("streamsaga_sse_clients") == 0
    assert found.types["process_cpu_seconds"] == "counter"
    # bounded labels: no workflow ids, only names from the definitions and fixed lists
    assert {labels["reason_kind"] for labels in found.labels("streamsaga_dead_letters_total")} == {
        "undecodable",
        "invalid_payload",
        "no_such_workflow",
        "unknown_definition",
        "exhausted",
    }


async def test_metrics_speak_openmetrics_when_the_scraper_asks(api: Api) -> None:
    async with api.session.get("/metrics", headers={"Accept": "application/openmetrics-text"}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        assert (await response.text()).endswith("# EOF\n")


async def test_each_app_counts_into_its_own_registry(serve: ApiFactory, redis_url: str) -> None:
    first = await serve(dataclasses.replace(settings(redis_url), consumer="first"))
    second = await serve(dataclasses.replace(settings(redis_url), consumer="second"))

    await first.start_order()

    assert (await scrape(first)).value("streamsaga_workflows_started_total", workflow="order") == 1
    assert (await scrape(second)).value("streamsaga_workflows_started_total", workflow="order") == 0


# --- workflows -------------------------------------------------------------------------


async def test_a_completed_order_counts_its_start_its_finish_and_the_duration_of_each_step(api: Api) -> None:
    workflow_id = await api.start_order()
    view = await api.complete_order(workflow_id)

    found = await scraped_until(api, "streamsaga_workflows_finished_total", 1, workflow="order", outcome="completed")

    assert found.value("streamsaga_workflows_started_total", workflow="order") == 1
    assert found.value("streamsaga_workflow_duration_seconds_count", workflow="order", outcome="completed") == 1
    took = found.value("streamsaga_workflow_duration_seconds_sum", workflow="order", outcome="completed")
    assert took is not None
    assert took > 0
    for step in view["steps"]:
        labels = {"workflow": "order", "step": step["name"], "outcome": "completed"}
        assert found.value("streamsaga_step_duration_seconds_count", **labels) == 1, step["name"]
    assert found.value("streamsaga_events_applied_total") == 4
    assert found.value("streamsaga_workflows_finished_total", workflow="order", outcome="compensated") == 0
    assert "workflow_id" not in found.text
    assert workflow_id not in found.text


async def test_a_failed_step_counts_the_compensation_it_sends_and_the_compensated_outcome(api: Api) -> None:
    workflow_id = await api.start_order()
    order = (await api.workflow(workflow_id))["input"]["order"]
    await api.emit(workflow_id, "PaymentCaptured", {"order": order, "payment_id": "pay-1", "amount": "33.00"})
    await api.emit(workflow_id, "InventoryUnavailable", {"reason": "out of MUG-1", "skus": ["MUG-1"]})

    found = await scraped_until(api, "streamsaga_compensations_total", 1, workflow="order", step="payment")
    assert found.value("streamsaga_step_duration_seconds_count", workflow="order", step="inventory", outcome="failed")
    assert found.value("streamsaga_workflows_finished_total", workflow="order", outcome="compensated") == 0

    await api.emit(workflow_id, "PaymentRefunded", {"step": "payment", "detail": "refunded"})
    await api.until_status(workflow_id, "compensated")
    found = await scraped_until(api, "streamsaga_workflows_finished_total", 1, workflow="order", outcome="compensated")
    assert found.value("streamsaga_workflow_duration_seconds_count", workflow="order", outcome="compensated") == 1
    assert found.value("streamsaga_compensations_total", workflow="order", step="payment") == 1
    assert found.value("streamsaga_compensations_total", workflow="order", step="inventory") == 0


async def test_a_step_timeout_and_an_sla_breach_are_counted_with_the_timers_that_fired(
    serve: ApiFactory, redis_url: str, tmp_path: Path
) -> None:
    api = await serve_greeting(serve, redis_url, tmp_path)
    # the SLA (0.1 s) is breached first; the running step then times out (0.3 s); nothing to undo
    workflow_id = await start_greeting(api, "?sla_seconds=0.1", name="hurry")
    view = await api.until_status(workflow_id, "failed")
    assert [step["status"] for step in view["steps"]] == ["timed_out", "skipped"]

    found = await scraped_until(api, "streamsaga_workflows_finished_total", 1, workflow="hurry", outcome="failed")

    assert found.value("streamsaga_sla_breaches_total", workflow="hurry") == 1
    assert found.value("streamsaga_step_timeouts_total", workflow="hurry", step="greet") == 1
    assert found.value("streamsaga_step_timeouts_total", workflow="hurry", step="wave") == 0
    assert found.value("streamsaga_sla_breaches_total", workflow="greeting") == 0
    assert found.value("streamsaga_timers_fired_total") == 2
    labels = {"workflow": "hurry", "step": "greet", "outcome": "timed_out"}
    assert found.value("streamsaga_step_duration_seconds_count", **labels) == 1
    took = found.value("streamsaga_step_duration_seconds_sum", **labels)
    assert took is not None
    assert took >= 0.3


async def test_a_compensation_out_of_retries_counts_needs_attention_and_the_operators_retry_counts_again(
    serve: ApiFactory, redis_url: str, tmp_path: Path
) -> None:
    api = await serve_greeting(serve, redis_url, tmp_path)
    workflow_id = await start_greeting(api)
    await api.emit(workflow_id, "Greeted", {}, workflow="greeting")
    await api.emit(workflow_id, "WaveFailed", {"reason": "arm hurts"}, workflow="greeting")
    await scraped_until(api, "streamsaga_compensations_total", 1, workflow="greeting", step="greet")
    await api.emit(workflow_id, "UngreetFailed", {"reason": "cannot unsay it"}, workflow="greeting")
    await api.until_status(workflow_id, "needs_attention")
    found = await scraped_until(api, "streamsaga_workflows_needs_attention_total", 1, workflow="greeting")
    assert found.value("streamsaga_workflows_finished_total", workflow="greeting", outcome="compensated") == 0

    reply = await api.call("POST", f"/v1/workflows/{workflow_id}/retry", json={"by": "ops"})
    assert reply.status == 202, reply.body
    # the operator's request goes through the store, not the correlator: counted all the same
    assert (await scrape(api)).value("streamsaga_compensations_total", workflow="greeting", step="greet") == 2
    await api.emit(workflow_id, "Ungreeted", {"step": "greet"}, workflow="greeting")
    found = await scraped_until(
        api, "streamsaga_workflows_finished_total", 1, workflow="greeting", outcome="compensated"
    )
    assert found.value("streamsaga_workflows_needs_attention_total", workflow="greeting") == 1


# --- what the correlator reads -------------------------------------------------------------


async def test_dead_letters_are_counted_by_kind_and_a_redelivered_event_as_a_duplicate(api: Api, redis: Redis) -> None:
    workflow_id = await api.start_order()
    order = (await api.workflow(workflow_id))["input"]["order"]
    captured = Envelope(
        message_id=new_message_id(),
        type="PaymentCaptured",
        correlation_id=workflow_id,
        workflow=WorkflowRef(name="order"),
        producer="tests",
        occurred_at=utcnow(),
        payload={"order": order, "payment_id": "pay-1", "amount": "33.00"},
    )
    stream = naming.message_stream(naming.partition_of(workflow_id, P), "PaymentCaptured")
    for _ in range(2):  # a producer's retried XADD
        await redis.xadd(stream, encode(captured))  # type: ignore[arg-type]
    await api.emit("no-such-workflow", "PaymentCaptured", {"order": order, "payment_id": "p", "amount": "1.00"})
    await api.emit(workflow_id, "PaymentCaptured", {"payment_id": "no order"})
    await redis.xadd(naming.message_stream(0, "InventoryReserved"), {"garbage": "1"})

    found = await eventually(
        lambda: scrape(api),
        lambda found: sum(v for (name, _), v in found.samples.items() if name == "streamsaga_dead_letters_total") == 3,
        what="three dead letters",
    )

    def dead(kind: str) -> float | None:
        return found.value("streamsaga_dead_letters_total", group="controller", reason_kind=kind)

    assert (dead("no_such_workflow"), dead("invalid_payload"), dead("undecodable")) == (1, 1, 1)
    assert found.value("streamsaga_events_applied_total") == 1
    assert found.value("streamsaga_events_duplicate_total") == 1


async def test_consumer_lag_is_reported_per_group_of_every_participant_with_a_heartbeat(
    serve: ApiFactory, redis_url: str, redis: Redis, tmp_path: Path
) -> None:
    beat: dict[str, Any] = {
        "participant": "greeter",
        "consumer": "c-1",
        "at_ms": int(time.time() * 1000),
        "subscriptions": [{"type": "GreetingRequested"}],
    }
    await redis.hset(naming.heartbeat_key(), "greeter/c-1", orjson.dumps(beat))
    api = await serve_greeting(serve, redis_url, tmp_path)
    for _ in range(3):
        await start_greeting(api)  # nobody of group "greeter" reads them

    found = await scraped_until(api, "streamsaga_consumer_lag", 3, group="greeter")

    # the order saga's participants have no heartbeat: they are not listed
    assert {labels["group"] for labels in found.labels("streamsaga_consumer_lag")} == {"controller", "greeter"}


async def test_connected_live_progress_clients_are_counted_while_they_stay(api: Api) -> None:
    async with api.session.get("/v1/events") as feed:
        assert feed.status == 200
        await scraped_until(api, "streamsaga_sse_clients", 1)

    await scraped_until(api, "streamsaga_sse_clients", 0)
