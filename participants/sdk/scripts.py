"""Lua scripts a participant builds once and runs on whichever client a call is given."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError
from redis.typing import EncodableT, KeyT

ScriptCall = tuple[Sequence[KeyT], Sequence[EncodableT]]  # (keys, args) of one call


class Script:
    """A Lua script, hashed once, called by its SHA1 (``EVALSHA``).

    ``redis.register_script(source)`` hashes ``source`` every time it is called;
    build a :class:`Script` once, when the participant is built, and call it with
    ``msg.redis`` — where the call shares the round trip of the other handlers'
    commands (:mod:`participants.sdk.autopipeline`)::

        _AWARD = Script("...")

        awarded = await _AWARD(msg.redis, keys=[BALANCES, AWARDS], args=[msg.correlation_id, points])

    A server that does not know the script (restarted, ``SCRIPT FLUSH``) has it
    loaded, and the call is made again.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def __repr__(self) -> str:
        return f"Script({self.sha})"

    async def __call__(self, redis: Redis, keys: Sequence[KeyT] = (), args: Sequence[EncodableT] = ()) -> Any:
        """The script's reply for ``keys`` and ``args``; a script error raises ``ResponseError``."""
        try:
            return await redis.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self._load(redis)
            return await redis.evalsha(self.sha, len(keys), *keys, *args)

    async def call_many(self, redis: Redis, calls: Sequence[ScriptCall]) -> list[Any]:
        """Every call's reply, in order, in one round trip; a call that failed gets its
        error as its reply instead of raising."""
        if not calls:
            return []
        replies = await self._pipeline(redis, calls)
        if any(isinstance(reply, NoScriptError) for reply in replies):
            await self._load(redis)
            lost = [call for call, reply in zip(calls, replies, strict=True) if isinstance(reply, NoScriptError)]
            again = iter(await self._pipeline(redis, lost))
            replies = [next(again) if isinstance(reply, NoScriptError) else reply for reply in replies]
        return replies

    async def _pipeline(self, redis: Redis, calls: Sequence[ScriptCall]) -> list[Any]:
        async with redis.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                pipe.evalsha(self.sha, len(keys), *keys, *args)
            return list(await pipe.execute(raise_on_error=False))

    async def _load(self, redis: Redis) -> None:
        """The server lost the script (restarted, ``SCRIPT FLUSH``): load it again."""
        self.sha = str(await redis.script_load(self.source))
