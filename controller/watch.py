"""``streamsaga watch``: follow one workflow, or every in-flight one, live.

Both read the controller's Server-Sent Events (:mod:`controller.event_source`):

* :func:`watch_workflow` follows ``GET /v1/workflows/{id}/events`` (a replay of the
  history, then live lines, then a final ``end``) and, as lines arrive, fetches
  ``GET /v1/workflows/{id}`` for what the lines do not carry: each step's start and
  finish, deadline, compensation times, attempts and error.  It returns the exit
  status that states the outcome (:class:`ExitCode`).
* :func:`watch_all` follows ``GET /v1/events`` and keeps the in-flight workflows and
  the counts by status (``GET /v1/stats``) up to date, refreshing them at most every
  :data:`REFRESH_S` while lines arrive.

On a terminal (and unless ``plain``) both draw a live view with ``rich.live.Live``;
otherwise — a pipe, CI, a test — they print one line per event (:mod:`controller.terminal`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Sequence
from datetime import datetime
from typing import Any, Generic, TypeVar

import aiohttp
import orjson
from pydantic import BaseModel, ConfigDict, ValidationError
from rich.console import Console, RenderableType
from rich.live import Live

from contracts.envelope import WorkflowRef, utcnow
from controller import terminal
from controller.event_source import EventSource, EventSourceError, ServerSentEvent, problem_of
from controller.exit_status import ExitCode
from controller.instance import HistoryEntry, StepState, StepStatus, WorkflowStatus

T = TypeVar("T")

REFRESH_S = 0.5  # the least time between two refreshes of `watch --all`'s counts and in-flight list
IN_FLIGHT_LIMIT = 200  # in-flight workflows fetched per status
LOOK_UP_LIMIT = 50  # workflows whose state one refresh of the live `watch --all` fetches, for their current step
IN_FLIGHT = (WorkflowStatus.RUNNING, WorkflowStatus.COMPENSATING, WorkflowStatus.NEEDS_ATTENTION)
LIVE_REFRESH_PER_S = 4
END = "end"
OVERFLOW = "overflow"
GAP = "gap"  # a resumed feed whose missed lines were trimmed: catch up over REST


OUTCOMES = {
    WorkflowStatus.COMPLETED: ExitCode.COMPLETED,
    WorkflowStatus.COMPENSATED: ExitCode.COMPENSATED,
    WorkflowStatus.FAILED: ExitCode.FAILED,
    WorkflowStatus.NEEDS_ATTENTION: ExitCode.NEEDS_ATTENTION,
}


# --- what the API sends -------------------------------------------------------------


class WorkflowSummary(BaseModel):
    """One workflow of ``GET /v1/workflows``."""

    model_config = ConfigDict(extra="ignore")

    workflow_id: str
    workflow: WorkflowRef
    status: WorkflowStatus
    created_at: datetime
    updated_at: datetime


class WorkflowView(WorkflowSummary):
    """``GET /v1/workflows/{id}``, as much of it as the views show."""

    finished_at: datetime | None = None
    error: str | None = None
    sla_deadline_at: datetime | None = None
    steps: list[StepState] = []

    def step(self, name: str | None) -> StepState | None:
        return next((step for step in self.steps if step.name == name), None)


class ProgressLine(HistoryEntry):
    """The data of a history-line event: the line, its workflow, and the workflow's status after it."""

    workflow_id: str
    workflow: WorkflowRef


class StreamEnd(BaseModel):
    """The data of the final ``end`` event of a workflow's stream."""

    model_config = ConfigDict(extra="ignore")

    workflow_id: str
    status: WorkflowStatus
    finished_at: datetime | None = None


class Overflow(BaseModel):
    """The data of an ``overflow`` event: the server closes; resume from ``last_event_id``."""

    model_config = ConfigDict(extra="ignore")

    reason: str = ""
    last_event_id: str | int | None = None


class WatchError(Exception):
    """Something that ends ``watch`` with :attr:`ExitCode.ERROR`; the message says what."""


class ApiProblem(WatchError):
    """The API answered with an error (a problem document)."""

    def __init__(self, url: str, status: int, title: str, detail: str, problem_type: str = "") -> None:
        super().__init__(f"{status} {title}: {detail}" if detail else f"{status} {title} ({url})")
        self.url = url
        self.status = status
        self.problem_type = problem_type


# --- the API ------------------------------------------------------------------------


