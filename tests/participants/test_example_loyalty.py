"""examples/loyalty_points.py, the documented SDK example, runs as documented."""

from __future__ import annotations

import asyncio
import signal
import sys
from decimal import Decimal
from pathlib import Path

from redis.asyncio import Redis

from contracts import naming
from examples import loyalty_points
from tests.conftest import eventually
from tests.participants.helpers import PARTITIONS, emitted, envelope, fast_settings, order, publish, running

SCRIPT = Path(loyalty_points.__file__)


def captured(workflow: str, amount: str, customer: str = "cust-7") -> dict[str, object]:
    return {
        "order": order(("SKU-1", 1, amount), customer_id=customer),
        "payment_id": f"pay-{workflow}",
        "amount": str(Decimal(amount)),
    }


async def points(redis: Redis, customer: str = "cust-7") -> int:
    return int(await redis.hget(loyalty_points.BALANCES, customer) or 0)


async def test_points_are_awarded_once_and_taken_back_on_refund(redis: Redis, redis_url: str) -> None:
    payment = envelope("PaymentCaptured", captured("wf-1", "42.99"), correlation_id="wf-1")
    async with running(loyalty_points.loyalty, fast_settings(redis_url)):
        await publish(redis, payment)
        await publish(redis, payment)  # redelivered: no second award
        [awarded] = await eventually(
            lambda: emitted(redis, "PointsAwarded"), lambda found: len(found) == 1, what="the award"
        )
        assert awarded.payload == {"customer_id": "cust-7", "points": 42}
        assert awarded.producer == "loyalty"
        assert await points(redis) == 42
        await publish(redis, envelope("PaymentRefunded", {"step": "payment"}, correlation_id="wf-1"))
        await eventually(lambda: points(redis), lambda balance: balance == 0, what="the points taken back")


async def test_a_refund_read_before_its_capture_prevents_the_award(redis: Redis, redis_url: str) -> None:
    async with running(loyalty_points.loyalty, fast_settings(redis_url)) as runner:
        await publish(redis, envelope("PaymentRefunded", {"step": "payment"}, correlation_id="wf-2"))
        await eventually(lambda: asyncio.sleep(0, runner.stats.handled), lambda n: n == 1, what="the refund")
        await publish(redis, envelope("PaymentCaptured", captured("wf-2", "10.00"), correlation_id="wf-2"))
        await eventually(lambda: asyncio.sleep(0, runner.stats.handled), lambda n: n == 2, what="the capture")
    assert await points(redis) == 0
    assert await emitted(redis, "PointsAwarded") == []


async def test_the_script_runs_until_sigterm(redis: Redis, redis_url: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        "--redis-url",
        redis_url,
        "--partitions",
        str(PARTITIONS),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        await eventually(lambda: redis.hlen(naming.heartbeat_key()), lambda n: n == 1, what="the worker's heartbeat")
        await publish(redis, envelope("PaymentCaptured", captured("wf-3", "5.00"), correlation_id="wf-3"))
        await eventually(lambda: points(redis), lambda balance: balance == 5, what="the award")
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 10)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.stdout is not None
    assert code == 0, (await process.stdout.read()).decode()
