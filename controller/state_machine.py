"""The controller's decisions, as pure functions of (definition, instance, message, now).

Nothing here does I/O.  :func:`start` creates an instance and its start event;
:func:`transition` applies one correlated message.  Both return the new instance,
the messages to publish and the history lines to append; the store commits all of
it atomically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from contracts.definitions import Role, StepDefinition, WorkflowDefinition
from contracts.envelope import Envelope, WorkflowRef, derived_message_id
from contracts.naming import CONTROLLER_GROUP
from controller.instance import (
    TERMINAL,
    HistoryEntry,
    Instance,
    StepState,
    StepStatus,
    WorkflowStatus,
)

PRODUCER = CONTROLLER_GROUP
_MAY_COMPLETE = frozenset(
    {StepStatus.PENDING, StepStatus.RUNNING, StepStatus.FAILED, StepStatus.TIMED_OUT, StepStatus.SKIPPED}
)


@dataclass
class Transition:
    instance: Instance
    outgoing: list[Envelope] = field(default_factory=list)
    history: list[HistoryEntry] = field(default_factory=list)


def start(
    definition: WorkflowDefinition,
    workflow_id: str,
    payload: dict[str, Any],
    now: datetime,
    *,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
    traceparent: str | None = None,
) -> Transition:
    """A new instance and the event that starts the choreography.

    The start event is applied to the instance at once (it triggers the first
    step), so the controller need not wait to read its own message back.
    """
    instance = Instance(
        id=workflow_id,
        workflow=WorkflowRef(name=definition.name, version=definition.version),
        version=0,
        created_at=now,
        updated_at=now,
        input=payload,
        steps=[StepState(name=step.name, participant=step.participant) for step in definition.steps],
        idempotency_key=idempotency_key,
        request_hash=request_hash,
    )
    start_event = Envelope(
        message_id=derived_message_id(workflow_id, "start"),
        type=definition.start,
        correlation_id=workflow_id,
        workflow=instance.workflow,
        producer=PRODUCER,
        occurred_at=now,
        traceparent=traceparent,
        payload=payload,
    )
    result = transition(definition, instance, start_event, now)
    result.history[0].direction = "out"
    result.outgoing.insert(0, start_event)
    return result


def transition(definition: WorkflowDefinition, instance: Instance, message: Envelope, now: datetime) -> Transition:
    """Apply one correlated message.  ``instance`` is not modified."""
    new = instance.model_copy(update={"steps": [step.model_copy() for step in instance.steps]})
    new.version += 1
    new.updated_at = now
    result = Transition(instance=new)
    roles = definition.roles.get(message.type, [])
    # attribute the line to the step the message ends, else to the step it starts
    main_step = next((name for name, role in roles if role is not Role.TRIGGER), roles[0][0] if roles else None)
    _record(result, message, "in", now, step=main_step, detail=None)
    notes = [_apply(definition.step_map[name], new.step(name), role, result, message, now) for name, role in roles]
    result.history[0].detail = "; ".join(n for n in notes if n) or (None if roles else "not part of this workflow")
    _settle(definition, result, message, now)
    for entry in result.history:
        # history lines carry the statuses after the whole transition
        entry.status = new.status
        entry.step_status = new.step(entry.step).status if entry.step else None
    return result


def _apply(
    definition: StepDefinition,
    step: StepState,
    role: Role,
    result: Transition,
    message: Envelope,
    now: datetime,
) -> str | None:
    """Change one step for one role of a message; returns a note for the history."""
    instance = result.instance
    running = instance.status is WorkflowStatus.RUNNING
    if role is Role.TRIGGER:
        if step.status is StepStatus.PENDING and running:
            step.status = StepStatus.RUNNING
            step.started_at = now
            if definition.orchestrated and definition.command:
                _send(
                    result,
                    definition.command,
                    {"step": step.name, "input": message.payload},
                    message,
                    now,
                    step=step.name,
                )
        return None
    if role is Role.COMPLETED:
        if step.status not in _MAY_COMPLETE:
            return f"{step.name} already {step.status}; ignored"
        # a step may complete after it was given up (failed, timed out, skipped):
        # choreography raced ahead, and the completion is compensated like any other
        late = step.status not in (StepStatus.PENDING, StepStatus.RUNNING)
        step.status = StepStatus.COMPLETED
        step.started_at = step.started_at or now
        step.finished_at = now
        step.result = message.payload
        if not running:
            return f"{step.name} completed while the workflow was {instance.status}; it will be compensated"
        return "late completion" if late else None
    if role is Role.FAILED:
        if step.status not in (StepStatus.PENDING, StepStatus.RUNNING):
            return f"{step.name} already {step.status}; ignored"
        reason = str(message.payload.get("reason") or message.type)
        step.status = StepStatus.FAILED
        step.started_at = step.started_at or now
        step.finished_at = now
        step.error = reason
        if definition.critical and running:
            instance.status = WorkflowStatus.COMPENSATING
            instance.error = f"{step.name} failed: {reason}"
        return None if definition.critical else f"{step.name} is not critical; the workflow goes on"
    if role is Role.COMPENSATED:
        if step.status is not StepStatus.COMPENSATING:
            return f"{step.name} is {step.status}, not compensating; ignored"
        step.status = StepStatus.COMPENSATED
        step.compensated_at = now
        return None
    # Role.COMPENSATION_FAILED
    if step.status is not StepStatus.COMPENSATING:
        return f"{step.name} is {step.status}, not compensating; ignored"
    reason = str(message.payload.get("reason") or message.type)
    step.error = f"compensation failed: {reason}"
    instance.status = WorkflowStatus.NEEDS_ATTENTION
    instance.error = f"compensating {step.name} failed: {reason}"
    return None


def _settle(definition: WorkflowDefinition, result: Transition, cause: Envelope, now: datetime) -> None:
    """Move the workflow on after its steps changed: finish it, or take the next
    compensation step (one at a time, last completed step first)."""
    instance = result.instance
    if instance.status is WorkflowStatus.NEEDS_ATTENTION:
        return
    if instance.status is WorkflowStatus.RUNNING:
        if all(_step_done(definition.step_map[s.name], s) for s in instance.steps):
            instance.status = WorkflowStatus.COMPLETED
            instance.finished_at = now
        return
    if instance.status is WorkflowStatus.COMPLETED:
        return
    # compensating, or a finished compensation that a late completion reopens
    steps = instance.steps
    if any(s.status is StepStatus.COMPENSATING for s in steps):
        instance.status = WorkflowStatus.COMPENSATING
        return
    to_undo = [
        s for s in reversed(steps) if s.status is StepStatus.COMPLETED and definition.step_map[s.name].compensation
    ]
    if to_undo:
        _compensate(definition.step_map[to_undo[0].name], to_undo[0], result, cause, now)
        return
    if any(s.status is StepStatus.RUNNING for s in steps):
        instance.status = WorkflowStatus.COMPENSATING
        return
    for s in steps:
        if s.status is StepStatus.PENDING:
            s.status = StepStatus.SKIPPED
    was_terminal = instance.status in TERMINAL
    instance.status = (
        WorkflowStatus.COMPENSATED if any(s.status is StepStatus.COMPENSATED for s in steps) else WorkflowStatus.FAILED
    )
    if not was_terminal or instance.finished_at is None:
        instance.finished_at = now


def _step_done(definition: StepDefinition, step: StepState) -> bool:
    if step.status is StepStatus.COMPLETED:
        return True
    return not definition.critical and step.status in (StepStatus.FAILED, StepStatus.SKIPPED, StepStatus.TIMED_OUT)


def _compensate(step_def: StepDefinition, step: StepState, result: Transition, cause: Envelope, now: datetime) -> None:
    assert step_def.compensation is not None
    instance = result.instance
    instance.status = WorkflowStatus.COMPENSATING
    step.status = StepStatus.COMPENSATING
    step.compensation_started_at = now
    payload = {"step": step.name, "reason": instance.error or "compensating", "completed": step.result or {}}
    _send(result, step_def.compensation.command, payload, cause, now, step=step.name)


def _send(
    result: Transition,
    message_type: str,
    payload: dict[str, Any],
    cause: Envelope,
    now: datetime,
    *,
    step: str,
) -> None:
    instance = result.instance
    message = Envelope(
        message_id=derived_message_id(cause.message_id, message_type, step),
        type=message_type,
        correlation_id=instance.id,
        causation_id=cause.message_id,
        workflow=instance.workflow,
        producer=PRODUCER,
        occurred_at=now,
        traceparent=cause.traceparent,
        payload=payload,
    )
    result.outgoing.append(message)
    _record(result, message, "out", now, step=step, detail=None)


def _record(
    result: Transition,
    message: Envelope,
    direction: str,
    now: datetime,
    *,
    step: str | None,
    detail: str | None,
) -> None:
    instance = result.instance
    result.history.append(
        HistoryEntry(
            seq=instance.events,
            at=now,
            direction=direction,
            type=message.type,
            message_id=message.message_id,
            causation_id=message.causation_id,
            producer=message.producer,
            step=step,
            step_status=instance.step(step).status if step else None,
            status=instance.status,
            detail=detail,
        )
    )
    instance.events += 1
