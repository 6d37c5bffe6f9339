"""A loyalty-points participant written with the SDK (the example of docs/participants.md).

It joins the order saga by choreography alone — no workflow definition names it:
it awards one point per whole unit of currency a payment captures, and takes
the points back when that payment is refunded.  Run it beside the other workers::

    python examples/loyalty_points.py --redis-url redis://localhost:6379/0

Every effect is keyed by the workflow id, so a redelivered message changes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal

from pydantic import BaseModel

from contracts import naming
from contracts.messages import PaymentCaptured
from participants.sdk import Message, Participant, Reply, RunnerSettings, collector, run_participant
from participants.sdk.scripts import Script

NAME = "loyalty"
BALANCES = naming.participant_key(NAME, "balances")  # customer id -> points
AWARDS = naming.participant_key(NAME, "awards")  # workflow id -> JSON {customer_id, points}
REVOKED = naming.participant_key(NAME, "revoked")  # workflow id -> 1

loyalty = Participant(NAME)


class PointsAwarded(BaseModel):
    """The event this participant emits (its own type: any consumer may subscribe)."""

    customer_id: str
    points: int


# KEYS: balances, awards, revoked.  ARGV: workflow id, customer id, points.
# Award once per workflow, and never after the payment was refunded: the refund
# may be read first when this worker catches up on both streams at once.
_AWARD = Script("""
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then return 0 end
if redis.call('HSETNX', KEYS[2], ARGV[1], cjson.encode({customer_id = ARGV[2], points = tonumber(ARGV[3])})) == 1 then
  redis.call('HINCRBY', KEYS[1], ARGV[2], ARGV[3])
end
return cjson.decode(redis.call('HGET', KEYS[2], ARGV[1])).points
""")

# KEYS: balances, awards, revoked.  ARGV: workflow id.  Revoke once; remember the
# revocation even when nothing was awarded yet, so a late award is refused.
_REVOKE = Script("""
if redis.call('HSETNX', KEYS[3], ARGV[1], 1) == 0 then return 0 end
local award = redis.call('HGET', KEYS[2], ARGV[1])
if not award then return 0 end
local a = cjson.decode(award)
redis.call('HINCRBY', KEYS[1], a.customer_id, -a.points)
return a.points
""")


@loyalty.on("PaymentCaptured")
async def award(msg: Message) -> Reply | None:
    captured = msg.parse(PaymentCaptured)  # a payload that does not fit is dead-lettered with the reason
    points = int(captured.amount)  # whole units, rounded down
    awarded = await _AWARD(
        msg.redis, keys=[BALANCES, AWARDS, REVOKED], args=[msg.correlation_id, captured.order.customer_id, points]
    )
    if not awarded:
        return None  # refunded already, or nothing to award: just acknowledge
    return Reply("PointsAwarded", PointsAwarded(customer_id=captured.order.customer_id, points=int(awarded)))


@loyalty.on("PaymentRefunded")
async def revoke(msg: Message) -> None:
    await _REVOKE(msg.redis, keys=[BALANCES, AWARDS, REVOKED], args=[msg.correlation_id])


async def main(settings: RunnerSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)  # drain: finish what is in flight, then exit
    await run_participant(loyalty, settings, stop)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default=os.environ.get("STREAMSAGA_REDIS_URL", "redis://localhost:6379/0"))
    parser.add_argument("--partitions", type=int, default=naming.DEFAULT_PARTITIONS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    collector.tune()  # optional: much less CPU spent in the cycle collector per message
    asyncio.run(main(RunnerSettings(redis_url=args.redis_url, partitions=args.partitions)))
