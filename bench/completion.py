"""Completion detection without polling the API.

One reader XREADs every watched stream (from where each stream ended when the
watcher started, i.e. ``$``) and resolves a future per workflow when a terminal
record for it appears.  A record may arrive before the submitter knows the
workflow id (the id comes back in the HTTP response); such early outcomes are
kept, bounded, until someone asks for them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from redis.asyncio import Redis

from contracts import naming

log = logging.getLogger(__name__)

TERMINAL_STATUSES = frozenset({b"completed", b"compensated", b"failed"})
EARLY_LIMIT = 200_000

# fields of a stream entry -> (workflow id, outcome) when the entry ends a workflow
Classifier = Callable[[dict[bytes, bytes]], "tuple[str, str] | None"]


def progress_streams(partitions: int) -> list[str]:
    return [naming.progress_stream(p) for p in range(partitions)]


def classify_progress(fields: dict[bytes, bytes]) -> tuple[str, str] | None:
    """A controller progress record that puts its workflow in a terminal status."""
    status = fields.get(b"status")
    if status not in TERMINAL_STATUSES:
        return None
    return fields[b"workflow_id"].decode(), status.decode()


class Outcome:
    __slots__ = ("at", "status")

    def __init__(self, status: str, at: float) -> None:
        self.status = status
        self.at = at  # time.perf_counter() when the reader saw it


class CompletionWatcher:
    """``await watcher.outcome(workflow_id, max_wait)`` -> the first terminal outcome."""

    def __init__(
        self,
        redis: Redis,
        streams: Sequence[str],
        classify: Classifier,
        *,
        count: int = 2_000,
        block_ms: int = 1_000,
    ) -> None:
        self.redis = redis
        self.streams = list(streams)
        self.classify = classify
        self.count = count
        self.block_ms = block_ms
        self._waiting: dict[str, asyncio.Future[Outcome]] = {}
        self._early: OrderedDict[str, Outcome] = OrderedDict()
        self._positions: dict[str, bytes | str] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._aborted = False
        self.records = 0

    async def start(self) -> None:
        """Pin the current end of every stream, then read from there in the background."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in self.streams:
                pipe.xrevrange(stream, "+", "-", count=1)
            last = await pipe.execute()
        self._positions = {
            stream: (rows[0][0] if rows else "0-0") for stream, rows in zip(self.streams, last, strict=True)
        }
        self._task = asyncio.create_task(self._run(), name="completion-watcher")

    def abort(self) -> None:
        """Resolve every wait, now and later, as ``aborted``."""
        self._aborted = True
        now = time.perf_counter()
        for future in self._waiting.values():
            if not future.done():
                future.set_result(Outcome("aborted", now))

    async def stop(self) -> None:
        """Stop reading: the reader leaves at its next wake-up (at most ``block_ms``)."""
        self.abort()
        self._stopping = True
        if self._task is not None:
            task, self._task = self._task, None
            done, _ = await asyncio.wait({task}, timeout=self.block_ms / 1000 + 2)
            if not done:
                task.cancel()
            elif not task.cancelled() and task.exception() is not None:
                # the reader's own failure (e.g. Redis gone after a Ctrl-C) was reported by outcome()
                log.debug("completion watcher failed: %r", task.exception())

    async def outcome(self, workflow_id: str, max_wait: float) -> Outcome:
        """The terminal outcome of ``workflow_id``; status ``timeout`` if none within ``max_wait`` s."""
        early = self._early.pop(workflow_id, None)
        if early is not None:
            return early
        if self._aborted:
            return Outcome("aborted", time.perf_counter())
        if self._task is not None and self._task.done():
            self._task.result()  # re-raise the reader's failure
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._waiting[workflow_id] = future
        try:
            # not asyncio.wait_for: on 3.11 it swallows a cancellation that races a result
            async with asyncio.timeout(max_wait):
                return await future
        except TimeoutError:
            return Outcome("timeout", time.perf_counter())
        finally:
            self._waiting.pop(workflow_id, None)

    async def _run(self) -> None:
        while not self._stopping:
            reply: Any = await self.redis.xread(self._positions, count=self.count, block=self.block_ms)  # type: ignore[arg-type]
            seen = time.perf_counter()
            for stream, entries in reply or []:
                name = stream.decode() if isinstance(stream, bytes) else stream
                for _, fields in entries:
                    self.records += 1
                    found = self.classify(fields)
                    if found is not None:
                        self._resolve(found[0], Outcome(found[1], seen))
                if entries:
                    self._positions[name] = entries[-1][0]

    def _resolve(self, workflow_id: str, outcome: Outcome) -> None:
        future = self._waiting.pop(workflow_id, None)
        if future is not None:
            if not future.done():
                future.set_result(outcome)
            return
        if workflow_id not in self._early:
            self._early[workflow_id] = outcome
            if len(self._early) > EARLY_LIMIT:
                self._early.popitem(last=False)
