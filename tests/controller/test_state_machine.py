"""The pure state machine, driven by definitions; no Redis."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from contracts.definitions import (
    ORDER_SAGA,
    CompensationDefinition,
    RetryPolicy,
    StepDefinition,
    WorkflowDefinition,
)
from contracts.envelope import Envelope
from contracts.messages import CANCEL_REQUESTED, RETRY_REQUESTED, SLA_BREACHED, TIMER_FIRED
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

    def __init__(
        self,
        definition: WorkflowDefinition = ORDER_SAGA,
        payload: dict[str, Any] | None = None,
        sla_s: float | None = None,
    ) -> None:
        self.definition = definition
        self.now = T0
        result = state_machine.start(definition, "wf-1", payload or {"order": ORDER}, self.now, sla_s=sla_s)
        self.instance = result.instance
        self.sent = [m.type for m in result.outgoing]
        self.outgoing = list(result.outgoing)
        self.timer_changes = list(result.timers)
        self.history = list(result.history)
        self.counter = 0

    def event(
        self,
        message_type: str,
        payload: dict[str, Any] | None = None,
        message_id: str | None = None,
        causation_id: str | None = None,
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
            causation_id=causation_id,
            payload=payload or {},
        )
        before = self.instance.model_copy(deep=True)
        result = state_machine.transition(self.definition, self.instance, message, self.now)
        assert self.instance == before, "transition must not modify its input"
        assert result.instance.version == before.version + 1
        self.instance = result.instance
        self.sent += [m.type for m in result.outgoing]
        self.outgoing += result.outgoing
        self.timer_changes += result.timers
        self.history += result.history
        return self.instance

    def fire(self, timer: str) -> Instance:
        """The timer ``timer`` (as currently set) fires."""
        generation = self.instance.timers[timer]
        return self.event(TIMER_FIRED, {"timer": timer, "generation": generation, "due_ms": 0})

    def status(self) -> WorkflowStatus:
        return self.instance.status

    def steps(self) -> dict[str, StepStatus]:
        return {s.name: s.status for s in self.instance.steps}


def refund_given_up() -> Saga:
    """A saga whose payment refund failed all 5 attempts: it needs attention."""
    saga = Saga()
    saga.event("PaymentCaptured")
    saga.event("InventoryUnavailable", {"reason": "short"})
    for _ in range(4):
        saga.event("RefundFailed", {"reason": "card expired"})
        saga.fire("comp:payment")
    saga.event("RefundFailed", {"reason": "card expired"})
    assert saga.status() is WorkflowStatus.NEEDS_ATTENTION
    return saga


def release_then_refund(saga: Saga) -> None:
    """The shipping failure's compensation, once ReleaseInventory is sent: the refund follows the release."""
    assert saga.sent[-1] == "ReleaseInventory"
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
    release_then_refund(saga)


def test_a_failure_read_before_the_completions_it_follows_waits_for_them_and_undoes_last_first() -> None:
    # after a stall each stream drains at its own pace: the controller reads ShipmentFailed
    # before PaymentCaptured and InventoryReserved, which came before it
    saga = Saga()
    saga.event("ShipmentFailed", {"reason": "country XX not served"})
    assert saga.steps() == {
        "payment": "running",
        "inventory": "running",
        "shipping": "failed",
        "notification": "pending",
    }
    assert saga.history[-1].detail == "inventory completed before shipping (not read yet): running until it is"
    assert saga.instance.step("inventory").started_at is None  # when, nobody knows
    assert "step:inventory" in saga.instance.timers  # the wait is bounded
    assert saga.status() is WorkflowStatus.COMPENSATING
    saga.event("PaymentCaptured", {"payment_id": "p"})
    assert saga.sent == ["OrderSubmitted"]  # the inventory step may still need undoing first
    saga.event("InventoryReserved", {"reservation_id": "r"})
    assert saga.sent[-1] == "ReleaseInventory"
    release_then_refund(saga)


def with_steps(*changes: tuple[str, dict[str, Any]], extra: tuple[dict[str, Any], ...] = ()) -> WorkflowDefinition:
    """The order saga with some steps' fields changed (by step name) and steps appended."""
    dumped = ORDER_SAGA.model_dump()
    for name, fields in changes:
        next(step for step in dumped["steps"] if step["name"] == name).update(fields)
    dumped["steps"] = [*dumped["steps"], *extra]
    return WorkflowDefinition.model_validate(dumped)


