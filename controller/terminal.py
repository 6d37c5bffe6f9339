"""How ``streamsaga watch`` draws: one plain line per event, or a live ``rich`` view.

Plain lines are for pipes, CI and tests: stable columns, UTC clock times with
milliseconds, no colour.  The live views (:func:`workflow_panel`, :func:`board_panel`)
are ``rich`` renderables that ``rich.live.Live`` redraws a few times a second, so
durations and the time left to a deadline count on their own.  They lay themselves
out for the width they are given: below :data:`WIDE` columns they leave out what an
80-column terminal has no room for rather than cut every cell short.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.table import Table
from rich.text import Text

from controller.instance import StepState, StepStatus, WorkflowStatus

if TYPE_CHECKING:
    from controller.watch import Board, ProgressLine, WorkflowView

TIMELINE_ROWS = 12
WIDE = 120
"""Columns a live view needs for all of its columns; narrower, it shows those a terminal cannot do without."""
STATUS_STYLES = {
    "running": "cyan",
    "pending": "dim",
    "completed": "green",
    "compensating": "yellow",
    "compensated": "yellow",
    "failed": "red",
    "timed_out": "red",
    "needs_attention": "bold magenta",
    "skipped": "dim",
}
WORKFLOW_ORDER = tuple(WorkflowStatus)


# --- output -------------------------------------------------------------------------


def plain(console: Console, text: str) -> None:
    """One line on the console's file, flushed at once (a pipe reader sees it now)."""
    print(text, file=console.file, flush=True)


def error(console: Console, text: str) -> None:
    """A problem, on standard error (the console's own file may be the view)."""
    del console
    print(f"streamsaga watch: {text}", file=sys.stderr, flush=True)


# --- times --------------------------------------------------------------------------


def clock(moment: datetime) -> str:
    """``HH:MM:SS.mmm`` in UTC."""
    return moment.astimezone(UTC).strftime("%H:%M:%S.%f")[:-3]


def duration(seconds: float) -> str:
    """A short human duration: ``850ms``, ``4.2s``, ``3m07s``, ``2h05m``."""
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def _between(start: datetime | None, end: datetime | None) -> str | None:
    if start is None or end is None:
        return None
    return duration((end - start).total_seconds())


def _until(deadline: datetime, now: datetime) -> str:
    left = (deadline - now).total_seconds()
    return f"in {duration(left)}" if left >= 0 else f"overdue {duration(-left)}"


# --- one workflow, plain ----------------------------------------------------------------


def workflow_heading(view: WorkflowView) -> str:
    sla = f", SLA deadline {clock(view.sla_deadline_at)}" if view.sla_deadline_at else ""
    return (
        f"workflow {view.workflow_id} ({view.workflow.name} v{view.workflow.version}): "
        f"{view.status.value}, started {clock(view.created_at)}{sla}"
    )


def step_facts(step: StepState | None, step_status: StepStatus | None, current: bool = True) -> list[str]:
    """What the workflow's state adds to a line that moved ``step`` to ``step_status``:
    how long the step or its compensation took, and, when the line is the step's latest
    (``current``), the deadline it runs against, attempts and its error — a later line
    may have changed those since."""
    if step is None or step_status is None:
        return []
    facts: list[str] = []
    # (a step that ended twice — timed out, then completed late — has the later end's times)
    if step_status in (StepStatus.COMPLETED, StepStatus.FAILED, StepStatus.TIMED_OUT) and step.status == step_status:
        took = _between(step.started_at, step.finished_at)
        if took:
            facts.append(f"took {took}")
    if step_status == StepStatus.COMPENSATED:
        took = _between(step.compensation_started_at, step.compensated_at)
        if took:
            facts.append(f"compensated in {took}")
    if current and step.status == step_status:  # the state still is the line's
        if step.deadline_at is not None and step_status in (StepStatus.RUNNING, StepStatus.COMPENSATING):
            facts.append(f"deadline {clock(step.deadline_at)}")
        if step.attempts > 1:
            facts.append(f"attempt {step.attempts}")
        if step.retrying:
            facts.append("retrying")
    ended = step_status in (StepStatus.FAILED, StepStatus.TIMED_OUT)  # an ended step's error stays its own
    if step.error and (ended or (current and step_status is StepStatus.COMPENSATING)):
        facts.append(f"error: {step.error}")
    return facts


