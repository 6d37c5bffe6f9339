"""Per-message cost at saturation: pre-fill a stream, then time one consumer draining it.

``python -m bench.drain`` creates N order workflows directly through the store
(so N ``OrderSubmitted`` events wait in their streams), then starts one process
at a time on a backlog and times it until its consumer group has no lag and
nothing pending:

* ``payment``: the payment worker, on ``OrderSubmitted`` (emitting ``PaymentCaptured``);
* ``events``: the controller, on ``PaymentCaptured`` (a real transition);
* ``readback`` (not by default): the controller on the ``OrderSubmitted`` events it published
  itself — which it no longer reads since ``ae7511e``; this step then says so after 20 s.

Each line gives messages/s, the process's CPU µs per message and Redis's.  No
HTTP, no closed-loop round trips: the cost of the consumer's own loop with full
batches, which the closed loop of ``python -m bench`` only approaches.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from bench.orders import order
from bench.processes import Children, cpu_seconds, streamsaga_command
from bench.profiling import Recorder, redis_counters, summarize
from bench.run import terminate_as_interrupt
from contracts import naming
from contracts.definitions import ORDER_SAGA
from contracts.envelope import utcnow
from contracts.messages import OrderIn
from controller.embedded_redis import EmbeddedRedis, free_port
from controller.store import WorkflowStore
from participants.sdk.connection import connect

log = logging.getLogger(__name__)

NOT_READY = -1
SUBSCRIBE_TIMEOUT_S = 20.0
STALL_TIMEOUT_S = 30.0
STEP_TIMEOUT_S = 30.0  # the order saga's step deadline: drains that end later see timers fire


@dataclass
class Drained:
    name: str
    messages: int
    wall_s: float
    cpu_s: float
    redis_cpu_s: float
    redis_calls: dict[str, int]

    def line(self) -> str:
        per = ", ".join(f"{k}={v / self.messages:.2f}" for k, v in sorted(self.redis_calls.items()))
        return (
            f"{self.name}: {self.messages} in {self.wall_s:.2f}s = {self.messages / self.wall_s:.0f} msg/s; "
            f"CPU {1e6 * self.cpu_s / self.messages:.0f} µs/msg ({100 * self.cpu_s / self.wall_s:.0f}% of a core); "
            f"Redis {1e6 * self.redis_cpu_s / self.messages:.0f} µs/msg\n    Redis calls per message: {per}"
        )


async def _backlog(redis: Redis, partitions: int, message_type: str, group: str) -> int:
    """Entries of ``message_type`` not yet acked by ``group`` (NOT_READY until the group exists everywhere)."""
    async with redis.pipeline(transaction=False) as pipe:
        for p in range(partitions):
            pipe.xinfo_groups(naming.message_stream(p, message_type))
        replies = await pipe.execute(raise_on_error=False)
    total = 0
    for reply in replies:
        if isinstance(reply, ResponseError):
            return NOT_READY
        found = [g for g in reply if g["name"] in (group, group.encode())]
        if not found:
            return NOT_READY
        total += int(found[0]["lag"] or 0) + int(found[0]["pending"])
    return total


async def _fill(redis: Redis, partitions: int, count: int) -> None:
    # the payment group exists before the controller runs, as when the workers are deployed:
    # the controller trims a stream below what every *existing* group has consumed
    async with redis.pipeline(transaction=False) as pipe:
        for p in range(partitions):
            pipe.xgroup_create(naming.message_stream(p, ORDER_SAGA.start), "payment", id="0", mkstream=True)
        await pipe.execute()
    store = WorkflowStore(redis, partitions)
    payload = {"order": OrderIn.model_validate(order("drain", 0)).model_dump(mode="json", exclude_none=True)}
    slots = asyncio.Semaphore(64)

    async def one() -> None:
        async with slots:
            await store.start(ORDER_SAGA, payload, utcnow())

    await asyncio.gather(*(one() for _ in range(count)))


async def _drain(
    redis: Redis,
    children: Children,
    name: str,
    args: list[str],
    message_type: str,
    group: str,
    partitions: int,
    profile_dir: Path | None,
) -> Drained | None:
    """Time ``args`` draining ``message_type``; None if it does not consume that type."""
    initial = await _backlog(redis, partitions, message_type, group)
    child = children.start(name, args)
    # time from the first consumption, so that start-up (imports, connecting) is not counted
    deadline = time.monotonic() + SUBSCRIBE_TIMEOUT_S
    while (remaining := await _backlog(redis, partitions, message_type, group)) in (NOT_READY, initial):
        child.check()
        if time.monotonic() > deadline:
            children.stop([name])
            return None
        await asyncio.sleep(0.005)
    if remaining <= 0:
        children.stop([name])
        raise RuntimeError(f"{name} drained everything in its first batch; time it with more --messages")
    recorder = Recorder(profile_dir, {name: child.pid}) if profile_dir else None
    if recorder:
        recorder.start()
    before = await redis_counters(redis)
    cpu0, started = cpu_seconds(child.pid), time.perf_counter()
    progress_at, last = time.monotonic(), remaining
    while (backlog := await _backlog(redis, partitions, message_type, group)) > 0:
        child.check()
        if backlog < last:
            progress_at, last = time.monotonic(), backlog
        elif time.monotonic() - progress_at > STALL_TIMEOUT_S:
            raise RuntimeError(f"{name} made no progress for {STALL_TIMEOUT_S:.0f}s ({backlog} left); see its log")
        await asyncio.sleep(0.01)
    wall, cpu = time.perf_counter() - started, cpu_seconds(child.pid) - cpu0
    after = await redis_counters(redis)
    if recorder:
        for path in recorder.stop():
            print(summarize(path))
    children.stop([name])
    calls = {
        command: calls - before["commands"].get(command, (0, 0))[0]
        for command, (calls, _) in after["commands"].items()
        if calls - before["commands"].get(command, (0, 0))[0] >= remaining // 20 and not command.startswith("xinfo")
    }
    return Drained(name, remaining, wall, cpu, after["cpu_s"] - before["cpu_s"], calls)


STEPS = ("readback", "payment", "events")
DEFAULT_STEPS = ("payment", "events")  # since ae7511e the controller does not read back its start events


@dataclass(frozen=True)
class Settings:
    redis_url: str
    log_dir: Path
    messages: int
    partitions: int
    steps: tuple[str, ...] = DEFAULT_STEPS
    profile_dir: Path | None = None
    cli: str | None = None


async def _main(settings: Settings) -> None:
    redis_url, partitions = settings.redis_url, settings.partitions
    redis = connect(redis_url, name="bench-drain")
    try:
        await redis.flushdb()
        started = time.perf_counter()
        await _fill(redis, partitions, settings.messages)
        print(f"filled {settings.messages} workflows in {time.perf_counter() - started:.1f}s")
        cli = [*streamsaga_command(settings.cli), "--log-level", "WARNING"]
        controller = [*cli, "controller", "--redis-url", redis_url, "--partitions", str(partitions)]
        controller += ["--port", str(free_port())]
        worker = [*cli, "worker", "payment", "--redis-url", redis_url, "--partitions", str(partitions)]
        worker += ["--payment-limit", "1000000000"]
        steps = {
            "readback": ("controller-reads-back-OrderSubmitted", controller, "OrderSubmitted", naming.CONTROLLER_GROUP),
            "payment": ("payment-worker-on-OrderSubmitted", worker, "OrderSubmitted", "payment"),
            "events": ("controller-on-PaymentCaptured", controller, "PaymentCaptured", naming.CONTROLLER_GROUP),
        }
        with Children(settings.log_dir) as children:
            for step in settings.steps:
                name, args, message_type, group = steps[step]
                where = settings.profile_dir / step if settings.profile_dir else None
                result = await _drain(redis, children, name, args, message_type, group, partitions, where)
                print(result.line() if result else f"{name}: does not consume {message_type}; skipped")
        if time.perf_counter() - started > STEP_TIMEOUT_S:
            print(
                f"note: the drains ended more than {STEP_TIMEOUT_S:.0f}s after the workflows started, so step "
                "deadlines fired during the last one and its figures include TimerFired work; use fewer --messages"
            )
    finally:
        await redis.aclose()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.drain", description=__doc__.splitlines()[0] if __doc__ else ""
    )
    parser.add_argument("--messages", type=int, default=10_000, help="workflows to pre-fill (default: %(default)s)")
    parser.add_argument("--partitions", type=int, default=naming.DEFAULT_PARTITIONS)
    parser.add_argument("--redis-url", help="use this Redis (its database is FLUSHED) instead of an embedded one")
    parser.add_argument(
        "--steps",
        default=",".join(DEFAULT_STEPS),
        help="comma-separated drains to run, in order: readback, payment, events (default: %(default)s)",
    )
    parser.add_argument("--profile", type=Path, metavar="DIR", help="py-spy record each drain into DIR")
    parser.add_argument(
        "--cli", metavar="COMMAND", help="command line that runs `streamsaga` (default: the installed one)"
    )
    args = parser.parse_args(argv)
    steps = tuple(step.strip() for step in args.steps.split(",") if step.strip())
    if not steps or any(step not in STEPS for step in steps):
        parser.error(f"--steps takes some of {', '.join(STEPS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, terminate_as_interrupt)
    with tempfile.TemporaryDirectory(prefix="streamsaga-drain-") as log_dir, contextlib.ExitStack() as stack:
        url = args.redis_url or stack.enter_context(EmbeddedRedis()).url
        asyncio.run(_main(Settings(url, Path(log_dir), args.messages, args.partitions, steps, args.profile, args.cli)))


if __name__ == "__main__":
    main()