def test_an_orchestrated_step_is_never_implied_it_runs_on_its_command_only() -> None:
    saga = Saga(with_steps(("inventory", {"orchestrated": True, "command": "ReserveInventory"})))
    saga.event("ShipmentFailed", {"reason": "no"})
    assert saga.steps()["inventory"] is StepStatus.PENDING
    assert "step:inventory" not in saga.instance.timers
    assert "ReserveInventory" not in saga.sent


def test_nothing_is_implied_once_the_workflow_needs_attention() -> None:
    saga = refund_given_up()
    timers = dict(saga.instance.timers)
    saga.event("NotificationFailed", {"reason": "late and odd"})
    assert saga.steps()["shipping"] is StepStatus.PENDING
    assert saga.instance.timers == timers


def test_a_step_started_by_choreography_during_a_compensation_is_waited_for_and_undone_first() -> None:
    fraud = {
        "name": "fraud",
        "participant": "fraud",
        "trigger": "PaymentCaptured",
        "completed": "FraudCleared",
        "timeout_s": 30.0,
        "compensation": {"command": "UndoFraud", "completed": "FraudUndone"},
    }
    saga = Saga(with_steps(extra=(fraud,)))
    saga.event("ShipmentFailed", {"reason": "no"})  # read before everything it follows
    saga.event("PaymentCaptured")  # the fraud worker reacts to it, whatever the workflow's status
    assert saga.steps()["fraud"] is StepStatus.RUNNING
    saga.event("InventoryReserved")
    assert saga.sent == ["OrderSubmitted"]  # fraud may still complete
    saga.event("FraudCleared")
    assert saga.sent[-1] == "UndoFraud"
    saga.event("FraudUndone")
    assert saga.sent[-1] == "ReleaseInventory"


def test_a_flagged_timeout_during_a_compensation_does_not_say_the_workflow_goes_on() -> None:
    saga = Saga(with_steps(("inventory", {"on_timeout": "flag"})))
    saga.event("PaymentCaptured")
    saga.event(CANCEL_REQUESTED, {"by": "op"})
    saga.fire("step:inventory")
    fired = next(h for h in reversed(saga.history) if h.type == TIMER_FIRED)
    assert fired.detail == "inventory timed out after 30s; flagged"
    assert saga.sent[-1] == "RefundPayment"


def test_a_completion_implied_but_never_read_times_out_and_the_compensation_goes_on() -> None:
    saga = Saga()
    saga.event("PaymentCaptured")
    saga.event("ShipmentFailed", {"reason": "no"})  # its InventoryReserved never arrives
    assert saga.sent == ["OrderSubmitted"]
    saga.fire("step:inventory")
    assert saga.steps()["inventory"] is StepStatus.TIMED_OUT
    assert saga.sent[-1] == "RefundPayment"


def test_a_completion_read_before_the_one_it_follows_completes_the_workflow_once_both_are_in() -> None:
    saga = Saga()
    saga.event("ShipmentScheduled")  # PaymentCaptured and InventoryReserved are still unread
    assert saga.steps() == {
        "payment": "running",
        "inventory": "running",
        "shipping": "completed",
        "notification": "running",
    }
    saga.event("CustomerNotified")
    saga.event("InventoryReserved")
    assert saga.status() is WorkflowStatus.RUNNING
    saga.event("PaymentCaptured")
    assert saga.status() is WorkflowStatus.COMPLETED
    assert saga.instance.timers == {}
    assert saga.sent == ["OrderSubmitted"]


def test_a_compensation_does_not_wait_for_a_later_step_without_a_timeout() -> None:
    saga = Saga(with_steps(("inventory", {"timeout_s": None})))
    saga.event("PaymentCaptured")
    saga.event(CANCEL_REQUESTED, {"by": "bob"})
    # nothing bounds a wait for inventory: payment is undone now, inventory if it completes
    assert saga.sent[-1] == "RefundPayment"
    saga.event("PaymentRefunded")
    assert saga.status() is WorkflowStatus.COMPENSATED
    inventory = saga.instance.step("inventory")
    assert (inventory.status, inventory.finished_at) == (StepStatus.SKIPPED, saga.now)


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
        "idempotency_key": "wf-1/payment/compensation",
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