class ApiClient:
    """The few reads ``watch`` makes, against the API at ``base``."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base.rstrip("/")

    def url(self, path: str) -> str:
        return self.base + path

    async def get(self, path: str, **query: str) -> Any:
        url = self.url(path)
        try:
            async with self.session.get(url, params=query) as response:
                raw = await response.read()
                status, reason = response.status, response.reason or ""
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise WatchError(f"cannot reach the API at {self.base}: {exc or type(exc).__name__}") from None
        if status >= 400:
            problem = problem_of(raw)
            raise ApiProblem(
                url,
                status,
                str(problem.get("title") or reason),
                str(problem.get("detail") or "")[:300],
                str(problem.get("type") or ""),
            )
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise WatchError(f"{url} did not answer JSON: {raw[:200]!r}") from None

    async def workflow(self, workflow_id: str) -> WorkflowView:
        return _decode(WorkflowView, await self.get(f"/v1/workflows/{workflow_id}"), "a workflow")

    async def workflows(self, status: WorkflowStatus, limit: int) -> list[WorkflowSummary]:
        listing = await self.get("/v1/workflows", status=status.value, limit=str(limit))
        return [_decode(WorkflowSummary, item, "a workflow summary") for item in listing.get("workflows", [])]

    async def counts(self) -> dict[WorkflowStatus, int]:
        """Workflows by status, from ``GET /v1/stats`` (``{"counts": {status: n}}``)."""
        counts = _decode(_Stats, await self.get("/v1/stats"), "workflow statistics").counts
        return {status: counts.get(status, 0) for status in WorkflowStatus}


class _Stats(BaseModel):
    model_config = ConfigDict(extra="ignore")

    counts: dict[WorkflowStatus, int]


M = TypeVar("M", bound=BaseModel)


def _decode(model: type[M], data: Any, what: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise WatchError(f"the API sent {what} this client does not understand: {exc}") from None


# --- reading a stream in batches ------------------------------------------------------


class _Ended(Generic[T]):
    def __init__(self, error: BaseException | None) -> None:
        self.error = error


class Batches(Generic[T]):
    """Items of an async iterator read by a task of its own, handed out in batches:
    whatever arrived while the previous batch was being handled.  Slow handling
    (say a fetch per batch) thus coalesces instead of falling behind."""

    def __init__(self, source: AsyncIterator[T]) -> None:
        self._queue: asyncio.Queue[T | _Ended[T]] = asyncio.Queue()
        self.reader = asyncio.create_task(self._pump(source), name="watch-stream")
        self._ended: _Ended[T] | None = None

    async def _pump(self, source: AsyncIterator[T]) -> None:
        try:
            async for item in source:
                self._queue.put_nowait(item)
        except Exception as exc:
            self._queue.put_nowait(_Ended(exc))
        else:
            self._queue.put_nowait(_Ended(None))
        finally:
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                await aclose()

    async def next(self, timeout: float | None = None) -> list[T]:  # noqa: ASYNC109 - a wait for data, not a deadline
        """The next batch (empty if ``timeout`` passed first); raises what the source raised,
        or ``StopAsyncIteration`` once it is exhausted."""
        items: list[T | _Ended[T]] = []
        if self._ended is None and self._queue.empty():
            try:
                items.append(await asyncio.wait_for(self._queue.get(), timeout))
            except TimeoutError:
                return []
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        batch: list[T] = []
        for item in items:
            if isinstance(item, _Ended):
                self._ended = item
                break
            batch.append(item)
        if batch:
            return batch
        if self._ended is not None:
            if self._ended.error is not None:
                raise self._ended.error
            raise StopAsyncIteration
        return batch

    async def aclose(self) -> None:
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)


async def _until_end(events: AsyncGenerator[ServerSentEvent, None]) -> AsyncGenerator[ServerSentEvent, None]:
    """A workflow's events up to and including ``end``: the server closes then, and must not be asked again."""
    async with contextlib.aclosing(events):
        async for event in events:
            yield event
            if event.event == END:
                return


async def _resuming(source: EventSource) -> AsyncGenerator[ServerSentEvent, None]:
    """A stream's events; after an ``overflow`` the source reconnects from the id it names."""
    events = source.events()
    async with contextlib.aclosing(events):
        async for event in events:
            if event.event == OVERFLOW:
                with contextlib.suppress(orjson.JSONDecodeError, ValidationError):
                    resume = Overflow.model_validate(event.json()).last_event_id
                    if resume is not None and str(resume):
                        source.last_event_id = str(resume)
            yield event


