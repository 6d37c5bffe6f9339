"""Workflow definitions: the data that drives the controller's state machine.

A definition names the event that starts a workflow and, per step, the event that
triggers it, the events that end it, and how to undo it.  The controller has no
code per workflow: it reads these tables.
"""

from __future__ import annotations

import zlib
from enum import StrEnum
from functools import cached_property
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from contracts import naming


class Role(StrEnum):
    """What a message type means to one step of a definition."""

    TRIGGER = "trigger"
    COMPLETED = "completed"
    FAILED = "failed"
    COMPENSATED = "compensated"
    COMPENSATION_FAILED = "compensation_failed"


Breach = Literal["compensate", "flag"]


class RetryPolicy(BaseModel):
    """How a command the controller sends is tried again: ``max_attempts`` in all,
    waiting ``base_s · 2^(n-1)`` (at most ``max_s``, ± ``jitter``) after failed attempt n."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_attempts: int = Field(default=5, ge=1, le=100)
    base_s: float = Field(default=1.0, gt=0)
    max_s: float = Field(default=60.0, gt=0)
    jitter: float = Field(default=0.2, ge=0, le=1, description="fraction of the delay added or taken at random")

    def delay_s(self, attempt: int, seed: str) -> float:
        """Wait after failed attempt ``attempt`` (1-based).  The jitter is drawn from
        ``seed`` so deciding twice gives the same delay."""
        delay: float = min(self.base_s * 2 ** (attempt - 1), self.max_s)
        spread = (zlib.crc32(f"{seed}/{attempt}".encode()) / 0xFFFFFFFF) * 2 - 1  # in [-1, 1]
        return max(0.0, delay * (1 + self.jitter * spread))


class CompensationDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    command: str = Field(description="command type the controller sends to undo the step")
    completed: str = Field(description="event type the participant emits once undone")
    failed: tuple[str, ...] = Field(default=(), description="event types reporting the undo failed")
    timeout_s: float = Field(default=30.0, gt=0, description="wait this long for an answer to each attempt")
    retry: RetryPolicy = Field(default_factory=RetryPolicy)


class StepDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    participant: str
    trigger: str = Field(description="event type that starts the step")
    completed: str = Field(description="event type with which the step succeeds")
    failed: tuple[str, ...] = Field(default=(), description="event types with which the step fails")
    critical: bool = Field(default=True, description="a failure of a critical step compensates the workflow")
    compensation: CompensationDefinition | None = None
    orchestrated: bool = Field(
        default=False,
        description="the controller sends `command` instead of the participant reacting to `trigger`",
    )
    command: str | None = Field(default=None, description="command type of an orchestrated step")
    timeout_s: float | None = Field(
        default=None, gt=0, description="the step must end this long after it started (per attempt if orchestrated)"
    )
    on_timeout: Breach | None = Field(
        default=None, description="compensate the workflow, or flag and go on; default: compensate if critical"
    )
    retry: RetryPolicy = Field(
        default_factory=lambda: RetryPolicy(max_attempts=1),
        description="attempts of an orchestrated step's command before the step times out",
    )

    @model_validator(mode="after")
    def _orchestrated_has_command(self) -> StepDefinition:
        if self.orchestrated and not self.command:
            raise ValueError(f"orchestrated step {self.name!r} needs a command type")
        return self

    @property
    def timeout_policy(self) -> Breach:
        return self.on_timeout or ("compensate" if self.critical else "flag")

    def types(self) -> list[str]:
        """Every message type this step involves."""
        names = [self.trigger, self.completed, *self.failed]
        if self.command:
            names.append(self.command)
        if self.compensation:
            names += [self.compensation.command, self.compensation.completed, *self.compensation.failed]
        return names


class WorkflowDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: int = 1
    start: str = Field(description="event type the controller publishes to start a workflow")
    steps: tuple[StepDefinition, ...] = Field(min_length=1)
    sla_s: float | None = Field(
        default=None,
        gt=0,
        description="the whole workflow must finish this long after it started; a submission may ask for less",
    )
    on_breach: Breach = Field(default="compensate", description="what an SLA breach does")

    @model_validator(mode="after")
    def _check(self) -> WorkflowDefinition:
        names = [self.name, self.start] + [t for step in self.steps for t in step.types()]
        names += [step.name for step in self.steps] + [step.participant for step in self.steps]
        for name in names:
            if not naming.is_valid_name(name):
                raise ValueError(f"{name!r} is not a valid name (letters, digits, _ . -; starts with a letter)")
        if len({step.name for step in self.steps}) != len(self.steps):
            raise ValueError("step names must be unique")
        if any(step.participant == naming.CONTROLLER_GROUP for step in self.steps):
            raise ValueError(f"{naming.CONTROLLER_GROUP!r} is reserved for the controller")
        return self

    @cached_property
    def roles(self) -> dict[str, list[tuple[str, Role]]]:
        """message type -> [(step name, role)] — a type may end one step and start the next."""
        table: dict[str, list[tuple[str, Role]]] = {}

        def add(message_type: str, step: str, role: Role) -> None:
            table.setdefault(message_type, []).append((step, role))

        for step in self.steps:
            add(step.trigger, step.name, Role.TRIGGER)
            add(step.completed, step.name, Role.COMPLETED)
            for failed in step.failed:
                add(failed, step.name, Role.FAILED)
            if step.compensation:
                add(step.compensation.completed, step.name, Role.COMPENSATED)
                for failed in step.compensation.failed:
                    add(failed, step.name, Role.COMPENSATION_FAILED)
        return table

    @cached_property
    def step_map(self) -> dict[str, StepDefinition]:
        return {step.name: step for step in self.steps}

    def message_types(self) -> set[str]:
        """Every type the controller must read for this definition (events it correlates)."""
        return set(self.roles)

    def command_types(self) -> set[str]:
        """Every type the controller publishes for this definition."""
        types = {self.start}
        for step in self.steps:
            if step.compensation:
                types.add(step.compensation.command)
            if step.command:
                types.add(step.command)
        return types


ORDER_SAGA = WorkflowDefinition(
    name="order",
    version=1,
    start="OrderSubmitted",
    sla_s=300.0,
    steps=(
        StepDefinition(
            name="payment",
            participant="payment",
            timeout_s=30.0,
            trigger="OrderSubmitted",
            completed="PaymentCaptured",
            failed=("PaymentDeclined",),
            compensation=CompensationDefinition(
                command="RefundPayment", completed="PaymentRefunded", failed=("RefundFailed",)
            ),
        ),
        StepDefinition(
            name="inventory",
            participant="inventory",
            timeout_s=30.0,
            trigger="PaymentCaptured",
            completed="InventoryReserved",
            failed=("InventoryUnavailable",),
            compensation=CompensationDefinition(
                command="ReleaseInventory", completed="InventoryReleased", failed=("ReleaseFailed",)
            ),
        ),
        StepDefinition(
            name="shipping",
            participant="shipping",
            timeout_s=60.0,
            trigger="InventoryReserved",
            completed="ShipmentScheduled",
            failed=("ShipmentFailed",),
            compensation=CompensationDefinition(
                command="CancelShipment", completed="ShipmentCancelled", failed=("CancelShipmentFailed",)
            ),
        ),
        StepDefinition(
            name="notification",
            participant="notification",
            timeout_s=30.0,
            trigger="ShipmentScheduled",
            completed="CustomerNotified",
            failed=("NotificationFailed",),
            critical=False,
        ),
    ),
)