def test_a_late_completion_says_what_becomes_of_it() -> None:
    # compensating: a step with a compensation is undone in its turn
    saga = Saga()
    saga.event("PaymentCaptured")
    saga.event("InventoryUnavailable", {"reason": "short"})
    saga.event("ShipmentScheduled")
    assert saga.history[-1].detail == "shipping completed while the workflow was compensating; it will be compensated"
    # notification has nothing to undo: the note must not promise a compensation
    saga.event("CustomerNotified")
    assert saga.steps()["notification"] is StepStatus.COMPLETED
    assert saga.history[-1].detail == (
        "notification completed while the workflow was compensating; it has no compensation, so nothing is undone"
    )
    assert saga.sent[-1] == "RefundPayment"
    # a flagged, completed workflow is not reopened by a late notification
    saga = Saga()
    for event in ("PaymentCaptured", "InventoryReserved", "ShipmentScheduled"):
        saga.event(event)
    saga.fire("step:notification")
    assert saga.status() is WorkflowStatus.COMPLETED
    saga.event("CustomerNotified")
    assert saga.status() is WorkflowStatus.COMPLETED
    assert saga.history[-1].detail == (
        "notification completed while the workflow was completed; recorded; the workflow stays as it is"
    )
    # a workflow waiting for an operator: the late step is undone once the operator retries
    saga = refund_given_up()
    saga.event("ShipmentScheduled")
    assert saga.history[-1].detail == (
        "shipping completed while the workflow was needs_attention; "
        "it will be compensated when an operator retries the workflow"
    )
    assert saga.status() is WorkflowStatus.NEEDS_ATTENTION
    saga.event(RETRY_REQUESTED, {"by": "ops"})
    saga.event("PaymentRefunded")
    assert saga.sent[-1] == "CancelShipment"
    saga.event("ShipmentCancelled")
    assert saga.status() is WorkflowStatus.COMPENSATED


def test_a_failed_compensation_is_retried_then_needs_attention() -> None:
    saga = Saga()
    saga.event("PaymentCaptured")
    saga.event("InventoryUnavailable", {"reason": "short"})
    for attempt in range(1, 5):
        saga.event("RefundFailed", {"reason": "card expired"})
        assert saga.status() is WorkflowStatus.COMPENSATING
        assert saga.instance.step("payment").retrying
        saga.fire("comp:payment")  # the backoff passed: the next attempt goes out
        assert saga.sent[-1] == "RefundPayment"
        assert saga.instance.step("payment").attempts == attempt + 1
    saga.event("RefundFailed", {"reason": "card expired"})
    assert saga.status() is WorkflowStatus.NEEDS_ATTENTION
    assert saga.instance.error == "compensating payment failed after 5 attempts: card expired"
    assert "comp:payment" not in saga.instance.timers
    assert saga.sent.count("RefundPayment") == 5


def test_retry_by_an_operator_resumes_a_compensation_that_gave_up() -> None:
    saga = refund_given_up()
    with pytest.raises(state_machine.NotAllowed):
        state_machine.check_operator_request(saga.instance, CANCEL_REQUESTED)
    saga.event(RETRY_REQUESTED, {"by": "ops@example.com", "reason": "card updated"})
    assert saga.status() is WorkflowStatus.COMPENSATING
    assert saga.sent[-1] == "RefundPayment"
    assert saga.instance.step("payment").attempts == 1
    assert saga.history[-2].detail == "retry requested by ops@example.com: card updated"
    # the workflow says again why it is compensating, and so does the retried command
    assert saga.instance.error == saga.outgoing[-1].payload["reason"] == "inventory failed: short"
    saga.event("PaymentRefunded")
    assert saga.status() is WorkflowStatus.COMPENSATED
    assert saga.instance.error == "inventory failed: short"


def test_what_a_participant_says_it_undid_is_the_history_lines_detail() -> None:
    saga = Saga()
    saga.event("PaymentCaptured")
    saga.event("InventoryUnavailable", {"reason": "short"})
    saga.event("PaymentRefunded", {"step": "payment", "detail": "refunded 33.00 USD"})
    assert saga.status() is WorkflowStatus.COMPENSATED
    assert (saga.history[-1].type, saga.history[-1].detail) == ("PaymentRefunded", "refunded 33.00 USD")


