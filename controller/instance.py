"""A workflow instance: the controller's state of one running (or finished) workflow."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from contracts.envelope import WorkflowRef


class WorkflowStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"
    FAILED = "failed"
    NEEDS_ATTENTION = "needs_attention"


TERMINAL = frozenset({WorkflowStatus.COMPLETED, WorkflowStatus.COMPENSATED, WorkflowStatus.FAILED})


class StepStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"
    SKIPPED = "skipped"


class StepState(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    participant: str
    status: StepStatus = StepStatus.PENDING
    started_at: datetime | None = None
    finished_at: datetime | None = None
    deadline_at: datetime | None = Field(default=None, description="when the step (or its compensation) times out")
    attempts: int = Field(default=0, description="attempts of the command in flight (orchestrated or compensation)")
    retrying: bool = Field(default=False, description="waiting to send the next attempt")
    command_id: str | None = Field(
        default=None, description="message id of the compensation attempt in flight (older attempts' answers are stale)"
    )
    compensation_started_at: datetime | None = None
    compensated_at: datetime | None = None
    result: dict[str, Any] | None = Field(default=None, description="payload of the event that completed the step")
    error: str | None = None


class Instance(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    workflow: WorkflowRef
    status: WorkflowStatus = WorkflowStatus.RUNNING
    version: int = Field(default=1, description="bumped by every committed transition")
    events: int = Field(default=0, description="number of history entries")
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None
    input: dict[str, Any]
    steps: list[StepState]
    error: str | None = None
    cause: str | None = Field(
        default=None, description="why compensation began; `error` says it too until a compensation gives up"
    )
    sla_deadline_at: datetime | None = None
    sla_breached: bool = False
    timers: dict[str, int] = Field(default_factory=dict, description="active timer name -> generation")
    idempotency_key: str | None = None
    request_hash: str | None = None
    commit: str = Field(default="", description="the token of the commit that wrote this state")

    def step(self, name: str) -> StepState:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)


# what the API shows of an instance: a list row, and the detail view (everything but these)
SUMMARY_FIELDS: set[str] = {"workflow", "status", "created_at", "updated_at", "finished_at", "error"}
HIDDEN_FIELDS: set[str] = {"id", "request_hash", "events", "commit", "cause"}


class HistoryEntry(BaseModel):
    """One line of a workflow's history: a message it received or sent."""

    model_config = ConfigDict(extra="ignore")

    seq: int
    at: datetime
    direction: str = Field(description="'in' for a correlated event, 'out' for a message the controller sent")
    type: str
    message_id: str
    causation_id: str | None = None
    producer: str
    step: str | None = None
    step_status: StepStatus | None = None
    status: WorkflowStatus
    detail: str | None = None
