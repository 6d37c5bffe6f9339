"""The controller's decisions, as pure functions of (definition, instance, message, now).

Nothing here does I/O.  :func:`start` creates an instance and its start event;
:func:`transition` applies one correlated message — a participant's event, a
fired timer, or an operator's request.  Both return the new instance, the messages
to publish, the history lines to append and the timers to set or cancel; the store
commits all of it atomically.

Timers are data: a step's deadline, a compensation attempt's deadline or the wait
before its next attempt, the workflow's SLA.  Each has a name (``step:<step>``,
``comp:<step>``, ``sla``) and a generation (the instance version that set it); a
fired timer whose generation is no longer current is stale and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from contracts.definitions import Role, StepDefinition, WorkflowDefinition
from contracts.envelope import Envelope, WorkflowRef, derived_message_id
from contracts.messages import CANCEL_REQUESTED, RETRY_REQUESTED, SLA_BREACHED, TIMER_FIRED
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
_ACTIVE = (WorkflowStatus.RUNNING, WorkflowStatus.COMPENSATING)
_MAY_COMPLETE = frozenset(
    {StepStatus.PENDING, StepStatus.RUNNING, StepStatus.FAILED, StepStatus.TIMED_OUT, StepStatus.SKIPPED}
)


@dataclass(frozen=True)
class TimerChange:
    """Remove the timer of generation ``cancel`` (if any); set one due in ``delay_s`` (if any)."""

    name: str
    cancel: int | None = None
    delay_s: float | None = None
    generation: int = 0


@dataclass
class Transition:
    instance: Instance
    outgoing: list[Envelope] = field(default_factory=list)
    history: list[HistoryEntry] = field(default_factory=list)
    timers: list[TimerChange] = field(default_factory=list)


class NotAllowed(Exception):
    """An operator request that the workflow's state does not allow."""


