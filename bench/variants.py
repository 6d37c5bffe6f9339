"""The ``streamsaga`` CLI with an experimental change patched in, to measure a
proposed optimisation before anyone writes it for real.

    python -m bench --cli "python -m bench.variants no-readback"
    python -m bench.drain --cli "python -m bench.variants autopipeline"

Variants (several may be joined with ``+``):

``no-readback``
    (Landed as commit ``ae7511e``; a no-op from there on, kept to compare older
    commits.)  The correlator does not subscribe to the start event of each
    definition (``OrderSubmitted``).  ``state_machine.start`` has already applied it, so
    reading it back only decides it again for the commit script to drop as a
    duplicate — and, when it shares a batch with the workflow's next events,
    the duplicate leaves the chained instance one version ahead, so those
    events' commits fail their version guard and are decided again.

``autopipeline``
    (Landed as :mod:`participants.sdk.autopipeline`, for every command rather
    than script calls only; from there on it merely queues in front of it, kept
    to compare older commits.)  Handlers get a Redis client whose script calls
    are queued and sent in one pipeline per event-loop tick, so the handlers of
    one batch share one round trip instead of making one each.

Nothing here is production code: it patches private names of the current
implementation and is only as good as the last time someone ran it.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis


def _no_readback() -> None:
    from controller.definitions import Definitions

    correlated = Definitions.event_types

    def event_types(self: Definitions) -> set[str]:
        return correlated(self) - {definition.start for definition in self}

    Definitions.event_types = event_types  # type: ignore[method-assign]


class _QueuedScript:
    def __init__(self, pipeline: _AutoPipeline, source: str) -> None:
        self.pipeline = pipeline
        self.script = pipeline.redis.register_script(source)

    async def __call__(self, keys: list[Any] | None = None, args: list[Any] | None = None) -> Any:
        return await self.pipeline.queue(self.script, keys or [], args or [])


class _AutoPipeline:
    """Script calls made in the same tick go out in one pipeline; anything else goes straight through."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._queued: list[tuple[Any, list[Any], list[Any], asyncio.Future[Any]]] = []
        self._scripts: dict[str, _QueuedScript] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def register_script(self, source: str) -> _QueuedScript:
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = _QueuedScript(self, source)
        return script

    def queue(self, script: Any, keys: list[Any], args: list[Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._queued:
            loop.call_soon(self._flush)
        self._queued.append((script, keys, args, future))
        return future

    def _flush(self) -> None:
        batch, self._queued = self._queued, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple[Any, list[Any], list[Any], asyncio.Future[Any]]]) -> None:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for script, keys, args, _ in batch:
                    await script(keys=keys, args=args, client=pipe)  # queues it on the pipeline
                results = await pipe.execute(raise_on_error=False)
        except Exception as exc:
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (*_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.redis, name)


def _autopipeline() -> None:
    from participants.sdk import runner

    pipelines: dict[int, _AutoPipeline] = {}
    namespace = vars(runner)  # a private name of the runner module: patched, not imported
    message = namespace["Message"]

    def make(envelope: Any, redis: Redis, *args: Any) -> Any:
        pipeline = pipelines.get(id(redis))
        if pipeline is None or pipeline.redis is not redis:
            pipeline = pipelines[id(redis)] = _AutoPipeline(redis)
        return message(envelope, pipeline, *args)

    namespace["Message"] = make


VARIANTS: dict[str, Callable[[], None]] = {"no-readback": _no_readback, "autopipeline": _autopipeline}


def main() -> None:
    if len(sys.argv) < 2 or not all(name in VARIANTS for name in sys.argv[1].split("+")):
        raise SystemExit(
            f"usage: python -m bench.variants VARIANT[+VARIANT] STREAMSAGA-ARGS...; variants: {sorted(VARIANTS)}"
        )
    for name in sys.argv[1].split("+"):
        VARIANTS[name]()
    from controller.cli import main as streamsaga

    sys.exit(streamsaga(sys.argv[2:]))


if __name__ == "__main__":
    main()