def _stream_error(exc: EventSourceError) -> WatchError:
    return WatchError(f"the event stream {exc}")


# --- watch ID -------------------------------------------------------------------------


async def watch_workflow(
    api: ApiClient,
    workflow_id: str,
    console: Console,
    *,
    until_terminal: bool = False,
    plain: bool = False,
    timeout: float | None = None,  # noqa: ASYNC109 - the user's --timeout, mapped to an exit status
) -> ExitCode:
    """Follow one workflow until its outcome; the exit status that states it.

    Stops at ``needs_attention`` (exit 5) unless ``until_terminal``, in which case it
    waits through an operator's retry for ``completed``, ``compensated`` or ``failed``.
    """
    follower = _WorkflowFollower(api, workflow_id, console, until_terminal=until_terminal, plain=plain)
    try:
        async with asyncio.timeout(timeout):
            return await follower.run()
    except TimeoutError:
        follower.close()
        status = follower.view.status.value if follower.view else "unknown"
        terminal.error(console, f"timed out after {timeout:g}s; workflow {workflow_id} is still {status}")
        return ExitCode.TIMEOUT
    except WatchError as exc:
        follower.close()
        terminal.error(console, str(exc))
        return ExitCode.ERROR
    finally:
        follower.close()  # also when cancelled (Ctrl-C): the terminal gets its cursor back


class _WorkflowFollower:
    def __init__(
        self, api: ApiClient, workflow_id: str, console: Console, *, until_terminal: bool, plain: bool
    ) -> None:
        self.api = api
        self.workflow_id = workflow_id
        self.console = console
        self.until_terminal = until_terminal
        self.live_view = console.is_terminal and not plain
        self.view: WorkflowView | None = None
        self.lines: list[ProgressLine] = []
        self._live: Live | None = None

    async def run(self) -> ExitCode:
        self.view = await self.api.workflow(self.workflow_id)
        if self.live_view:
            self._live = Live(
                get_renderable=self._render,
                console=self.console,
                refresh_per_second=LIVE_REFRESH_PER_S,
            )
            self._live.start()
        else:
            terminal.plain(self.console, terminal.workflow_heading(self.view))
        source = EventSource(self.api.session, self.api.url(f"/v1/workflows/{self.workflow_id}/events"))
        batches = Batches(_until_end(_resuming(source)))
        try:
            while True:
                try:
                    events = await batches.next()
                except StopAsyncIteration:
                    raise WatchError(f"the stream of workflow {self.workflow_id} ended without an outcome") from None
                except EventSourceError as exc:
                    raise _stream_error(exc) from None
                outcome = await self._handle(events)
                if outcome is not None:
                    return outcome
        finally:
            await batches.aclose()

    def _render(self) -> RenderableType:
        assert self.view is not None
        return terminal.workflow_panel(self.view, self.lines, utcnow())

    async def _handle(self, events: Sequence[ServerSentEvent]) -> ExitCode | None:
        new: list[ProgressLine] = []
        end: StreamEnd | None = None
        for event in events:
            if event.event == END:
                end = _decode(StreamEnd, _json(event), "an end event")
            elif event.event not in (OVERFLOW, "message"):
                new.append(_decode(ProgressLine, _json(event), "a history line"))
        seen = {line.seq for line in self.lines}
        new = [line for line in new if line.seq not in seen]  # a resumed stream may repeat a line
        self.lines.extend(new)
        self.view = await self.api.workflow(self.workflow_id)
        if not self.live_view:
            latest = {line.step: line.seq for line in sorted(self.lines, key=lambda line: line.seq)}
            for line in new:
                terminal.plain(self.console, terminal.line_text(line, self.view, latest[line.step] == line.seq))
        elif self._live is not None:
            self._live.refresh()
        if end is not None:
            return self._finish(end.status)
        last = self.lines[-1].status if self.lines else None
        needs_attention = WorkflowStatus.NEEDS_ATTENTION
        if not self.until_terminal and last == needs_attention and self.view.status == needs_attention:
            return self._finish(needs_attention)
        return None

    def _finish(self, status: WorkflowStatus) -> ExitCode:
        code = OUTCOMES.get(status, ExitCode.ERROR)
        self.close()
        assert self.view is not None
        terminal.plain(self.console, terminal.outcome_text(self.view, status, int(code)))
        return code

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


