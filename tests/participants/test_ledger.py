"""The ledger: per-order rows, money totals and stock conservation across workflows."""

from __future__ import annotations

from redis.asyncio import Redis

from participants.ledger import Ledger, OrderRow, SkuStock, format_ledger, read_ledger
from participants.sdk import Reply
from participants.workers import WorkerSettings, build
from tests.participants.helpers import envelope, message, order


async def _run(redis: Redis, worker: str, message_type: str, workflow: str, payload: dict[str, object]) -> Reply:
    participant = build(worker, WorkerSettings(redis_url="redis://unused", default_stock=10))
    [reply] = await participant.dispatch(
        message(redis, worker, envelope(message_type, payload, correlation_id=workflow))
    )
    return reply


async def _order_through_shipping(redis: Redis, workflow: str, *items: tuple[str, int, str]) -> None:
    """Run an order through payment, inventory and shipping as far as it gets."""
    step = await _run(redis, "payment", "OrderSubmitted", workflow, {"order": order(*items, order_id=workflow)})
    for worker in ("inventory", "shipping"):
        if step.type not in ("PaymentCaptured", "InventoryReserved"):
            return
        step = await _run(redis, worker, step.type, workflow, step.payload_dict())


async def _compensate(redis: Redis, workflow: str) -> None:
    for worker, command in (
        ("shipping", "CancelShipment"),
        ("inventory", "ReleaseInventory"),
        ("payment", "RefundPayment"),
    ):
        await _run(redis, worker, command, workflow, {"step": worker, "reason": "cancelled"})


async def test_an_empty_ledger_balances(redis: Redis) -> None:
    books = await read_ledger(redis)
    assert books == Ledger(orders=[], stock=[], captured_cents=0, refunded_cents=0)
    assert books.balanced
    assert "no orders recorded" in format_ledger(books)


async def test_totals_and_stock_balance_after_orders_and_compensations(redis: Redis) -> None:
    await _order_through_shipping(redis, "wf-a", ("SKU-1", 3, "2.50"), ("SKU-2", 1, "10.00"))
    await _order_through_shipping(redis, "wf-b", ("SKU-1", 4, "2.50"))
    await _order_through_shipping(redis, "wf-c", ("SKU-1", 5, "2.50"))  # only 3 left: unavailable
    await _compensate(redis, "wf-b")
    await _compensate(redis, "wf-b")  # a redelivered compensation changes nothing

    books = await read_ledger(redis)
    rows = {row.workflow_id: row for row in books.orders}
    assert rows["wf-a"] == OrderRow(
        workflow_id="wf-a",
        order_id="wf-a",
        currency="USD",
        captured_cents=1750,
        reserved={"SKU-1": 3, "SKU-2": 1},
        shipment_id=rows["wf-a"].shipment_id,
        shipped=True,
    )
    assert (rows["wf-b"].refunded_cents, rows["wf-b"].released, rows["wf-b"].cancelled) == (1000, True, True)
    assert (rows["wf-c"].captured_cents, rows["wf-c"].reserved, rows["wf-c"].shipped) == (1250, {}, False)
    assert (books.captured_cents, books.refunded_cents, books.net_cents) == (1750 + 1000 + 1250, 1000, 3000)
    assert books.stock == [
        SkuStock(sku="SKU-1", initial=10, available=7, reserved=7, released=4),
        SkuStock(sku="SKU-2", initial=10, available=9, reserved=1, released=0),
    ]
    assert all(s.initial == s.available + s.reserved - s.released for s in books.stock)
    assert [s.held for s in books.stock] == [3, 1]
    assert books.balanced


async def test_the_formatted_ledger_shows_orders_totals_and_stock(redis: Redis) -> None:
    await _order_through_shipping(redis, "wf-a", ("SKU-1", 2, "450.25"))
    await _compensate(redis, "wf-a")
    text = format_ledger(await read_ledger(redis))
    lines = text.splitlines()
    assert lines[0].split() == [
        "workflow",
        "status",
        "order",
        "currency",
        "captured",
        "refunded",
        "reserved",
        "released",
        "shipment",
        "cancelled",
        "notified",
    ]
    assert "wf-a" in lines[2]
    assert "SKU-1x2" in lines[2]
    assert "orders: 1  captured: 900.50  refunded: 900.50  net: 0.00" in text
    assert any(line.split() == ["SKU-1", "10", "10", "2", "2", "0", "yes"] for line in lines)
    assert lines[-1] == "ledger balances"


async def test_each_settled_order_must_keep_what_its_outcome_says(redis: Redis) -> None:
    await _order_through_shipping(redis, "wf-done", ("SKU-1", 1, "2.50"))
    await _order_through_shipping(redis, "wf-undone", ("SKU-1", 1, "2.50"))
    await _compensate(redis, "wf-undone")
    await _order_through_shipping(redis, "wf-leak", ("SKU-1", 1, "4.00"))  # captured, reserved, shipped
    await _order_through_shipping(redis, "wf-running", ("SKU-2", 1, "1.00"))
    statuses = {"wf-done": "completed", "wf-undone": "compensated", "wf-leak": "failed", "wf-running": "compensating"}

    books = await read_ledger(redis)
    assert books.balanced  # without the statuses, only stock and refunds are checked
    books.settle(statuses)
    rows = {row.workflow_id: row for row in books.orders}
    assert {wid: row.status for wid, row in rows.items()} == statuses
    assert [row.workflow_id for row in books.mismatches] == ["wf-leak"]
    assert rows["wf-leak"].mismatch == (
        "failed, but 4.00 captured and not refunded, stock reserved and not released, a shipment not cancelled"
    )
    assert books.unsettled == 1
    assert not books.balanced
    text = format_ledger(books)
    assert "wf-leak (wf-leak): failed, but 4.00 captured and not refunded" in text
    assert "1 orders not settled or of unknown status" in text
    assert text.splitlines()[-1] == "LEDGER DOES NOT BALANCE"

    # the other way round: a completed order must keep everything
    await _compensate(redis, "wf-leak")
    await _compensate(redis, "wf-done")
    books = await read_ledger(redis)
    books.settle(statuses)
    assert [(row.workflow_id, row.mismatch) for row in books.mismatches] == [
        ("wf-done", "completed, but refunded, stock released, shipment cancelled")
    ]
    books.settle({**statuses, "wf-done": "compensated"})
    assert books.mismatches == []
    assert books.balanced
