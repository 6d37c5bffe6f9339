"""The example workers' business rules, compensations and idempotency."""

from __future__ import annotations

import asyncio
import dataclasses
from decimal import Decimal
from typing import Any

import pytest
from redis.asyncio import Redis

from contracts.envelope import Envelope
from participants import ledger
from participants.ledger import read_ledger
from participants.sdk import Participant, Reply
from participants.workers import WORKER_NAMES, WorkerSettings, build, run_worker
from tests.conftest import eventually
from tests.participants.helpers import PARTITIONS, emitted, envelope, fast_settings, message, order, publish, running

WORKFLOW = "wf-1"


def worker(name: str, **settings: Any) -> Participant:
    return build(name, WorkerSettings(redis_url="redis://unused", **settings))


async def call(redis: Redis, participant: Participant, env: Envelope) -> Reply:
    """Run the handler of ``env`` once; its only reply."""
    [reply] = await participant.dispatch(message(redis, participant.name, env))
    return reply


def submitted(*items: tuple[str, int, str], workflow: str = WORKFLOW, **fields: Any) -> Envelope:
    return envelope("OrderSubmitted", {"order": order(*items, **fields)}, correlation_id=workflow)


def event(message_type: str, reply: Reply, workflow: str = WORKFLOW) -> Envelope:
    """The event a reply becomes, as the next worker receives it."""
    return envelope(message_type, reply.payload_dict(), correlation_id=workflow)


def compensate(command: str, step: str, workflow: str = WORKFLOW) -> Envelope:
    return envelope(command, {"step": step, "reason": "shipping failed"}, correlation_id=workflow)


async def captured(redis: Redis, *items: tuple[str, int, str], workflow: str = WORKFLOW, **fields: Any) -> Reply:
    reply = await call(redis, worker("payment"), submitted(*items, workflow=workflow, **fields))
    assert reply.type == "PaymentCaptured"
    return reply


# --- payment -----------------------------------------------------------------------


async def test_payment_captures_the_order_total(redis: Redis) -> None:
    reply = await captured(redis, ("SKU-1", 2, "10.25"), ("SKU-2", 1, "4.50"))
    payload = reply.payload_dict()
    assert payload["amount"] == "25.00"
    assert payload["payment_id"].startswith("pay_")
    assert payload["order"]["order_id"] == "order-1"
    [row] = (await read_ledger(redis)).orders
    assert (row.workflow_id, row.order_id, row.captured_cents, row.currency) == (WORKFLOW, "order-1", 2500, "USD")


async def test_payment_declines_an_order_over_the_limit_and_records_nothing(redis: Redis) -> None:
    payment = worker("payment", payment_limit=Decimal("100.00"))
    reply = await call(redis, payment, submitted(("SKU-1", 3, "33.34")))
    assert reply.type == "PaymentDeclined"
    assert reply.payload_dict() == {
        "reason": "amount 100.02 USD exceeds the payment limit 100.00",
        "amount": "100.02",
    }
    assert (await read_ledger(redis)).orders == []


async def test_payment_at_exactly_the_limit_is_captured(redis: Redis) -> None:
    reply = await call(redis, worker("payment"), submitted(("SKU-1", 1, "1000.00")))
    assert reply.type == "PaymentCaptured"


async def test_payment_captures_once_per_workflow(redis: Redis) -> None:
    payment = worker("payment")
    first = await call(redis, payment, submitted(("SKU-1", 1, "10.00")))
    again = await call(redis, payment, submitted(("SKU-1", 1, "10.00")))  # a re-run, or a second start event
    assert again.payload_dict() == first.payload_dict()
    assert (await read_ledger(redis)).captured_cents == 1000