def test_a_compensation_without_answer_is_resent_after_a_backoff() -> None:
    saga = Saga()
    saga.event("PaymentCaptured")
    saga.event("InventoryUnavailable", {"reason": "short"})
    payment = saga.instance.step("payment")
    assert payment.deadline_at == saga.now + timedelta(seconds=30)
    saga.fire("comp:payment")  # no answer within the timeout
    assert saga.instance.step("payment").retrying
    assert "no answer within 30s" in (saga.instance.step("payment").error or "")
    saga.fire("comp:payment")  # backoff over
    assert saga.sent[-2:] == ["RefundPayment", "RefundPayment"]
    first, second = saga.outgoing[-2:]
    assert (first.attempt, second.attempt) == (1, 2)
    assert first.message_id != second.message_id
    assert first.payload["idempotency_key"] == second.payload["idempotency_key"]
    saga.event("PaymentRefunded")
    assert saga.status() is WorkflowStatus.COMPENSATED
    assert saga.instance.timers == {}


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


def kyc(**step: Any) -> WorkflowDefinition:
    """A one-step workflow whose step is orchestrated: the controller sends RunCheck."""
    check = StepDefinition(
        name="check", participant="checker", trigger="Applied", completed="Checked", orchestrated=True,
        command="RunCheck", **step,
    )  # fmt: skip
    return WorkflowDefinition(name="kyc", start="Applied", steps=(check,))


def test_orchestrated_step_gets_a_command_from_the_controller() -> None:
    saga = Saga(kyc(), {"applicant": "a"})
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


# --- deadlines, SLAs, operators ---------------------------------------------------


def test_a_running_step_has_a_deadline_and_a_timer_cancelled_when_it_ends() -> None:
    saga = Saga()
    assert saga.instance.step("payment").deadline_at == T0 + timedelta(seconds=30)
    assert set(saga.instance.timers) == {"sla", "step:payment"}
    assert saga.instance.sla_deadline_at == T0 + timedelta(seconds=300)
    generation = saga.instance.timers["step:payment"]
    saga.event("PaymentCaptured")
    assert saga.instance.step("payment").deadline_at is None
    assert set(saga.instance.timers) == {"sla", "step:inventory"}
    cancelled = [c for c in saga.timer_changes if c.name == "step:payment" and c.delay_s is None]
    assert cancelled == [state_machine.TimerChange("step:payment", cancel=generation)]


def test_a_step_that_times_out_compensates_and_its_late_success_is_undone() -> None:
    saga = Saga()
    saga.event("PaymentCaptured")
    saga.event("InventoryReserved")
    saga.fire("step:shipping")
    assert saga.steps()["shipping"] is StepStatus.TIMED_OUT
    assert saga.instance.error == "shipping timed out after 60s"
    fired = next(h for h in saga.history if h.type == TIMER_FIRED)
    assert (fired.step, fired.step_status, fired.detail) == ("shipping", "timed_out", "shipping timed out after 60s")
    assert saga.sent[-1] == "ReleaseInventory"
    saga.event("InventoryReleased")
    saga.event("PaymentRefunded")
    assert saga.status() is WorkflowStatus.COMPENSATED
    # the shipping worker comes back and processes its stale trigger
    saga.event("ShipmentScheduled", {"shipment_id": "late"})
    assert saga.status() is WorkflowStatus.COMPENSATING
    assert saga.sent[-1] == "CancelShipment"
    assert "completed while the workflow was compensated" in (saga.history[-2].detail or "")
    saga.event("ShipmentCancelled")
    assert saga.status() is WorkflowStatus.COMPENSATED
    assert saga.steps()["shipping"] is StepStatus.COMPENSATED


def test_a_non_critical_step_that_times_out_is_flagged_and_the_workflow_completes() -> None:
    saga = Saga()
    for event in ("PaymentCaptured", "InventoryReserved", "ShipmentScheduled"):
        saga.event(event)
    saga.fire("step:notification")
    assert saga.status() is WorkflowStatus.COMPLETED
    assert saga.steps()["notification"] is StepStatus.TIMED_OUT
    assert saga.instance.timers == {}
    saga.event("CustomerNotified")  # late, and nothing to undo: kept, and its error says what came first
    assert saga.steps()["notification"] is StepStatus.COMPLETED
    assert saga.instance.step("notification").error == "timed out, then completed late"


