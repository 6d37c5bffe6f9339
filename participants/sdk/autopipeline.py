"""Auto-pipelining: the Redis commands of one event-loop tick share one round trip.

The runner starts a batch's handlers together, and each of them usually makes a
Redis call or two for its business state.  Sent one by one, every call costs a
connection checkout, a write, a wake-up for the reply and a release; for small
commands that overhead is most of a worker's CPU.  :class:`AutoPipelineRedis`
queues the plain commands issued during one tick of the event loop and sends
them in the next as one pipeline (``transaction=False``): one write, one read
of all the replies, each reply or error handed back to the command that asked
for it.

It is what ``msg.redis`` is, and it behaves like the :class:`~redis.asyncio.Redis`
it shares its connection pool with, for every command:

* a command's reply, or its error (``ResponseError``, ``NoScriptError`` …),
  reaches only its own caller; a connection failure reaches every command of
  the pipeline that was lost with it (each retried as redis-py retries any
  pipeline);
* the commands of one caller run in the order it issued them: a handler that
  awaits each call sends the next after the previous one's reply, and calls
  issued in the same tick go out in that order in one pipeline;
* scripts (``register_script``, :class:`~participants.sdk.scripts.Script`) are
  ``EVALSHA`` calls like any other; a ``NoScriptError`` goes back to its caller,
  which loads the script and calls again;
* blocking commands and commands that change the state of their connection
  (:data:`OWN_CONNECTION`) take a connection of their own, as on a plain client;
  so do ``pipeline()``, ``transaction()``, ``pubsub()`` and ``client()``.

A caller cancelled before its command was sent drops the command; one cancelled
later does not undo it (as with a plain client, the server may have run it).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from redis.asyncio import ConnectionPool, Redis
from redis.exceptions import RedisError

from participants.sdk.connection import mark_own

OWN_CONNECTION = frozenset(
    {
        # blocking: would hold up every command pipelined behind them
        "BLPOP",
        "BRPOP",
        "BRPOPLPUSH",
        "BLMOVE",
        "BLMPOP",
        "BZPOPMIN",
        "BZPOPMAX",
        "BZMPOP",
        "WAIT",
        "WAITAOF",
        # the state of a connection: kept off the connection the pipelines share
        "WATCH",
        "UNWATCH",
        "MULTI",
        "EXEC",
        "DISCARD",
        "SELECT",
        "AUTH",
        "HELLO",
        "RESET",
        "READONLY",
        "READWRITE",
        "CLIENT SETNAME",
        "CLIENT REPLY",
        "CLIENT TRACKING",
    }
)
"""Commands sent on a connection of their own, never pipelined with others."""

_BLOCKING_WITH_OPTION = frozenset({"XREAD", "XREADGROUP"})  # with BLOCK


@dataclass(slots=True)
class _Queued:
    args: tuple[Any, ...]
    options: dict[str, Any]
    reply: asyncio.Future[Any]


class AutoPipelineRedis(Redis):
    """A client on ``connection_pool`` whose commands of one event-loop tick go out in one pipeline.

    Closing it waits for the pipelines in flight and leaves the pool open: the
    pool belongs to whoever created it.
    """

    def __init__(self, connection_pool: ConnectionPool) -> None:
        super().__init__(connection_pool=connection_pool)
        self._queue: list[_Queued] = []
        self._flushes: set[asyncio.Task[None]] = set()

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        try:
            return await self._execute(*args, **options)
        except RedisError as error:
            mark_own(error)  # the runner tells an outage of its Redis by this mark (see connection.own)
            raise

    async def _execute(self, *args: Any, **options: Any) -> Any:
        name = args[0]
        command = (name.decode() if isinstance(name, bytes) else str(name)).upper()  # as the server reads it
        if command in OWN_CONNECTION or (command in _BLOCKING_WITH_OPTION and _blocks(args)):
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        loop = asyncio.get_running_loop()
        reply = loop.create_future()
        if not self._queue:
            # runs in the next tick, after every command this tick adds to the queue
            flush = loop.create_task(self._flush())
            self._flushes.add(flush)
            flush.add_done_callback(self._flushes.discard)
        self._queue.append(_Queued(args, options, reply))
        return await reply

    async def _flush(self) -> None:
        queued, self._queue = self._queue, []
        queued = [command for command in queued if not command.reply.done()]  # callers cancelled meanwhile
        if not queued:
            return
        try:
            replies = await self._send(queued)
        except Exception as error:  # the connection failed: every command sent on it shares the error
            replies = [error] * len(queued)
        except BaseException:  # cancelled (the loop is closing): so are the commands
            for command in queued:
                command.reply.cancel()
            raise
        for command, reply in zip(queued, replies, strict=True):
            if command.reply.done():
                continue
            if isinstance(reply, Exception):
                command.reply.set_exception(reply)
            else:
                command.reply.set_result(reply)

    async def _send(self, queued: list[_Queued]) -> list[Any]:
        """Each command's reply, or the error it alone failed with; raises what fails them all."""
        if len(queued) == 1:  # alone in its tick: sent as by a plain client, without a pipeline's overhead
            command = queued[0]
            try:
                return [await super().execute_command(*command.args, **command.options)]  # type: ignore[no-untyped-call]
            except Exception as error:
                return [error]
        async with self.pipeline(transaction=False) as pipe:
            for command in queued:
                pipe.execute_command(*command.args, **command.options)
            return list(await pipe.execute(raise_on_error=False))

    def client(self) -> Redis:
        """A plain client locked to one connection of the pool, as :meth:`Redis.client`."""
        return Redis(connection_pool=self.connection_pool, single_connection_client=True)

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        """Wait for the pipelines in flight; close the pool only if asked to."""
        while self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)
        await super().aclose(close_connection_pool=close_connection_pool)


def _blocks(args: tuple[Any, ...]) -> bool:
    """Whether an XREAD or XREADGROUP carries the BLOCK option, in any spelling."""
    return any(isinstance(arg, str | bytes) and len(arg) == 5 and arg.upper() in ("BLOCK", b"BLOCK") for arg in args)