async def test_refund_returns_the_captured_amount_once(redis: Redis) -> None:
    await captured(redis, ("SKU-1", 1, "12.50"))
    payment = worker("payment")
    first = await call(redis, payment, compensate("RefundPayment", "payment"))
    again = await call(redis, payment, compensate("RefundPayment", "payment"))
    assert first.type == again.type == "PaymentRefunded"
    assert first.payload_dict() == {"step": "payment", "detail": "refunded 12.50 USD"}
    books = await read_ledger(redis)
    assert (books.captured_cents, books.refunded_cents, books.net_cents) == (1250, 1250, 0)


async def test_refund_without_a_capture_answers_and_records_nothing(redis: Redis) -> None:
    reply = await call(redis, worker("payment"), compensate("RefundPayment", "payment"))
    assert reply.type == "PaymentRefunded"
    assert reply.payload_dict() == {"step": "payment", "detail": "nothing was captured"}
    assert (await read_ledger(redis)).orders == []


async def test_refund_fails_for_a_configured_customer_and_refunds_nothing(redis: Redis) -> None:
    capture = await captured(redis, ("SKU-1", 1, "12.50"), customer_id="stuck")
    payment = worker("payment", refund_fail_customers=("stuck",))
    command = envelope(
        "RefundPayment",
        {"step": "payment", "reason": "shipping failed", "completed": capture.payload_dict()},
        correlation_id=WORKFLOW,
    )
    reply = await call(redis, payment, command)
    assert reply.type == "RefundFailed"
    assert reply.payload_dict() == {"reason": "the card of customer stuck cannot be refunded"}
    assert (await read_ledger(redis)).refunded_cents == 0


# --- inventory ---------------------------------------------------------------------


async def stock(redis: Redis) -> dict[str, tuple[int, int]]:
    """SKU -> (available, held)."""
    return {s.sku: (s.available, s.held) for s in (await read_ledger(redis)).stock}


async def test_inventory_reserves_every_sku_of_the_order(redis: Redis) -> None:
    pay = await captured(redis, ("SKU-1", 2, "1.00"), ("SKU-2", 5, "1.00"), ("SKU-1", 1, "1.00"))
    reply = await call(redis, worker("inventory", default_stock=10), event("PaymentCaptured", pay))
    assert reply.type == "InventoryReserved"
    assert reply.payload_dict()["reservation_id"].startswith("res_")
    assert await stock(redis) == {"SKU-1": (7, 3), "SKU-2": (5, 5)}


async def test_inventory_is_unavailable_when_a_sku_is_short_and_reserves_nothing(redis: Redis) -> None:
    pay = await captured(redis, ("SKU-1", 2, "1.00"), ("SKU-2", 11, "1.00"))
    reply = await call(redis, worker("inventory", default_stock=10), event("PaymentCaptured", pay))
    assert reply.type == "InventoryUnavailable"
    assert reply.payload_dict() == {"reason": "not enough stock of SKU-2", "skus": ["SKU-2"]}
    assert await stock(redis) == {}


async def test_inventory_decides_once_per_workflow(redis: Redis) -> None:
    inventory = worker("inventory", default_stock=5)
    pay = await captured(redis, ("SKU-1", 3, "1.00"))
    first = await call(redis, inventory, event("PaymentCaptured", pay))
    again = await call(redis, inventory, event("PaymentCaptured", pay))
    assert again.payload_dict() == first.payload_dict()
    assert await stock(redis) == {"SKU-1": (2, 3)}
    # a second workflow finds the stock the first one left
    other = await captured(redis, ("SKU-1", 3, "1.00"), workflow="wf-2")
    short = await call(redis, inventory, event("PaymentCaptured", other, workflow="wf-2"))
    assert short.type == "InventoryUnavailable"


async def test_release_gives_the_stock_back_exactly_once(redis: Redis) -> None:
    inventory = worker("inventory", default_stock=10)
    pay = await captured(redis, ("SKU-1", 4, "1.00"))
    await call(redis, inventory, event("PaymentCaptured", pay))
    first = await call(redis, inventory, compensate("ReleaseInventory", "inventory"))
    again = await call(redis, inventory, compensate("ReleaseInventory", "inventory"))
    assert first.type == "InventoryReleased"
    assert first.payload_dict()["detail"] == "released the reserved stock"
    assert again.payload_dict()["detail"] == "the reserved stock was already released"
    assert await stock(redis) == {"SKU-1": (10, 0)}