def line_text(line: ProgressLine, view: WorkflowView | None, latest: bool = True) -> str:
    """One history line: when, in or out, the message, the step and what it became, the
    workflow's status after it, and what the state adds (see :func:`step_facts`; ``latest``:
    no later line is about the same step)."""
    facts = step_facts(view.step(line.step) if view else None, line.step_status, latest)
    if line.detail:
        facts = [fact for fact in facts if not fact.startswith("error: ")]  # the detail tells it for this line
        facts.append(line.detail)
    step_status = line.step_status.value if line.step_status else "-"
    text = (
        f"{clock(line.at)} {line.direction:<3} {line.type:<24} {line.step or '-':<13} {step_status:<13}"
        f"workflow {line.status.value}"
    )
    return f"{text}  {'; '.join(facts)}" if facts else text


def outcome_text(view: WorkflowView, status: WorkflowStatus, code: int) -> str:
    end = view.finished_at or view.updated_at
    text = f"workflow {view.workflow_id} {status.value} after {duration((end - view.created_at).total_seconds())}"
    if view.error:
        text += f": {view.error}"
    return f"{text} (exit {code})"


# --- one workflow, live ------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    name: str
    wide_only: bool = False  # left out below WIDE columns
    wraps: bool = False  # the one column that takes what room is left, wrapping


@dataclass(frozen=True)
class _FitToWidth:
    """A renderable built for the width rich gives it."""

    build: Callable[[bool], RenderableType]  # called with whether the room is narrow

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.build(options.max_width < WIDE)


def _table(
    columns: Sequence[Column], rows: Sequence[Sequence[RenderableType]], narrow: bool, title: str | None = None
) -> Table:
    """A table of the columns that fit (all of them unless ``narrow``), the rows cut to match."""
    shown = [i for i, column in enumerate(columns) if not (narrow and column.wide_only)]
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title=title, title_justify="left")
    for i in shown:
        table.add_column(columns[i].name, no_wrap=not columns[i].wraps)
    for row in rows:
        table.add_row(*(row[i] for i in shown))
    return table


def _styled(status: str | None) -> Text:
    if status is None:
        return Text("-", style="dim")
    return Text(status, style=STATUS_STYLES.get(status, ""))


STEP_COLUMNS = (
    Column("STEP"),
    Column("PARTICIPANT", wide_only=True),
    Column("STATUS"),
    Column("STARTED", wide_only=True),
    Column("TOOK"),
    Column("DEADLINE"),
    Column("COMPENSATION"),
    Column("TRIES", wide_only=True),
    Column("ERROR", wraps=True),
)
TIMELINE_COLUMNS = (
    Column("AT"),
    Column(""),
    Column("TYPE"),
    Column("STEP", wide_only=True),
    Column("STEP STATUS"),
    Column("WORKFLOW", wide_only=True),
    Column("DETAIL", wraps=True),
)
BOARD_COLUMNS = (
    Column("WORKFLOW"),
    Column("DEFINITION", wide_only=True),
    Column("STATUS"),
    Column("STEP"),
    Column("AGE"),
    Column("LAST EVENT", wide_only=True),
)


def _step_row(step: StepState, now: datetime, narrow: bool) -> list[RenderableType]:
    took = _between(step.started_at, step.finished_at or (now if step.status == StepStatus.RUNNING else None))
    deadline = ""
    if step.deadline_at is not None and step.status in (StepStatus.RUNNING, StepStatus.COMPENSATING):
        left = _until(step.deadline_at, now)
        deadline = left if narrow else f"{clock(step.deadline_at)} ({left})"
    compensation = ""
    if step.compensation_started_at is not None:
        if step.compensated_at is not None:
            compensation = f"done in {_between(step.compensation_started_at, step.compensated_at)}"
        else:
            compensation = f"for {_between(step.compensation_started_at, now)}"
        if step.retrying:
            compensation += ", retrying"
    return [
        step.name,
        step.participant,
        _styled(step.status.value),
        clock(step.started_at) if step.started_at else "",
        took or "",
        deadline,
        compensation,
        str(step.attempts) if step.attempts else "",
        Text(step.error or "", style="red"),
    ]