def start(
    definition: WorkflowDefinition,
    workflow_id: str,
    payload: dict[str, Any],
    now: datetime,
    *,
    sla_s: float | None = None,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
    traceparent: str | None = None,
) -> Transition:
    """A new instance and the event that starts the choreography.

    The start event is applied to the instance at once (it triggers the first
    step), so the controller need not wait to read its own message back.
    ``sla_s`` may tighten the definition's SLA, never loosen it.
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
    decider = _Decider(definition, instance, start_event, now, fresh=True)
    sla = effective_sla(definition, sla_s)
    if sla is not None:
        decider.instance.sla_deadline_at = now + timedelta(seconds=sla)
        decider.set_timer("sla", sla)
    result = decider.run()
    result.history[0].direction = "out"
    result.outgoing.insert(0, start_event)
    return result


def effective_sla(definition: WorkflowDefinition, requested: float | None) -> float | None:
    if requested is None:
        return definition.sla_s
    if requested <= 0:
        raise ValueError("sla_seconds must be positive")
    if definition.sla_s is not None and requested > definition.sla_s:
        raise ValueError(f"sla_seconds may not exceed the definition's {definition.sla_s:g}")
    return requested


def transition(definition: WorkflowDefinition, instance: Instance, message: Envelope, now: datetime) -> Transition:
    """Apply one correlated message.  ``instance`` is not modified."""
    return _Decider(definition, instance, message, now).run()


def check_operator_request(instance: Instance, message_type: str) -> None:
    """Raise :class:`NotAllowed` unless the workflow can be cancelled / retried now."""
    if message_type == CANCEL_REQUESTED and instance.status is not WorkflowStatus.RUNNING:
        raise NotAllowed(f"only a running workflow can be cancelled; this one is {instance.status}")
    if message_type == RETRY_REQUESTED and instance.status is not WorkflowStatus.NEEDS_ATTENTION:
        raise NotAllowed(f"only a workflow that needs attention can be retried; this one is {instance.status}")


class _Decider:
    """One transition in the making: the new instance and what it produces.

    ``instance`` is copied (steps and timers included) and left as it was, unless it
    is ``fresh``: made for this transition alone, so nobody else can see it change.
    """

    def __init__(
        self, definition: WorkflowDefinition, instance: Instance, cause: Envelope, now: datetime, *, fresh: bool = False
    ) -> None:
        new = (
            instance
            if fresh
            else instance.model_copy(
                update={"steps": [step.model_copy() for step in instance.steps], "timers": dict(instance.timers)}
            )
        )
        new.version += 1
        new.updated_at = now
        self.definition = definition
        self.instance = new
        self.cause = cause
        self.now = now
        self.result = Transition(instance=new)

    # --- the transition ----------------------------------------------------------

    def run(self) -> Transition:
        cause = self.cause
        roles = self.definition.roles.get(cause.type, [])
        # attribute the line to the step the message ends, else to the step it starts
        main_step = next((name for name, role in roles if role is not Role.TRIGGER), roles[0][0] if roles else None)
        if cause.type == TIMER_FIRED:  # a deadline belongs to the step it names (none for the SLA)
            named = str(cause.payload.get("timer", "")).partition(":")[2]
            main_step = named if named in self.definition.step_map else None
        self.record(cause, "in", step=main_step)
        if cause.type == TIMER_FIRED:
            notes = [self.timer_fired()]
        elif cause.type in (CANCEL_REQUESTED, RETRY_REQUESTED):
            notes = [self.operator_request()]
        else:
            notes = [self.implied(name) for name, role in roles if role in (Role.COMPLETED, Role.FAILED)]
            notes += [
                self.apply(self.definition.step_map[name], self.instance.step(name), role) for name, role in roles
            ]
            if not roles:
                notes.append("not part of this workflow")
        self.result.history[0].detail = "; ".join(n for n in notes if n) or None
        self.settle()
        for entry in self.result.history:
            # history lines carry the statuses after the whole transition
            entry.status = self.instance.status
            entry.step_status = self.instance.step(entry.step).status if entry.step else None
        return self.result

    def apply(self, definition: StepDefinition, step: StepState, role: Role) -> str | None:
        """Change one step for one role of a message; returns a note for the history."""
        instance = self.instance
        running = instance.status is WorkflowStatus.RUNNING
        payload = self.cause.payload
        if role is Role.TRIGGER:
            # a choreographed step runs once its trigger is out, whatever the workflow's status:
            # its participant reacts to the event, not to the workflow.  An orchestrated one runs
            # on its command, which goes out only while the workflow runs.
            choreographed = not definition.orchestrated and instance.status in _ACTIVE
            if step.status is StepStatus.PENDING and (running or choreographed):
                self.start_step(definition, step, self.now)
                if definition.orchestrated and definition.command:
                    step.attempts = 1
                    self.send_step_command(definition, payload)
            return None
        if role is Role.COMPLETED:
            if step.status not in _MAY_COMPLETE:
                return f"{step.name} already {step.status}; ignored"
            # a step may complete after it was given up (failed, timed out, skipped):
            # choreography raced ahead, and the completion is compensated like any other
            late = step.status not in (StepStatus.PENDING, StepStatus.RUNNING)
            if late:  # its error says what came first
                step.error = f"{step.error or step.status.value.replace('_', ' ')}, then completed late"
            self.end_step(step, StepStatus.COMPLETED)
            step.result = payload
            if running:
                return f"{step.name} completed late" if late else None
            return f"{step.name} completed while the workflow was {instance.status}; " + _after_the_end(
                instance.status, definition
            )
        if role is Role.FAILED:
            if step.status not in (StepStatus.PENDING, StepStatus.RUNNING):
                return f"{step.name} already {step.status}; ignored"
            reason = str(payload.get("reason") or self.cause.type)
            self.end_step(step, StepStatus.FAILED)
            step.error = reason
            if definition.critical and running:
                self.begin_compensation(f"{step.name} failed: {reason}")
            return None if definition.critical else f"{step.name} is not critical; the workflow goes on"
        if step.status is not StepStatus.COMPENSATING:
            return f"{step.name} is {step.status}, not compensating; ignored"
        if role is Role.COMPENSATED:
            step.status = StepStatus.COMPENSATED
            step.compensated_at = self.now
            step.deadline_at = None
            step.retrying = False
            step.error = None
            self.cancel_timer(f"comp:{step.name}")
            detail = payload.get("detail")  # what the participant says it undid, for the history
            return detail if isinstance(detail, str) and detail else None
        # Role.COMPENSATION_FAILED
        if step.retrying:
            return f"{step.name} is already waiting to retry; ignored"
        cause = self.cause.causation_id
        if cause and step.command_id and cause != step.command_id:
            return f"a failure of an earlier attempt to compensate {step.name}; ignored"
        return self.compensation_attempt_failed(definition, step, str(payload.get("reason") or self.cause.type))

    def implied(self, ended: str) -> str | None:
        """A step ended, so its trigger was published: the choreographed steps whose completion
        that trigger is (and theirs, and so on) have completed, even where the completion is
        not read yet (a backlog drains each stream at its own pace).  Such a step still pending
        runs as far as the workflow knows, since when is unknown: its completion is on its way,
        and a compensation waits for it (see :meth:`settle`)."""
        if self.instance.status not in _ACTIVE:
            return None
        started: list[str] = []
        steps = self.instance.steps
        triggers = [self.definition.step_map[ended].trigger]
        while triggers:
            for name, role in self.definition.roles.get(triggers.pop(), ()):
                definition = self.definition.step_map[name]
                if role is not Role.COMPLETED or definition.orchestrated:
                    continue  # (an orchestrated step ran on a command, sent once its trigger was read)
                # (none: a step added to the definition since the workflow started)
                step = next((s for s in steps if s.name == name), None)
                if step is not None and step.status is StepStatus.PENDING:
                    self.start_step(definition, step, None)
                    started.append(step.name)
                    triggers.append(definition.trigger)
        if not started:
            return None
        names, until = " and ".join(started), "they are" if len(started) > 1 else "it is"
        return f"{names} completed before {ended} (not read yet): running until {until}"

    def start_step(self, definition: StepDefinition, step: StepState, started_at: datetime | None) -> None:
        step.status = StepStatus.RUNNING
        step.started_at = started_at
        if definition.timeout_s:
            self.set_timer(f"step:{step.name}", definition.timeout_s, step)

    def may_need_undoing(self, step: StepState) -> bool:
        """Whether ``step`` is running with a deadline and has a compensation: it may still
        complete and then need undoing, and its deadline bounds a wait for it."""
        return (
            step.status is StepStatus.RUNNING
            and step.deadline_at is not None
            and self.definition.step_map[step.name].compensation is not None
        )

    def end_step(self, step: StepState, status: StepStatus) -> None:
        step.status = status
        step.started_at = step.started_at or self.now
        step.finished_at = self.now
        step.deadline_at = None
        step.retrying = False
        self.cancel_timer(f"step:{step.name}")

    def begin_compensation(self, error: str) -> None:
        self.instance.status = WorkflowStatus.COMPENSATING
        self.instance.error = self.instance.cause = error

    # --- timers ------------------------------------------------------------------

    def timer_fired(self) -> str | None:
        payload = self.cause.payload
        name = str(payload["timer"])
        if self.instance.timers.get(name) != payload["generation"]:
            return f"stale timer {name}; ignored"
        del self.instance.timers[name]
        kind, _, step_name = name.partition(":")
        if kind == "sla":
            return self.sla_breached()
        definition = self.definition.step_map.get(step_name)
        if definition is None:
            return f"timer {name} names no step; ignored"
        step = self.instance.step(step_name)
        if kind == "step":
            return self.step_timed_out(definition, step)
        return self.compensation_timer(definition, step)

    def step_timed_out(self, definition: StepDefinition, step: StepState) -> str | None:
        if step.status is not StepStatus.RUNNING:
            return None
        if definition.orchestrated and step.retrying:
            step.retrying = False
            step.attempts += 1
            self.send_step_command(definition, self.instance.input)
            assert definition.timeout_s is not None
            self.set_timer(f"step:{step.name}", definition.timeout_s, step)
            return f"{step.name}: attempt {step.attempts}"
        if definition.orchestrated and step.attempts < definition.retry.max_attempts:
            step.retrying = True
            self.set_timer(f"step:{step.name}", definition.retry.delay_s(step.attempts, self.instance.id), step)
            return f"{step.name}: attempt {step.attempts} timed out; retrying"
        timeout = f"{step.name} timed out after {definition.timeout_s:g}s"
        self.end_step(step, StepStatus.TIMED_OUT)
        step.error = "timed out"
        if definition.timeout_policy == "flag":
            return f"{timeout}; flagged" + (
                ", the workflow goes on" if self.instance.status is WorkflowStatus.RUNNING else ""
            )
        if self.instance.status is WorkflowStatus.RUNNING:
            self.begin_compensation(timeout)
        return timeout

    def compensation_timer(self, definition: StepDefinition, step: StepState) -> str | None:
        if step.status is not StepStatus.COMPENSATING:
            return None
        assert definition.compensation is not None
        if step.retrying:
            step.retrying = False
            step.attempts += 1
            self.send_compensation(definition, step)
            return f"compensating {step.name}: attempt {step.attempts}"
        timeout = definition.compensation.timeout_s
        return self.compensation_attempt_failed(definition, step, f"no answer within {timeout:g}s")

    def compensation_attempt_failed(self, definition: StepDefinition, step: StepState, reason: str) -> str:
        assert definition.compensation is not None
        policy = definition.compensation.retry
        step.error = f"compensation attempt {step.attempts} failed: {reason}"
        if step.attempts >= policy.max_attempts:
            step.deadline_at = None
            self.cancel_timer(f"comp:{step.name}")
            self.instance.status = WorkflowStatus.NEEDS_ATTENTION
            self.instance.error = f"compensating {step.name} failed after {step.attempts} attempts: {reason}"
            return self.instance.error
        step.retrying = True
        delay = policy.delay_s(step.attempts, f"{self.instance.id}/{step.name}")
        self.set_timer(f"comp:{step.name}", delay, step)
        return f"{step.error}; retrying in {delay:.1f}s"

    def sla_breached(self) -> str | None:
        instance = self.instance
        if instance.status not in _ACTIVE:
            return None
        instance.sla_breached = True
        deadline = (instance.sla_deadline_at or self.now).isoformat()
        sla_s = (instance.sla_deadline_at - instance.created_at).total_seconds() if instance.sla_deadline_at else 0.0
        self.send(SLA_BREACHED, {"sla_s": sla_s, "deadline_at": deadline}, step=None)
        if instance.status is WorkflowStatus.COMPENSATING:
            # the compensation waits for running steps that may need undoing, each up to its
            # deadline: once the SLA has passed, it waits no longer
            given_up = [s for s in instance.steps if s.status is StepStatus.RUNNING]
            for step in given_up:
                self.end_step(step, StepStatus.TIMED_OUT)
                step.error = "given up when the SLA passed"
            names = ", ".join(s.name for s in given_up) or "none"
            return f"SLA of {sla_s:g}s breached while compensating; running steps given up: {names}"
        if self.definition.on_breach == "flag":
            return f"SLA of {sla_s:g}s breached; flagged, the workflow goes on"
        self.begin_compensation(f"SLA of {sla_s:g}s breached")
        return None

    def set_timer(self, name: str, delay_s: float, step: StepState | None = None) -> None:
        generation = self.instance.version
        self.result.timers.append(
            TimerChange(name, cancel=self.instance.timers.get(name), delay_s=delay_s, generation=generation)
        )
        self.instance.timers[name] = generation
        if step is not None:
            step.deadline_at = self.now + timedelta(seconds=delay_s)

    def cancel_timer(self, name: str) -> None:
        generation = self.instance.timers.pop(name, None)
        if generation is not None:
            self.result.timers.append(TimerChange(name, cancel=generation))

    # --- operators -----------------------------------------------------------------

    def operator_request(self) -> str | None:
        try:
            check_operator_request(self.instance, self.cause.type)
        except NotAllowed as exc:
            return f"{exc}; ignored"
        who = self.cause.payload.get("by") or "an operator"
        why = self.cause.payload.get("reason")
        said = f"{who}" + (f": {why}" if why else "")
        if self.cause.type == CANCEL_REQUESTED:
            self.begin_compensation(f"cancelled by {said}")
            return f"cancel requested by {said}"
        # retry: every compensation that gave up starts over with a fresh attempt count, and
        # the workflow's error is again why it is compensating (not the give-up it was retried after)
        self.instance.status = WorkflowStatus.COMPENSATING
        self.instance.error = self.instance.cause or self.instance.error
        for step in self.instance.steps:
            definition = self.definition.step_map[step.name]
            if (
                step.status is StepStatus.COMPENSATING
                and not step.retrying
                and "comp:" + step.name not in self.instance.timers
            ):
                step.attempts = 1
                self.send_compensation(definition, step)
        return f"retry requested by {said}"

    # --- moving on -------------------------------------------------------------------

    def settle(self) -> None:
        """Move the workflow on after its steps changed: finish it, or take the next
        compensation step (one at a time, last completed step first)."""
        instance = self.instance
        if instance.status is WorkflowStatus.RUNNING:
            if all(_step_done(self.definition.step_map[s.name], s) for s in instance.steps):
                self.finish(WorkflowStatus.COMPLETED)
            return
        if instance.status in (WorkflowStatus.COMPLETED, WorkflowStatus.NEEDS_ATTENTION):
            return
        # compensating, or a finished compensation that a late completion reopens
        steps = instance.steps
        if any(s.status is StepStatus.COMPENSATING for s in steps):
            instance.status = WorkflowStatus.COMPENSATING
            return
        to_undo = [
            s
            for s in reversed(steps)
            if s.status is StepStatus.COMPLETED and self.definition.step_map[s.name].compensation
        ]
        if to_undo:
            instance.status = WorkflowStatus.COMPENSATING
            step = to_undo[0]
            later = steps[steps.index(step) + 1 :]
            if any(self.may_need_undoing(s) for s in later):
                return  # a later step may still complete: undo it first
            step.status = StepStatus.COMPENSATING
            step.compensation_started_at = self.now
            step.attempts = 1
            step.error = None
            self.send_compensation(self.definition.step_map[step.name], step)
            return
        if any(self.may_need_undoing(s) for s in steps):
            instance.status = WorkflowStatus.COMPENSATING  # wait for it
            return
        for s in steps:
            if s.status is StepStatus.RUNNING:  # nothing to undo, or no deadline: not waited for
                self.end_step(s, StepStatus.SKIPPED)
            elif s.status is StepStatus.PENDING:
                s.status = StepStatus.SKIPPED
        undone = any(s.status is StepStatus.COMPENSATED for s in steps)
        self.finish(WorkflowStatus.COMPENSATED if undone else WorkflowStatus.FAILED)

    def finish(self, status: WorkflowStatus) -> None:
        instance = self.instance
        was_finished = instance.status in TERMINAL
        instance.status = status
        if not was_finished or instance.finished_at is None:
            instance.finished_at = self.now
        for name in list(instance.timers):
            self.cancel_timer(name)
        for step in instance.steps:
            step.deadline_at = None

    # --- messages ----------------------------------------------------------------------

    def send_step_command(self, definition: StepDefinition, payload: dict[str, Any]) -> None:
        assert definition.command is not None
        step = self.instance.step(definition.name)
        self.send(
            definition.command, {"step": definition.name, "input": payload}, step=definition.name, attempt=step.attempts
        )

    def send_compensation(self, definition: StepDefinition, step: StepState) -> None:
        assert definition.compensation is not None
        payload = {
            "step": step.name,
            "reason": self.instance.cause or self.instance.error or "compensating",
            "completed": step.result or {},
            # the same for every attempt: a participant may dedupe the undo on it
            "idempotency_key": f"{self.instance.id}/{step.name}/compensation",
        }
        sent = self.send(definition.compensation.command, payload, step=step.name, attempt=step.attempts)
        step.command_id = sent.message_id
        self.set_timer(f"comp:{step.name}", definition.compensation.timeout_s, step)

    def send(self, message_type: str, payload: dict[str, Any], *, step: str | None, attempt: int = 1) -> Envelope:
        instance = self.instance
        message = Envelope(
            message_id=derived_message_id(self.cause.message_id, message_type, step or "", str(attempt)),
            type=message_type,
            correlation_id=instance.id,
            causation_id=self.cause.message_id,
            workflow=instance.workflow,
            producer=PRODUCER,
            occurred_at=self.now,
            attempt=attempt,
            traceparent=self.cause.traceparent,
            payload=payload,
        )
        self.result.outgoing.append(message)
        self.record(message, "out", step=step)
        return message

    def record(self, message: Envelope, direction: str, *, step: str | None) -> None:
        instance = self.instance
        self.result.history.append(
            HistoryEntry(
                seq=instance.events,
                at=self.now,
                direction=direction,
                type=message.type,
                message_id=message.message_id,
                causation_id=message.causation_id,
                producer=message.producer,
                step=step,
                status=instance.status,
                detail=None,
            )
        )
        instance.events += 1


def _step_done(definition: StepDefinition, step: StepState) -> bool:
    if step.status is StepStatus.COMPLETED:
        return True
    return not definition.critical and step.status in (StepStatus.FAILED, StepStatus.SKIPPED, StepStatus.TIMED_OUT)


def _after_the_end(status: WorkflowStatus, definition: StepDefinition) -> str:
    """What becomes of a step that completes once its workflow no longer runs (see :meth:`_Decider.settle`)."""
    if status is WorkflowStatus.COMPLETED:
        return "recorded; the workflow stays as it is"
    if definition.compensation is None:
        return "it has no compensation, so nothing is undone"
    if status is WorkflowStatus.NEEDS_ATTENTION:
        return "it will be compensated when an operator retries the workflow"
    return "it will be compensated"