async def test_release_without_a_reservation_answers_and_changes_nothing(redis: Redis) -> None:
    reply = await call(redis, worker("inventory"), compensate("ReleaseInventory", "inventory"))
    assert reply.type == "InventoryReleased"
    assert reply.payload_dict()["detail"] == "nothing was reserved"
    assert await stock(redis) == {}


async def test_concurrent_reservations_never_oversell(redis: Redis) -> None:
    inventory = worker("inventory", default_stock=10)
    workflows = [f"wf-{i}" for i in range(8)]
    payments = [await captured(redis, ("SKU-1", 3, "1.00"), workflow=wf) for wf in workflows]
    replies = await asyncio.gather(
        *(
            call(redis, inventory, event("PaymentCaptured", pay, workflow=wf))
            for pay, wf in zip(payments, workflows, strict=True)
        )
    )
    assert sorted(reply.type for reply in replies).count("InventoryReserved") == 3
    assert await stock(redis) == {"SKU-1": (1, 9)}


# --- shipping ----------------------------------------------------------------------


async def reserved(redis: Redis, country: str = "US") -> Reply:
    pay = await captured(redis, ("SKU-1", 1, "1.00"), country=country)
    reply = await call(redis, worker("inventory"), event("PaymentCaptured", pay))
    assert reply.type == "InventoryReserved"
    return reply


async def test_shipping_schedules_a_shipment_to_a_supported_country(redis: Redis) -> None:
    shipping = worker("shipping")
    reservation = await reserved(redis, "gb")
    first = await call(redis, shipping, event("InventoryReserved", reservation))
    again = await call(redis, shipping, event("InventoryReserved", reservation))
    assert first.type == "ShipmentScheduled"
    assert first.payload_dict()["shipment_id"].startswith("shp_")
    assert again.payload_dict() == first.payload_dict()
    [row] = (await read_ledger(redis)).orders
    assert row.shipped
    assert row.shipment_id == first.payload_dict()["shipment_id"]


async def test_shipping_fails_for_an_unsupported_country_and_names_it(redis: Redis) -> None:
    shipping = worker("shipping", countries=("US", "CA"))
    reply = await call(redis, shipping, event("InventoryReserved", await reserved(redis, "BR")))
    assert reply.type == "ShipmentFailed"
    assert reply.payload_dict() == {"reason": "cannot ship to BR: supported countries are US, CA"}
    [row] = (await read_ledger(redis)).orders
    assert not row.shipped


async def test_cancel_shipment_is_recorded_once_and_answers_without_a_shipment(redis: Redis) -> None:
    shipping = worker("shipping")
    nothing = await call(redis, shipping, compensate("CancelShipment", "shipping"))
    assert nothing.payload_dict() == {"step": "shipping", "detail": "no shipment was scheduled"}
    assert (await read_ledger(redis)).orders == []
    await call(redis, shipping, event("InventoryReserved", await reserved(redis)))
    first = await call(redis, shipping, compensate("CancelShipment", "shipping"))
    again = await call(redis, shipping, compensate("CancelShipment", "shipping"))
    assert first.type == again.type == "ShipmentCancelled"
    assert first.payload_dict()["detail"] == "cancelled the shipment"
    [row] = (await read_ledger(redis)).orders
    assert row.shipped
    assert row.cancelled


# --- notification ------------------------------------------------------------------