def workflow_panel(view: WorkflowView, lines: Sequence[ProgressLine], now: datetime) -> RenderableType:
    """The live view of one workflow: its status, a table of steps, and the latest lines."""
    return _FitToWidth(lambda narrow: _workflow_panel(view, lines, now, narrow))


def _workflow_panel(view: WorkflowView, lines: Sequence[ProgressLine], now: datetime, narrow: bool) -> RenderableType:
    end = view.finished_at or now
    heading = Text.assemble(
        (f"{view.workflow.name} v{view.workflow.version}", "bold"),
        f"  {view.workflow_id}  ",
        _styled(view.status.value),
        f"  {duration((end - view.created_at).total_seconds())}",
    )
    if view.sla_deadline_at is not None and view.finished_at is None:
        heading.append(f"  SLA {clock(view.sla_deadline_at)} ({_until(view.sla_deadline_at, now)})")
    if view.error:
        heading.append(f"\n{view.error}", style="red")
    steps = _table(STEP_COLUMNS, [_step_row(step, now, narrow) for step in view.steps], narrow)
    events: list[list[RenderableType]] = [
        [
            clock(line.at),
            line.direction,
            line.type,
            line.step or "",
            _styled(line.step_status.value if line.step_status else None),
            _styled(line.status.value),
            line.detail or "",
        ]
        for line in lines[-TIMELINE_ROWS:]
    ]
    timeline = _table(TIMELINE_COLUMNS, events, narrow, title="latest events")
    return Group(heading, steps, timeline)


# --- every workflow ------------------------------------------------------------------------


def counts_text(counts: dict[WorkflowStatus, int]) -> str:
    """``counts: running=2 compensating=0 …`` in the order of the states."""
    return "counts: " + " ".join(f"{status.value}={counts.get(status, 0)}" for status in WORKFLOW_ORDER)


def feed_line_text(line: ProgressLine) -> str:
    step_status = line.step_status.value if line.step_status else "-"
    text = (
        f"{clock(line.at)} {line.workflow_id} {line.workflow.name} v{line.workflow.version} "
        f"{line.direction:<3} {line.type:<24} {line.step or '-':<13} {step_status:<13}workflow {line.status.value}"
    )
    return f"{text}  {line.detail}" if line.detail else text


def board_panel(board: Board, now: datetime, height: int) -> RenderableType:
    """The live view of ``watch --all``: counts by status, then the in-flight workflows, oldest first."""
    return _FitToWidth(lambda narrow: _board_panel(board, now, height, narrow))


def _board_panel(board: Board, now: datetime, height: int, narrow: bool) -> RenderableType:
    counts = Text(" " if narrow else "  ").join(
        Text.assemble(_styled(status.value), f" {board.counts.get(status, 0)}") for status in WORKFLOW_ORDER
    )
    in_flight = sorted(board.in_flight.values(), key=lambda row: row.created_at)
    room = max(3, height - 8)
    rows: list[list[RenderableType]] = []
    for row in in_flight[:room]:
        latest = board.latest.get(row.workflow_id)
        step = board.current.get(row.workflow_id, "")
        if not step and latest is not None and latest.step:  # not looked up yet: what the last line did
            step = f"{latest.step} {latest.step_status.value if latest.step_status else ''}".strip()
        rows.append(
            [
                row.workflow_id,
                f"{row.workflow.name} v{row.workflow.version}",
                _styled(row.status.value),
                step,
                duration((now - row.created_at).total_seconds()),
                f"{latest.type} at {clock(latest.at)}" if latest else "",
            ]
        )
    table = _table(BOARD_COLUMNS, rows, narrow, title=f"in flight: {len(in_flight)}")
    if len(in_flight) > room:
        table.caption = f"and {len(in_flight) - room} more"
    return Group(counts, table)
