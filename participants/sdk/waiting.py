"""Waiting in loops that must stop promptly."""

from __future__ import annotations

import asyncio
import contextlib


async def wait_until(event: asyncio.Event, seconds: float) -> bool:
    """Wait until ``event`` is set, at most ``seconds``; whether it is set.  A loop's pause
    between rounds: a stop cuts it short."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
    return event.is_set()