def _json(event: ServerSentEvent) -> Any:
    try:
        return event.json()
    except orjson.JSONDecodeError:
        raise WatchError(f"a {event.event!r} event whose data is not JSON: {event.data[:200]!r}") from None


# --- watch --all ----------------------------------------------------------------------


class Board:
    """What ``watch --all`` shows: counts by status, the in-flight workflows, the latest
    line of each, and (from its state) the step each is at."""

    def __init__(self) -> None:
        self.counts: dict[WorkflowStatus, int] = {}
        self.in_flight: dict[str, WorkflowSummary] = {}
        self.latest: dict[str, ProgressLine] = {}
        self.current: dict[str, str] = {}  # workflow id -> its running or compensating steps
        self.stale: set[str] = set()  # workflows whose current step may have changed

    def apply(self, line: ProgressLine) -> None:
        known = self.latest.get(line.workflow_id)
        if known is None or known.seq <= line.seq:
            self.latest[line.workflow_id] = line
        self.stale.add(line.workflow_id)
        if line.status not in IN_FLIGHT:
            self.in_flight.pop(line.workflow_id, None)
            return
        row = self.in_flight.get(line.workflow_id)
        if row is None:
            created = line.at  # the first line of a workflow is its start; a refresh corrects the rest
            row = WorkflowSummary(
                workflow_id=line.workflow_id,
                workflow=line.workflow,
                status=line.status,
                created_at=created,
                updated_at=line.at,
            )
        elif row.updated_at <= line.at:
            row = row.model_copy(update={"status": line.status, "updated_at": line.at})
        self.in_flight[line.workflow_id] = row

    def reset(self, counts: dict[WorkflowStatus, int], in_flight: Sequence[WorkflowSummary]) -> None:
        self.counts = counts
        self.in_flight = {row.workflow_id: row for row in in_flight}
        for known in (self.latest, self.current):
            for gone in set(known) - set(self.in_flight):
                del known[gone]
        self.stale &= set(self.in_flight)

    def to_look_up(self, limit: int) -> list[str]:
        """In-flight workflows, oldest first, whose current step is unknown or may have changed."""
        rows = sorted(self.in_flight.values(), key=lambda row: row.created_at)
        return [
            row.workflow_id for row in rows if row.workflow_id in self.stale or row.workflow_id not in self.current
        ][:limit]

    def look(self, view: WorkflowView) -> None:
        active = (StepStatus.RUNNING, StepStatus.COMPENSATING)
        self.current[view.workflow_id] = ", ".join(
            f"{step.name} {step.status.value}" for step in view.steps if step.status in active
        )
        self.stale.discard(view.workflow_id)


async def _refresh(api: ApiClient, board: Board, *, steps: bool) -> None:
    """Counts and in-flight workflows afresh; with ``steps``, the current step of those that moved."""
    counts, in_flight = await asyncio.gather(api.counts(), _in_flight(api))
    board.reset(counts, in_flight)
    if steps:
        found = await asyncio.gather(
            *(api.workflow(workflow_id) for workflow_id in board.to_look_up(LOOK_UP_LIMIT)), return_exceptions=True
        )
        for view in found:
            if isinstance(view, WorkflowView):
                board.look(view)  # one that just expired or failed to load keeps its last line


async def _in_flight(api: ApiClient) -> list[WorkflowSummary]:
    listed = await asyncio.gather(*(api.workflows(status, IN_FLIGHT_LIMIT) for status in IN_FLIGHT))
    return [row for rows in listed for row in rows]


async def watch_all(
    api: ApiClient,
    console: Console,
    stop: asyncio.Event,
    *,
    plain: bool = False,
    timeout: float | None = None,  # noqa: ASYNC109 - the user's --timeout: how long to watch
) -> ExitCode:
    """Show the in-flight workflows and the counts by status until ``stop`` is set or
    ``timeout`` passes (both exit 0); :attr:`ExitCode.ERROR` if the API cannot be used."""
    overview = _Overview(api, console, stop, plain=plain)
    try:
        await overview.run(None if timeout is None else time.monotonic() + timeout)
        return ExitCode.COMPLETED
    except WatchError as exc:
        overview.close()
        terminal.error(console, str(exc))
        return ExitCode.ERROR
    finally:
        await overview.aclose()


