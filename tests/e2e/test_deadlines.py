"""Deadlines, SLAs and operator actions end to end: real controller and worker
processes, a definition with short timeouts, workers stopped and started."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from contracts.messages import TIMER_FIRED
from participants.ledger import read_ledger
from tests.conftest import definitions_file
from tests.e2e.deployment import SHIPPING_TIMEOUT_S, Deployment, order, short_order_saga

pytestmark = pytest.mark.e2e

POLL_S = 0.1


@pytest.fixture(autouse=True)
def short_deadlines(deployment: Deployment, tmp_path: Path) -> None:
    deployment.controller_args = ["--definitions", str(definitions_file(tmp_path / "defs.json", short_order_saga()))]


def steps(state: dict[str, Any]) -> dict[str, str]:
    return {step["name"]: step["status"] for step in state["steps"]}


async def submit_all(deployment: Deployment, session: aiohttp.ClientSession, count: int, prefix: str) -> list[str]:
    ids = []
    for i in range(count):
        status, reply = await deployment.submit(session, order(customer=f"{prefix}-{i}", items=[("SKU-D", 1, "4.00")]))
        assert status == 202, reply
        ids.append(reply["workflow_id"])
    return ids


async def wait_for(
    deployment: Deployment,
    session: aiohttp.ClientSession,
    ids: list[str],
    check: Any,
    what: str,
    timeout: float = 60.0,  # noqa: ASYNC109
) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        states = {wid: await deployment.workflow(session, wid) for wid in ids}
        if all(check(state) for state in states.values()):
            return states
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {[steps(s) for s in states.values()][:3]}")
        await asyncio.sleep(POLL_S)


async def test_a_shipping_worker_that_is_down_times_out_and_its_late_success_is_compensated(
    deployment: Deployment, session: aiohttp.ClientSession, redis: Redis
) -> None:
    deployment.start_all(without=["shipping"])
    await deployment.wait_ready(session)
    ids = await submit_all(deployment, session, 5, "down")
    running = await deployment.workflow(session, ids[0])
    assert running["workflow"] == {"name": "order", "version": 2}

    finished = await deployment.wait_terminal(session, ids)
    for state in finished.values():
        assert state["status"] == "compensated"
        assert steps(state) == {
            "payment": "compensated",
            "inventory": "compensated",
            "shipping": "timed_out",
            "notification": "skipped",
        }
        assert state["error"] == f"shipping timed out after {SHIPPING_TIMEOUT_S:g}s"

    # shipping comes back and processes its stale triggers: each late shipment is cancelled
    deployment.start_worker("shipping")
    states = await wait_for(
        deployment,
        session,
        ids,
        lambda s: s["status"] == "compensated" and steps(s)["shipping"] == "compensated",
        "late shipments to be cancelled",
    )
    history = [(e["direction"], e["type"]) for e in await deployment.history(session, ids[0])]
    late = history[history.index(("in", "ShipmentScheduled")) :]
    # the late shipment is undone; the notification worker reacts to it too (choreography)
    assert [e for e in late if e[1] != "CustomerNotified"] == [
        ("in", "ShipmentScheduled"),
        ("out", "CancelShipment"),
        ("in", "ShipmentCancelled"),
    ]
    assert ("in", TIMER_FIRED) in history
    ledger = await read_ledger(redis)
    assert ledger.captured_cents == ledger.refunded_cents == 5 * 400
    assert ledger.balanced
    rows = {row.workflow_id: row for row in ledger.orders}
    assert all(rows[wid].shipped and rows[wid].cancelled and rows[wid].released for wid in states)


async def test_cancel_compensates_a_running_workflow_and_a_finished_one_answers_409(
    deployment: Deployment, session: aiohttp.ClientSession, redis: Redis
) -> None:
    deployment.controller_args = [
        "--definitions",
        str(definitions_file(deployment.log_dir / "slow.json", short_order_saga(sla_s=600.0))),
    ]
    deployment.start_all(without=["shipping"])
    await deployment.wait_ready(session)
    [workflow_id] = await submit_all(deployment, session, 1, "cancel")
    await wait_for(deployment, session, [workflow_id], lambda s: steps(s)["shipping"] == "running", "shipping to start")
    async with session.post(
        f"{deployment.api}/v1/workflows/{workflow_id}/cancel", json={"by": "alice", "reason": "customer called"}
    ) as response:
        assert response.status == 202, await response.text()
    [state] = (await deployment.wait_terminal(session, [workflow_id])).values()
    assert state["status"] == "compensated"
    assert state["error"] == "cancelled by alice: customer called"
    history = await deployment.history(session, workflow_id)
    cancel = next(e for e in history if e["type"] == "CancelRequested")
    assert cancel["producer"] == "operator:alice"
    # shipping was running (its worker down): waited for up to its deadline, then the rest
    # undone, last first
    assert steps(state)["shipping"] == "timed_out"
    sent = [e["type"] for e in history if e["direction"] == "out"]
    assert sent[-2:] == ["ReleaseInventory", "RefundPayment"]
    async with session.post(f"{deployment.api}/v1/workflows/{workflow_id}/cancel") as response:
        assert response.status == 409
        problem = await response.json(content_type=None)
        assert problem["field"] == "id"
    ledger = await read_ledger(redis)
    assert ledger.captured_cents == ledger.refunded_cents


async def test_timers_survive_a_controller_killed_before_they_are_due(
    deployment: Deployment, session: aiohttp.ClientSession
) -> None:
    deployment.start_all(without=["shipping"])
    await deployment.wait_ready(session)
    ids = await submit_all(deployment, session, 5, "kill")
    await wait_for(
        deployment, session, ids, lambda s: steps(s)["shipping"] == "running", "every shipping step to start"
    )
    deployment.kill("controller")  # its shipping deadlines are still ahead
    deployment.start_controller("controller-2")
    await deployment.wait_ready(session)
    finished = await deployment.wait_terminal(session, ids)
    assert {state["status"] for state in finished.values()} == {"compensated"}
    assert {steps(state)["shipping"] for state in finished.values()} == {"timed_out"}


async def test_two_controllers_fire_each_deadline_once(deployment: Deployment, session: aiohttp.ClientSession) -> None:
    deployment.start_all(without=["shipping"])
    deployment.start_controller("controller-b")
    await deployment.wait_ready(session)
    ids = await submit_all(deployment, session, 10, "two")
    await deployment.wait_terminal(session, ids)
    for workflow_id in ids:
        history = await deployment.history(session, workflow_id)
        fired = [e for e in history if e["type"] == TIMER_FIRED]
        assert len(fired) == 1, fired  # the shipping deadline, once
        assert "stale" not in (fired[0]["detail"] or "")


async def test_an_sla_that_only_flags_lets_the_workflow_complete(
    deployment: Deployment, session: aiohttp.ClientSession
) -> None:
    flagging = short_order_saga(sla_s=60.0, on_breach="flag")
    slow_shipping = flagging.model_copy(
        update={
            "steps": tuple(
                s.model_copy(update={"timeout_s": 60.0}) if s.name == "shipping" else s for s in flagging.steps
            )
        }
    )
    deployment.controller_args = ["--definitions", str(definitions_file(deployment.log_dir / "f.json", slow_shipping))]
    deployment.start_all(without=["shipping"])
    await deployment.wait_ready(session)
    body = order(customer="sla", items=[("SKU-S", 1, "1.00")])
    async with session.post(f"{deployment.api}/v1/orders?sla_seconds=1", json=body) as response:
        assert response.status == 202, await response.text()
        workflow_id = (await response.json())["workflow_id"]
    await wait_for(deployment, session, [workflow_id], lambda s: s["sla_breached"], "the SLA to be breached")
    assert (await deployment.workflow(session, workflow_id))["status"] == "running"
    deployment.start_worker("shipping")
    [state] = (await deployment.wait_terminal(session, [workflow_id])).values()
    assert state["status"] == "completed"
    assert state["sla_breached"] is True
    types = [e["type"] for e in await deployment.history(session, workflow_id)]
    assert types.count("SlaBreached") == 1


async def test_a_looser_sla_than_the_definition_is_rejected(
    deployment: Deployment, session: aiohttp.ClientSession
) -> None:
    deployment.start_controller()
    await deployment.wait_ready(session)
    body = order()
    async with session.post(f"{deployment.api}/v1/orders?sla_seconds=61", json=body) as response:
        assert response.status == 422
        problem = await response.json(content_type=None)
        assert problem["field"] == "sla_seconds"
        assert "may not exceed" in problem["detail"]


async def test_a_compensation_that_keeps_failing_needs_attention_until_an_operator_retries(
    deployment: Deployment, session: aiohttp.ClientSession, redis: Redis
) -> None:
    deployment.start_controller()
    for worker in ("inventory", "shipping", "notification"):
        deployment.start_worker(worker)
    payment = deployment.start_worker("payment", 1, "--refund-fail-customers", "stuck")
    await deployment.wait_ready(session)
    body = order(customer="stuck", items=[("SKU-A", 1, "9.00")], country="JP")  # shipping fails: refund needed
    status, reply = await deployment.submit(session, body)
    assert status == 202, reply
    workflow_id = reply["workflow_id"]
    [state] = (
        await wait_for(deployment, session, [workflow_id], lambda s: s["status"] == "needs_attention", "attention")
    ).values()
    assert state["error"].startswith("compensating payment failed after 3 attempts")
    history = await deployment.history(session, workflow_id)
    assert [e["type"] for e in history].count("RefundPayment") == 3
    assert [e["type"] for e in history].count("RefundFailed") == 3
    listed = await (await session.get(f"{deployment.api}/v1/workflows?status=needs_attention")).json()
    assert [w["workflow_id"] for w in listed["workflows"]] == [workflow_id]

    # the operator fixes the payment worker, then resumes the compensation
    deployment.stop_process(payment)
    deployment.start_worker("payment", 2)
    async with session.post(
        f"{deployment.api}/v1/workflows/{workflow_id}/retry", json={"by": "ops", "reason": "card replaced"}
    ) as response:
        assert response.status == 202, await response.text()
    [state] = (await deployment.wait_terminal(session, [workflow_id])).values()
    assert state["status"] == "compensated"
    assert steps(state)["payment"] == "compensated"
    retry = next(e for e in await deployment.history(session, workflow_id) if e["type"] == "RetryRequested")
    assert retry["detail"] == "retry requested by ops: card replaced"
    async with session.post(f"{deployment.api}/v1/workflows/{workflow_id}/retry") as response:
        assert response.status == 409
    ledger = await read_ledger(redis)
    assert ledger.captured_cents == ledger.refunded_cents == 900
    assert ledger.balanced
