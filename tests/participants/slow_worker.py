"""A worker process for the drain test: one slow handler, and SIGTERM sets ``stop``.

Usage: ``python slow_worker.py REDIS_URL``.  On ``Ping`` the handler records that it
started, waits until the test releases it (a push to ``RELEASE_KEY``), and answers ``Pong``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from participants.sdk import Message, Participant, Reply, RunnerSettings, run_participant

PARTITIONS = 4
STARTED_KEY = "tests:slow-worker:started"
RELEASE_KEY = "tests:slow-worker:release"

slow = Participant("slow")


@slow.on("Ping")
async def ping(msg: Message) -> Reply:
    await msg.redis.set(STARTED_KEY, msg.message_id)
    # the slow work: done when the test pushes to the release list
    if await msg.redis.blpop([RELEASE_KEY], timeout=8) is None:
        raise RuntimeError("the test never released the handler")
    return Reply("Pong")


async def main(redis_url: str) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    settings = RunnerSettings(
        redis_url=redis_url,
        partitions=PARTITIONS,
        consumer="drain-test",
        block_ms=100,
        pending_interval_s=0.05,
        claim_idle_ms=300,
    )
    await run_participant(slow, settings, stop)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(name)s %(message)s")
    asyncio.run(main(sys.argv[1]))