def test_an_sla_breach_compensates_by_default_last_step_first() -> None:
    saga = Saga()
    saga.event("PaymentCaptured")
    saga.fire("sla")
    assert saga.instance.sla_breached
    assert saga.instance.error == "SLA of 300s breached"
    # the inventory step still runs: it may yet complete, and must then be undone first
    assert saga.sent[-1] == SLA_BREACHED
    assert saga.status() is WorkflowStatus.COMPENSATING
    saga.event("InventoryReserved")
    # and the shipping worker reacts to that whatever the workflow's status: wait for it too
    assert saga.steps()["shipping"] is StepStatus.RUNNING
    assert saga.sent[-1] == SLA_BREACHED
    saga.event("ShipmentScheduled")
    assert saga.sent[-1] == "CancelShipment"  # notification has nothing to undo: not waited for
    saga.event("ShipmentCancelled")
    assert saga.sent[-1] == "ReleaseInventory"
    saga.event("InventoryReleased")
    assert saga.sent[-1] == "RefundPayment"
    saga.event("PaymentRefunded")
    assert saga.status() is WorkflowStatus.COMPENSATED
    assert saga.steps()["notification"] is StepStatus.SKIPPED


def test_an_sla_breach_can_be_only_flagged() -> None:
    saga = Saga(ORDER_SAGA.model_copy(update={"on_breach": "flag"}), sla_s=5)
    assert saga.instance.sla_deadline_at == T0 + timedelta(seconds=5)
    saga.fire("sla")
    assert saga.instance.sla_breached
    assert saga.sent[-1] == SLA_BREACHED
    assert saga.status() is WorkflowStatus.RUNNING
    for event in ("PaymentCaptured", "InventoryReserved", "ShipmentScheduled", "CustomerNotified"):
        saga.event(event)
    assert saga.status() is WorkflowStatus.COMPLETED
    assert saga.instance.sla_breached


def test_a_submission_may_tighten_the_sla_but_not_loosen_it() -> None:
    assert state_machine.effective_sla(ORDER_SAGA, 10) == 10
    assert state_machine.effective_sla(ORDER_SAGA, None) == 300
    with pytest.raises(ValueError, match="may not exceed"):
        state_machine.effective_sla(ORDER_SAGA, 301)
    with pytest.raises(ValueError, match="positive"):
        state_machine.effective_sla(ORDER_SAGA, 0)


def test_a_stale_timer_changes_nothing() -> None:
    saga = Saga()
    stale = saga.instance.timers["step:payment"]
    saga.event("PaymentCaptured")
    saga.event(TIMER_FIRED, {"timer": "step:payment", "generation": stale, "due_ms": 0})
    assert saga.history[-1].detail == "stale timer step:payment; ignored"
    assert saga.steps()["payment"] is StepStatus.COMPLETED


def test_cancel_compensates_a_running_workflow_and_records_who() -> None:
    saga = Saga()
    saga.event("PaymentCaptured")
    saga.event(CANCEL_REQUESTED, {"by": "alice", "reason": "customer called"})
    assert saga.instance.error == "cancelled by alice: customer called"
    request = next(h for h in saga.history if h.type == CANCEL_REQUESTED)
    assert request.detail == "cancel requested by alice: customer called"  # as a retry's line says who and why
    # the inventory step was running when cancelled: its timeout bounds the wait for it
    assert saga.status() is WorkflowStatus.COMPENSATING
    assert saga.sent[-1] == "OrderSubmitted"
    saga.fire("step:inventory")
    assert saga.sent[-1] == "RefundPayment"
    saga.event("PaymentRefunded")
    assert saga.status() is WorkflowStatus.COMPENSATED
    with pytest.raises(state_machine.NotAllowed, match="only a running workflow"):
        state_machine.check_operator_request(saga.instance, CANCEL_REQUESTED)


def test_finishing_cancels_every_timer() -> None:
    saga = Saga()
    saga.event("PaymentDeclined", {"reason": "no"})
    assert saga.status() is WorkflowStatus.FAILED
    assert saga.instance.timers == {}
    assert {c.name for c in saga.timer_changes if c.delay_s is None} == {"sla", "step:payment"}


