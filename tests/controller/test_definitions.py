"""Loading definitions: the documented example file is valid and takes over `order`."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from contracts.definitions import ORDER_SAGA, StepDefinition, WorkflowDefinition
from contracts.messages import TIMER_FIRED
from controller.definitions import Definitions, UnknownWorkflow

EXAMPLE = Path(__file__).parents[2] / "examples" / "definitions.json"


def test_the_documented_example_loads_as_a_newer_order_saga() -> None:
    definitions = Definitions.load(EXAMPLE)
    latest = definitions.latest("order")
    assert latest.version == 2
    assert latest.sla_s == 120
    assert latest.step_map["notification"].timeout_policy == "flag"
    assert latest.step_map["payment"].compensation is not None
    assert latest.step_map["payment"].compensation.retry.max_attempts == 6
    assert definitions.get("order", 1) == ORDER_SAGA  # running v1 workflows keep their definition


def test_the_controller_reads_its_own_timers_and_every_event_of_every_definition() -> None:
    types = Definitions.load(EXAMPLE).event_types()
    assert TIMER_FIRED in types
    assert {"PaymentCaptured", "ShipmentCancelled", "NotificationFailed"} <= types
    assert "RefundPayment" not in types  # commands are sent, not correlated
    # the start event only means "payment started", which start() applies itself
    assert "OrderSubmitted" not in types


def test_a_start_type_another_definition_correlates_is_still_read() -> None:
    second = ORDER_SAGA.model_copy(update={"name": "reorder", "start": "ReorderRequested"})
    steps = list(second.steps)
    steps[0] = steps[0].model_copy(update={"trigger": "ReorderRequested"})
    watcher = WorkflowDefinition(
        name="audit",
        start="AuditOpened",
        steps=(StepDefinition(name="log", participant="auditor", trigger="AuditOpened", completed="OrderSubmitted"),),
    )
    types = Definitions([ORDER_SAGA, second.model_copy(update={"steps": tuple(steps)}), watcher]).event_types()
    assert "OrderSubmitted" in types  # it completes a step of "audit"
    assert "ReorderRequested" not in types


def test_unknown_names_and_versions_are_reported() -> None:
    definitions = Definitions()
    with pytest.raises(UnknownWorkflow, match="'loan'"):
        definitions.latest("loan")
    with pytest.raises(UnknownWorkflow, match="version 9"):
        definitions.get("order", 9)


def test_an_invalid_file_is_refused_with_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('[{"name": "x", "start": "Go", "steps": [], "sla_s": -1}]')
    with pytest.raises(ValidationError, match=r"steps|sla_s"):
        Definitions.load(bad)
