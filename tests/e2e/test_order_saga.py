"""The order saga end to end: the controller and the four workers as real
processes, orders over real HTTP, crashes by kill -9."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from contracts.definitions import ORDER_SAGA
from participants.ledger import read_ledger
from tests.e2e.deployment import NO_NOTIFY_CUSTOMER, Deployment, order

pytestmark = pytest.mark.e2e


def total(body: dict[str, Any]) -> Decimal:
    return sum(
        (Decimal(item["unit_price"]) * item["quantity"] for item in body["items"]),
        Decimal("0"),
    )


async def assert_ledgers_balance(redis: Redis, completed: list[dict[str, Any]]) -> None:
    """Captured − refunded equals the total of completed orders; stock is conserved."""
    ledger = await read_ledger(redis)
    expected_cents = sum(int(total(o) * 100) for o in completed)
    assert ledger.captured_cents - ledger.refunded_cents == expected_cents, ledger
    for sku in ledger.stock:
        assert sku.initial == sku.available + sku.reserved - sku.released, sku
        assert sku.reserved - sku.released == sum(
            i["quantity"] for o in completed for i in o["items"] if i["sku"] == sku.sku
        ), sku


async def test_each_outcome_of_the_order_saga(
    deployment: Deployment, session: aiohttp.ClientSession, redis: Redis
) -> None:
    deployment.start_all()
    await deployment.wait_ready(session)
    orders = {
        "completed": order(items=[("SKU-OK", 2, "10.00")]),
        "over_limit": order(items=[("SKU-OK", 1, "1000.01")]),
        "no_stock": order(items=[("SKU-OK", 1, "1.00"), ("SKU-RARE", 101, "1.00")]),
        "bad_country": order(items=[("SKU-OK", 3, "5.00")], country="JP"),
        "no_notify": order(customer=NO_NOTIFY_CUSTOMER, items=[("SKU-OK", 1, "7.50")]),
    }
    ids: dict[str, str] = {}
    for name, body in orders.items():
        status, reply = await deployment.submit(session, body)
        assert status == 202, reply
        ids[name] = reply["workflow_id"]
    finished = await deployment.wait_terminal(session, list(ids.values()))
    state = {name: finished[workflow_id] for name, workflow_id in ids.items()}

    def steps(name: str) -> dict[str, str]:
        return {step["name"]: step["status"] for step in state[name]["steps"]}

    assert state["completed"]["status"] == "completed"
    assert set(steps("completed").values()) == {"completed"}
    assert all(step["started_at"] and step["finished_at"] for step in state["completed"]["steps"])

    assert state["over_limit"]["status"] == "failed"
    assert steps("over_limit") == {
        "payment": "failed",
        "inventory": "skipped",
        "shipping": "skipped",
        "notification": "skipped",
    }

    assert state["no_stock"]["status"] == "compensated"
    assert steps("no_stock")["payment"] == "compensated"
    assert steps("no_stock")["inventory"] == "failed"

    assert state["bad_country"]["status"] == "compensated"
    assert steps("bad_country") == {
        "payment": "compensated",
        "inventory": "compensated",
        "shipping": "failed",
        "notification": "skipped",
    }
    history = [(e["direction"], e["type"]) for e in await deployment.history(session, ids["bad_country"])]
    assert history == [
        ("out", "OrderSubmitted"),
        ("in", "PaymentCaptured"),
        ("in", "InventoryReserved"),
        ("in", "ShipmentFailed"),
        ("out", "ReleaseInventory"),  # compensation in reverse order
        ("in", "InventoryReleased"),
        ("out", "RefundPayment"),
        ("in", "PaymentRefunded"),
    ]

    assert state["no_notify"]["status"] == "completed"
    assert steps("no_notify")["notification"] == "failed"

    await assert_ledgers_balance(redis, [orders["completed"], orders["no_notify"]])


async def test_a_repeated_submission_with_the_same_key_is_one_workflow(
    deployment: Deployment, session: aiohttp.ClientSession, redis: Redis
) -> None:
    deployment.start_all()
    await deployment.wait_ready(session)
    body = order(items=[("SKU-IDEM", 1, "3.00")])
    replies = await asyncio.gather(*(deployment.submit(session, body, key="same-key") for _ in range(5)))
    assert {status for status, _ in replies} == {202}
    assert len({reply["workflow_id"] for _, reply in replies}) == 1
    conflict, problem = await deployment.submit(session, order(items=[("SKU-IDEM", 2, "3.00")]), key="same-key")
    assert conflict == 409, problem
    await deployment.wait_terminal(session, [replies[0][1]["workflow_id"]])
    await assert_ledgers_balance(redis, [body])


async def test_a_controller_killed_mid_batch_loses_nothing(
    deployment: Deployment, session: aiohttp.ClientSession, redis: Redis
) -> None:
    deployment.start_all()
    await deployment.wait_ready(session)
    bodies = [order(customer=f"c-{i}", items=[(f"SKU-{i % 7}", 1, "2.00")]) for i in range(300)]
    replies = await asyncio.gather(*(deployment.submit(session, body) for body in bodies))
    assert {status for status, _ in replies} == {202}
    ids = [reply["workflow_id"] for _, reply in replies]
    held = await deployment.kill_holding_entries(redis, "controller", "controller", sorted(ORDER_SAGA.message_types()))
    assert held > 0  # events keep flowing between the workers while no controller runs
    deployment.start_controller("controller-2")
    await deployment.wait_ready(session)
    finished = await deployment.wait_terminal(session, ids, timeout=90)
    assert {state["status"] for state in finished.values()} == {"completed"}
    await assert_ledgers_balance(redis, bodies)


async def test_a_worker_killed_mid_batch_is_taken_over_by_its_replica(
    deployment: Deployment, session: aiohttp.ClientSession, redis: Redis
) -> None:
    deployment.start_controller()
    for worker in ("inventory", "shipping", "notification"):
        deployment.start_worker(worker)
    doomed = deployment.start_worker("payment", 1)
    deployment.start_worker("payment", 2)
    await deployment.wait_ready(session)
    bodies = [order(customer=f"k-{i}", items=[(f"SKU-K{i % 5}", 1, "1.00")]) for i in range(300)]
    submitting = asyncio.gather(*(deployment.submit(session, body) for body in bodies))
    held = await deployment.kill_holding_entries(redis, doomed, "payment", ["OrderSubmitted", "RefundPayment"])
    assert held > 0
    ids = [reply["workflow_id"] for _, reply in await submitting]
    finished = await deployment.wait_terminal(session, ids, timeout=90)
    assert {state["status"] for state in finished.values()} == {"completed"}
    await assert_ledgers_balance(redis, bodies)
