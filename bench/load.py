"""Load generators: a closed loop and an open loop at a fixed offered rate.

Both measure the latency of one workflow as (terminal record seen) − (submit
started).  The open loop schedules submission *i* at ``start + i / rate`` by the
clock, not by sleeping after each send, and measures from that scheduled time:
a stalled system then shows up as latency instead of as a lower offered rate
(no coordinated omission).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Iterator
from typing import Protocol

from bench.completion import CompletionWatcher
from bench.stats import PhaseResult

log = logging.getLogger(__name__)


class SubmitError(Exception):
    """A submission the system refused; ``outcome`` names it in the results."""

    def __init__(self, outcome: str, detail: str = "") -> None:
        super().__init__(f"{outcome}: {detail}" if detail else outcome)
        self.outcome = outcome


class Submitter(Protocol):
    """Starts workflow number ``index`` and returns its workflow id."""

    async def __call__(self, index: int) -> str: ...


async def _one(
    submit: Submitter, watcher: CompletionWatcher, index: int, started: float, max_wait: float, result: PhaseResult
) -> None:
    try:
        workflow_id = await submit(index)
    except SubmitError as exc:
        result.record(exc.outcome, 0.0, str(exc))
        return
    except (OSError, TimeoutError) as exc:
        result.record(f"submit_{type(exc).__name__}", 0.0, repr(exc))
        return
    outcome = await watcher.outcome(workflow_id, max_wait)
    result.record(outcome.status, outcome.at - started)


async def closed_loop(
    name: str,
    submit: Submitter,
    watcher: CompletionWatcher,
    *,
    orders: int,
    concurrency: int,
    first_index: int = 0,
    max_wait: float = 30.0,
    stop: asyncio.Event | None = None,
) -> PhaseResult:
    """``concurrency`` clients, each submitting and awaiting one workflow at a time, ``orders`` in all
    (fewer if ``stop`` is set)."""
    result = PhaseResult(name)
    indexes: Iterator[int] = iter(range(first_index, first_index + orders))
    stopping = stop or asyncio.Event()

    async def client() -> None:
        for index in indexes:  # shared iterator: the clients split the work between them
            if stopping.is_set():
                return
            await _one(submit, watcher, index, time.perf_counter(), max_wait, result)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(min(concurrency, orders))))
    result.wall_s = time.perf_counter() - started
    return result


async def open_loop(
    name: str,
    submit: Submitter,
    watcher: CompletionWatcher,
    *,
    rate: float,
    duration: float,
    first_index: int = 0,
    max_wait: float = 30.0,
    stop: asyncio.Event | None = None,
) -> PhaseResult:
    """Submit at ``rate`` per second for ``duration`` seconds, whatever the latency (until ``stop``)."""
    total = max(int(rate * duration), 1)
    stopping = stop or asyncio.Event()
    result = PhaseResult(name, offered_rate=rate)
    tasks: set[asyncio.Task[None]] = set()
    started = time.perf_counter()
    counter = itertools.count()
    sent = 0
    while sent < total and not stopping.is_set():
        now = time.perf_counter()
        # everything scheduled up to now goes out at once; latency counts from its slot
        due = min(int((now - started) * rate) + 1, total)
        while sent < due:
            scheduled = started + sent / rate
            result.max_schedule_lag_s = max(result.max_schedule_lag_s, now - scheduled)
            task = asyncio.create_task(_one(submit, watcher, first_index + next(counter), scheduled, max_wait, result))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        if sent < total:
            await asyncio.sleep(max(started + sent / rate - time.perf_counter(), 0))
    if tasks:
        await asyncio.gather(*tasks)
    # throughput over the offered window plus the drain of the last workflows
    result.wall_s = time.perf_counter() - started
    return result