def test_an_orchestrated_step_command_is_retried_before_the_step_times_out() -> None:
    saga = Saga(kyc(timeout_s=10, retry=RetryPolicy(max_attempts=2, base_s=1, jitter=0)), {"applicant": "a"})
    saga.fire("step:check")  # attempt 1 unanswered: wait, then try again
    assert saga.sent == ["Applied", "RunCheck"]
    saga.fire("step:check")
    assert saga.sent == ["Applied", "RunCheck", "RunCheck"]
    saga.fire("step:check")  # attempt 2 unanswered: out of attempts
    assert saga.status() is WorkflowStatus.FAILED
    assert saga.steps() == {"check": "timed_out"}


def test_backoff_grows_exponentially_with_bounded_deterministic_jitter() -> None:
    policy = RetryPolicy(base_s=1, max_s=8, jitter=0.2)
    delays = [policy.delay_s(n, "wf") for n in range(1, 7)]
    for n, delay in enumerate(delays, start=1):
        nominal = min(2 ** (n - 1), 8)
        assert nominal * 0.8 <= delay <= nominal * 1.2
    assert delays == [policy.delay_s(n, "wf") for n in range(1, 7)]
    assert RetryPolicy(base_s=1, jitter=0).delay_s(3, "x") == 4


def two_steps(b_timeout_s: float | None) -> WorkflowDefinition:
    """Step a, then b (both undoable), with an SLA of 60 s."""
    return WorkflowDefinition(
        name="slow",
        start="Go",
        sla_s=60,
        steps=(
            StepDefinition(
                name="a",
                participant="pa",
                trigger="Go",
                completed="ADone",
                compensation=CompensationDefinition(command="UndoA", completed="AUndone"),
            ),
            StepDefinition(
                name="b",
                participant="pb",
                trigger="ADone",
                completed="BDone",
                timeout_s=b_timeout_s,
                compensation=CompensationDefinition(command="UndoB", completed="BUndone"),
            ),
        ),
    )


def test_an_sla_passing_during_compensation_gives_up_the_steps_it_waits_for() -> None:
    saga = Saga(two_steps(b_timeout_s=120), {})
    saga.event("ADone")
    saga.event(CANCEL_REQUESTED, {"by": "op"})
    assert saga.status() is WorkflowStatus.COMPENSATING  # waiting for b: it may complete
    assert saga.sent == ["Go"]
    saga.fire("sla")  # before b's own deadline
    assert saga.steps() == {"a": "compensating", "b": "timed_out"}
    assert saga.sent[-2:] == [SLA_BREACHED, "UndoA"]
    fired = next(h for h in saga.history if h.type == TIMER_FIRED)
    assert fired.detail == "SLA of 60s breached while compensating; running steps given up: b"
    saga.event("AUndone")
    assert saga.status() is WorkflowStatus.COMPENSATED


def test_a_step_without_a_deadline_is_not_waited_for_and_is_undone_if_it_completes_late() -> None:
    saga = Saga(two_steps(b_timeout_s=None), {})
    saga.event("ADone")
    saga.event(CANCEL_REQUESTED, {"by": "op"})
    assert saga.sent[-1] == "UndoA"  # nothing bounds a wait for b
    saga.event("AUndone")
    assert saga.status() is WorkflowStatus.COMPENSATED
    assert saga.steps() == {"a": "compensated", "b": "skipped"}
    assert saga.instance.timers == {}
    saga.event("BDone")  # it did run
    assert saga.sent[-1] == "UndoB"
    saga.event("BUndone")
    assert saga.status() is WorkflowStatus.COMPENSATED


def test_a_late_failure_of_an_earlier_compensation_attempt_is_ignored() -> None:
    saga = Saga()
    saga.event("PaymentCaptured")
    saga.event("InventoryUnavailable", {"reason": "short"})
    first_attempt = saga.outgoing[-1].message_id
    saga.fire("comp:payment")  # attempt 1 unanswered: back off
    saga.fire("comp:payment")  # attempt 2 goes out
    assert saga.instance.step("payment").attempts == 2
    saga.event("RefundFailed", {"reason": "timeout at the bank"}, causation_id=first_attempt)
    assert saga.history[-1].detail == "a failure of an earlier attempt to compensate payment; ignored"
    assert not saga.instance.step("payment").retrying
    second_attempt = saga.outgoing[-1].message_id
    saga.event("RefundFailed", {"reason": "card expired"}, causation_id=second_attempt)
    assert saga.instance.step("payment").retrying  # the current attempt's failure counts
