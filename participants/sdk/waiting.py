"""Waiting in loops that must stop promptly, and through Redis outages."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.exceptions import RedisError

from participants.sdk.connection import unavailable
from participants.sdk.logs import Outage

T = TypeVar("T")


async def wait_until(event: asyncio.Event, seconds: float) -> bool:
    """Wait until ``event`` is set, at most ``seconds``; whether it is set.  A loop's pause
    between rounds: a stop cuts it short."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
    return event.is_set()


FIRST_PAUSE_S = 0.5
LAST_PAUSE_S = 5.0


async def through_outages(attempt: Callable[[], Awaitable[T]], stop: asyncio.Event, outage: Outage) -> T:
    """``attempt()``, tried again after a pause (0.5 s, doubling up to 5 s) for as long as it
    finds Redis unavailable (:func:`unavailable`), the outage logged through ``outage``; once
    ``stop`` is set, the last such error is raised instead of waiting on."""
    pause = FIRST_PAUSE_S
    while True:
        try:
            result = await attempt()
        except RedisError as error:
            if not unavailable(error):
                raise
            outage.failed(error)
            if await wait_until(stop, pause):
                raise
            pause = min(pause * 2, LAST_PAUSE_S)
            continue
        outage.recovered()
        return result
