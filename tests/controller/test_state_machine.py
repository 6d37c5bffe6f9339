"""The pure state machine, driven by definitions; no Redis."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from contracts.definitions import ORDER_SAGA, StepDefinition, WorkflowDefinition
from contracts.envelope import Envelope
from controller import state_machine
from controller.instance import Instance, StepStatus, WorkflowStatus

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ORDER = {
    "customer_id": "c-1",
    "items": [{"sku": "A", "quantity": 1, "unit_price": "5.00"}],
    "currency": "USD",
    "ship_to": {"country": "US"},
}


class Saga:
    """Feeds events to the state machine and keeps the latest instance."""

    def __init__(self, definition: WorkflowDefinition = ORDER_SAGA, payload: dict[str, Any] | None = None) -> None:
        self.definition = definition
        self.now = T0
        result = state_machine.start(definition, "wf-1", payload or {"order": ORDER}, self.now)
        self.instance = result.instance
        self.sent = [m.type for m in result.outgoing]
        self.history = list(result.history)
        self.counter = 0

    def event(
        self, message_type: str, payload: dict[str, Any] | None = None, message_id: str | None = None
    ) -> Instance:
        self.counter += 1
        self.now += timedelta(seconds=1)
        message = Envelope(
            message_id=message_id or f"m-{self.counter}",
            type=message_type,
            correlation_id=self.instance.id,
            workflow=self.instance.workflow,
            producer="test",
            occurred_at=self.now,
            payload=payload or {},
        )
        before = self.instance.model_copy(deep=True)
        result = state_machine.transition(self.definition, self.instance, message, self.now)
        assert self.instance == before, "transition must not modify its input"
        assert result.instance.version == before.version + 1
        self.instance = result.instance
        self.sent += [m.type for m in result.outgoing]
        self.history += result.history
        return self.instance

    def status(self) -> WorkflowStatus:
        return self.instance.status

    def steps(self) -> dict[str, StepStatus]:
        return {s.name: s.status for s in self.instance.steps}


def test_start_publishes_the_start_event_and_runs_the_first_step() -> None:
    saga = Saga()
    assert saga.sent == ["OrderSubmitted"]
    assert saga.status() is WorkflowStatus.RUNNING
    assert saga.steps() == {
        "payment": "running",
        "inventory": "pending",
        "shipping": "pending",
        "notification": "pending",
    }
    assert saga.instance.step("payment").started_at == T0
    assert [(h.direction, h.type, h.seq) for h in saga.history] == [("out", "OrderSubmitted", 0)]


def test_happy_path_completes_with_every_step_completed_and_no_command_sent() -> None:
    saga = Saga()
    saga.event("PaymentCaptured", {"payment_id": "p"})
    saga.event("InventoryReserved")
    saga.event("ShipmentScheduled")
    assert saga.status() is WorkflowStatus.RUNNING
    saga.event("CustomerNotified")
    assert saga.status() is WorkflowStatus.COMPLETED
    assert set(saga.steps().values()) == {StepStatus.COMPLETED}
    assert saga.sent == ["OrderSubmitted"]  # choreography: the controller sends nothing on the happy path
    assert saga.instance.finished_at == saga.now
    assert saga.instance.step("payment").result == {"payment_id": "p"}
    assert [h.seq for h in saga.history] == list(range(5))


def test_payment_declined_fails_with_nothing_to_undo() -> None:
    saga = Saga()
    saga.event("PaymentDeclined", {"reason": "over limit"})
    assert saga.status() is WorkflowStatus.FAILED
    assert saga.steps() == {
        "payment": "failed",
        "inventory": "skipped",
        "shipping": "skipped",
        "notification": "skipped",
    }
    assert saga.instance.error == "payment failed: over limit"
    assert saga.sent == ["OrderSubmitted"]


def test_stock_shortage_refunds_the_payment() -> None:
    saga = Saga()
    saga.event("PaymentCaptured", {"payment_id": "p", "amount": "5.00"})
    saga.event("InventoryUnavailable", {"reason": "A short"})
    assert saga.status() is WorkflowStatus.COMPENSATING
    assert saga.sent[-1] == "RefundPayment"
    saga.event("PaymentRefunded")
    assert saga.status() is WorkflowStatus.COMPENSATED
    assert saga.steps()["payment"] is StepStatus.COMPENSATED


def test_shipping_failure_compensates_in_reverse_order_one_at_a_time() -> None:
    saga = Saga()
    saga.event("PaymentCaptured", {"payment_id": "p"})
    saga.event("InventoryReserved", {"reservation_id": "r"})
    saga.event("ShipmentFailed", {"reason": "country XX not served"})
    assert saga.sent == ["OrderSubmitted", "ReleaseInventory"]
    assert saga.steps()["inventory"] is StepStatus.COMPENSATING
    assert saga.steps()["payment"] is StepStatus.COMPLETED
    saga.event("InventoryReleased")
    assert saga.sent[-1] == "RefundPayment"
    saga.event("PaymentRefunded")
    assert saga.status() is WorkflowStatus.COMPENSATED
    assert saga.steps() == {
        "payment": "compensated",
        "inventory": "compensated",
        "shipping": "failed",
        "notification": "skipped",
    }


def test_compensation_command_carries_what_the_step_completed_with() -> None:
    saga = Saga()
    saga.event("PaymentCaptured", {"payment_id": "p-9", "amount": "5.00"})
    result = state_machine.transition(
        ORDER_SAGA,
        saga.instance,
        Envelope(
            message_id="fail",
            type="InventoryUnavailable",
            correlation_id="wf-1",
            workflow=saga.instance.workflow,
            producer="inventory",
            occurred_at=T0,
            payload={"reason": "none left"},
        ),
        T0,
    )
    [command] = result.outgoing
    assert command.type == "RefundPayment"
    assert command.causation_id == "fail"
    assert command.payload == {
        "step": "payment",
        "reason": "inventory failed: none left",
        "completed": {"payment_id": "p-9", "amount": "5.00"},
    }


def test_notification_failure_never_compensates() -> None:
    saga = Saga()
    for event in ("PaymentCaptured", "InventoryReserved", "ShipmentScheduled"):
        saga.event(event)
    saga.event("NotificationFailed", {"reason": "mailbox full"})
    assert saga.status() is WorkflowStatus.COMPLETED
    assert saga.steps()["notification"] is StepStatus.FAILED
    assert saga.sent == ["OrderSubmitted"]


def test_events_out_of_order_still_complete() -> None:
    saga = Saga()
    saga.event("InventoryReserved")
    saga.event("CustomerNotified")
    saga.event("ShipmentScheduled")
    assert saga.status() is WorkflowStatus.RUNNING
    saga.event("PaymentCaptured")
    assert saga.status() is WorkflowStatus.COMPLETED


def test_a_step_completing_during_compensation_is_compensated_too() -> None:
    saga = Saga()
    saga.event("PaymentCaptured")
    saga.event("InventoryUnavailable", {"reason": "short"})
    assert saga.sent[-1] == "RefundPayment"
    # a completion that raced with the failure: undone after the refund, not revived
    saga.event("ShipmentScheduled")
    assert saga.steps()["shipping"] is StepStatus.COMPLETED
    assert saga.sent[-1] == "RefundPayment"  # one compensation at a time
    saga.event("PaymentRefunded")
    assert saga.sent[-1] == "CancelShipment"
    saga.event("ShipmentCancelled")
    assert saga.status() is WorkflowStatus.COMPENSATED


def test_a_completion_after_the_workflow_failed_reopens_compensation() -> None:
    saga = Saga()
    saga.event("PaymentDeclined", {"reason": "limit"})
    assert saga.status() is WorkflowStatus.FAILED
    saga.event("InventoryReserved")
    assert saga.status() is WorkflowStatus.COMPENSATING
    assert saga.sent[-1] == "ReleaseInventory"
    saga.event("InventoryReleased")
    assert saga.status() is WorkflowStatus.COMPENSATED


def test_failed_compensation_needs_attention() -> None:
    saga = Saga()
    saga.event("PaymentCaptured")
    saga.event("InventoryUnavailable", {"reason": "short"})
    saga.event("RefundFailed", {"reason": "card expired"})
    assert saga.status() is WorkflowStatus.NEEDS_ATTENTION
    assert saga.instance.error == "compensating payment failed: card expired"
    saga.event("PaymentRefunded")  # e.g. after an operator fixed it
    assert saga.steps()["payment"] is StepStatus.COMPENSATED


@pytest.mark.parametrize("event", ["PaymentCaptured", "PaymentDeclined"])
def test_repeated_outcomes_are_recorded_but_change_nothing(event: str) -> None:
    saga = Saga()
    saga.event("PaymentCaptured", {"payment_id": "first"})
    steps_before = saga.steps()
    saga.event(event, {"payment_id": "second", "reason": "late"})
    assert saga.steps() == steps_before
    assert saga.instance.step("payment").result == {"payment_id": "first"}
    assert "already completed" in (saga.history[-1].detail or "")


def test_an_unrelated_type_is_recorded_as_not_part_of_the_workflow() -> None:
    saga = Saga()
    saga.event("SomethingElse")
    assert saga.history[-1].detail == "not part of this workflow"
    assert saga.steps()["payment"] is StepStatus.RUNNING


def test_history_lines_carry_the_status_after_the_transition() -> None:
    saga = Saga()
    saga.event("PaymentCaptured")
    saga.event("InventoryUnavailable", {"reason": "short"})
    incoming, outgoing = saga.history[-2:]
    assert (incoming.direction, incoming.type, incoming.step, incoming.step_status, incoming.status) == (
        "in",
        "InventoryUnavailable",
        "inventory",
        "failed",
        "compensating",
    )
    assert (outgoing.direction, outgoing.type, outgoing.step, outgoing.step_status) == (
        "out",
        "RefundPayment",
        "payment",
        "compensating",
    )


def test_outgoing_ids_are_derived_from_the_cause_so_a_rerun_repeats_them() -> None:
    saga = Saga()
    saga.event("PaymentCaptured")
    message = Envelope(
        message_id="cause",
        type="InventoryUnavailable",
        correlation_id="wf-1",
        workflow=saga.instance.workflow,
        producer="inventory",
        occurred_at=T0,
        payload={"reason": "x"},
    )
    first = state_machine.transition(ORDER_SAGA, saga.instance, message, T0)
    second = state_machine.transition(ORDER_SAGA, saga.instance, message, T0)
    assert [m.message_id for m in first.outgoing] == [m.message_id for m in second.outgoing]


def test_orchestrated_step_gets_a_command_from_the_controller() -> None:
    definition = WorkflowDefinition(
        name="kyc",
        start="Applied",
        steps=(
            StepDefinition(
                name="check",
                participant="checker",
                trigger="Applied",
                completed="Checked",
                orchestrated=True,
                command="RunCheck",
            ),
        ),
    )
    saga = Saga(definition, {"applicant": "a"})
    assert saga.sent == ["Applied", "RunCheck"]
    assert saga.steps() == {"check": "running"}
    saga.event("Checked")
    assert saga.status() is WorkflowStatus.COMPLETED


def test_a_step_without_compensation_is_not_undone() -> None:
    definition = WorkflowDefinition(
        name="two",
        start="Go",
        steps=(
            StepDefinition(name="a", participant="pa", trigger="Go", completed="ADone"),
            StepDefinition(name="b", participant="pb", trigger="ADone", completed="BDone", failed=("BFailed",)),
        ),
    )
    saga = Saga(definition, {})
    saga.event("ADone")
    saga.event("BFailed", {"reason": "no"})
    assert saga.status() is WorkflowStatus.FAILED
    assert saga.steps() == {"a": "completed", "b": "failed"}