class _Overview:
    def __init__(self, api: ApiClient, console: Console, stop: asyncio.Event, *, plain: bool) -> None:
        self.api = api
        self.console = console
        self.stop = stop
        self.live_view = console.is_terminal and not plain
        self.board = Board()
        self.source = EventSource(api.session, api.url("/v1/events"))
        self.batches = Batches(_resuming(self.source))
        self._stopped = asyncio.create_task(stop.wait(), name="watch-stop")
        self._live: Live | None = None
        self._shown_counts: dict[WorkflowStatus, int] = {}
        self._dirty = False  # lines arrived since the last refresh
        self._refreshed_at = 0.0

    async def run(self, deadline: float | None) -> None:
        if not await self._opened():
            return
        await self._refresh()
        if self.live_view:
            self._live = Live(
                get_renderable=lambda: terminal.board_panel(self.board, utcnow(), self.console.size.height),
                console=self.console,
                refresh_per_second=LIVE_REFRESH_PER_S,
            )
            self._live.start()
        while not self.stop.is_set():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return
            waits = [] if deadline is None else [deadline - now]
            if self._dirty:
                waits.append(self._refreshed_at + REFRESH_S - now)
            events = await self._next(max(0.0, min(waits)) if waits else None)
            if events is None:
                return
            self._apply(events)
            if self._dirty and time.monotonic() >= self._refreshed_at + REFRESH_S:
                await self._refresh()
            if self._live is not None:
                self._live.refresh()

    async def _opened(self) -> bool:
        """Wait until the feed has taken us on (so the snapshot taken next misses no line after
        it); False if stopped first."""
        opened = asyncio.create_task(self.source.opened.wait(), name="watch-opened")
        try:
            await asyncio.wait({opened, self._stopped, self.batches.reader}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            opened.cancel()
            await asyncio.gather(opened, return_exceptions=True)
        if self.stop.is_set():
            return False
        if not self.source.opened.is_set():  # the reader ended: say why
            await self._next(None)
            raise WatchError("the feed of every workflow ended before it began")
        return True

    async def _next(self, wait: float | None) -> list[ServerSentEvent] | None:
        """The next batch of events (empty after ``wait`` seconds), or None once stopped."""
        reading = asyncio.create_task(self.batches.next(wait), name="watch-batch")
        await asyncio.wait({reading, self._stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not reading.done():
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
            return None
        try:
            return reading.result()
        except StopAsyncIteration:
            raise WatchError("the feed of every workflow ended") from None
        except EventSourceError as exc:
            raise _stream_error(exc) from None

    def _apply(self, events: Sequence[ServerSentEvent]) -> None:
        for event in events:
            if event.event == GAP:  # lines lost: the next refresh reads the board again
                self._dirty = True
                continue
            if event.event in (OVERFLOW, END, "message"):
                continue
            line = _decode(ProgressLine, _json(event), "a history line")
            self.board.apply(line)
            self._dirty = True
            if not self.live_view:
                terminal.plain(self.console, terminal.feed_line_text(line))

    async def _refresh(self) -> None:
        await _refresh(self.api, self.board, steps=self.live_view)
        self._dirty, self._refreshed_at = False, time.monotonic()
        if not self.live_view and self.board.counts != self._shown_counts:
            terminal.plain(self.console, terminal.counts_text(self.board.counts))
            self._shown_counts = dict(self.board.counts)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    async def aclose(self) -> None:
        self.close()
        self._stopped.cancel()
        await asyncio.gather(self._stopped, return_exceptions=True)
        await self.batches.aclose()


# --- the command ------------------------------------------------------------------------


async def until_stopped(watching: Awaitable[ExitCode], stop: asyncio.Event) -> ExitCode:
    """``watching``'s exit status, or :attr:`ExitCode.INTERRUPTED` if ``stop`` is set first."""
    task = asyncio.ensure_future(watching)
    stopped = asyncio.create_task(stop.wait(), name="watch-stop")
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in (task, stopped):
            if not waiting.done():
                waiting.cancel()
        await asyncio.gather(task, stopped, return_exceptions=True)
    return task.result() if task.done() and not task.cancelled() else ExitCode.INTERRUPTED


def client_session() -> aiohttp.ClientSession:
    """A session for ``watch``: plain requests time out; event streams set their own limits."""
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30, sock_connect=10))