async def test_notification_tells_the_customer_once(redis: Redis) -> None:
    shipped = await call(redis, worker("shipping"), event("InventoryReserved", await reserved(redis)))
    notification = worker("notification")
    first = await call(redis, notification, event("ShipmentScheduled", shipped))
    again = await call(redis, notification, event("ShipmentScheduled", shipped))
    assert first.type == "CustomerNotified"
    assert first.payload_dict() == again.payload_dict() == {"customer_id": "cust-1", "channel": "email"}
    assert await redis.hlen(ledger.NOTIFICATIONS) == 1


async def test_notification_fails_for_the_configured_customers(redis: Redis) -> None:
    shipped = await call(redis, worker("shipping"), event("InventoryReserved", await reserved(redis)))
    reply = await call(
        redis, worker("notification", notify_fail_customers=("cust-1",)), event("ShipmentScheduled", shipped)
    )
    assert reply.type == "NotificationFailed"
    assert "cust-1" in reply.payload_dict()["reason"]
    assert await redis.hlen(ledger.NOTIFICATIONS) == 0


# --- the workers together ----------------------------------------------------------


def test_every_worker_name_builds_its_participant() -> None:
    subscriptions = {name: worker(name).types for name in WORKER_NAMES}
    assert subscriptions == {
        "payment": ("OrderSubmitted", "RefundPayment"),
        "inventory": ("PaymentCaptured", "ReleaseInventory"),
        "shipping": ("CancelShipment", "InventoryReserved"),
        "notification": ("ShipmentScheduled",),
    }
    with pytest.raises(ValueError, match="unknown worker 'billing'"):
        worker("billing")


def test_worker_settings_default_to_the_documented_values() -> None:
    settings = WorkerSettings(redis_url="redis://x")
    assert (settings.partitions, settings.concurrency, settings.batch, settings.max_deliveries) == (16, 64, 200, 5)
    assert settings.payment_limit == Decimal("1000.00")
    assert (settings.default_stock, settings.countries) == (100, ("US", "CA", "GB", "DE", "FR", "NL"))
    assert settings.runner_settings().claim_idle_ms == 5000


async def test_the_four_workers_carry_an_order_through_the_happy_path(redis: Redis, redis_url: str) -> None:
    base = fast_settings(redis_url)
    settings = WorkerSettings(redis_url=redis_url, partitions=PARTITIONS, claim_idle_ms=300)
    async with (
        running(build("payment", settings), dataclasses.replace(base, consumer="payment-1")),
        running(build("inventory", settings), dataclasses.replace(base, consumer="inventory-1")),
        running(build("shipping", settings), dataclasses.replace(base, consumer="shipping-1")),
        running(build("notification", settings), dataclasses.replace(base, consumer="notification-1")),
    ):
        start = submitted(("SKU-1", 2, "5.00"), workflow="wf-happy")
        await publish(redis, start)
        [notified] = await eventually(
            lambda: emitted(redis, "CustomerNotified"), lambda found: len(found) == 1, what="the notification"
        )
    assert notified.correlation_id == "wf-happy"
    [row] = (await read_ledger(redis)).orders
    assert (row.captured_cents, row.reserved, row.shipped, row.notified) == (1000, {"SKU-1": 2}, True, True)


async def test_run_worker_runs_until_stopped_and_keeps_outcomes_as_long_as_asked(redis: Redis, redis_url: str) -> None:
    stop = asyncio.Event()
    settings = WorkerSettings(
        redis_url=redis_url, partitions=PARTITIONS, consumer="w-1", claim_idle_ms=1000, outcome_ttl_s=3_600
    )
    task = asyncio.create_task(run_worker("payment", settings, stop))
    try:
        await publish(redis, submitted(("SKU-1", 1, "1.00"), workflow="wf-run"))
        await eventually(lambda: emitted(redis, "PaymentCaptured"), lambda found: len(found) == 1, what="a capture")
    finally:
        stop.set()
        await task
    [record] = [key async for key in redis.scan_iter(match="*:done:payment:*")]
    assert 3_500 < await redis.ttl(record) <= 3_600
