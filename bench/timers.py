"""How late deadlines fire: ``python -m bench.timers``.

Starts an embedded Redis and one controller process with the order saga given a
short payment timeout, and no workers, so every order's payment step times out.
For each workflow it compares the step's ``deadline_at`` with the moment the
controller applied its ``TimerFired`` (both on the controller's clock), i.e. the
whole path: timer set in the start commit on the Redis clock, found by the 50 ms
poll, moved into the stream, read and applied by the correlator.  Target: within 250 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.orders import order
from bench.run import terminate_as_interrupt
from bench.stats import percentile
from contracts.definitions import ORDER_SAGA
from controller.embedded_redis import EmbeddedRedis, free_port

TARGET_MS = 250.0


def _definition(timeout_s: float) -> dict[str, Any]:
    steps = tuple(s.model_copy(update={"timeout_s": timeout_s}) if s.name == "payment" else s for s in ORDER_SAGA.steps)
    return ORDER_SAGA.model_copy(update={"version": 2, "steps": steps}).model_dump(mode="json")


async def _run(options: argparse.Namespace, redis_url: str, workdir: Path) -> list[float]:
    definitions = workdir / "definitions.json"
    definitions.write_bytes(orjson.dumps([_definition(options.timeout)]))
    port = free_port()
    controller = subprocess.Popen(  # noqa: ASYNC220 - started once, before any measurement
        [sys.executable, "-m", "controller", "--log-level", "WARNING", "controller", "--redis-url", redis_url,
         "--port", str(port), "--definitions", str(definitions)],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    api = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(base_url=api) as session:
            deadline = time.monotonic() + 30
            while True:
                try:
                    async with session.get("/readyz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("the controller did not become ready")
                await asyncio.sleep(0.05)
            ids: list[str] = []
            start = time.monotonic()
            for i in range(options.orders):  # spread the deadlines over time, at --rate
                await asyncio.sleep(max(0.0, start + i / options.rate - time.monotonic()))
                async with session.post("/v1/orders", json=order("timers", i)) as response:
                    ids.append((await response.json())["workflow_id"])
            await asyncio.sleep(options.timeout + 1.0)
            lateness: list[float] = []
            for workflow_id in ids:
                for _ in range(100):
                    async with session.get(f"/v1/workflows/{workflow_id}/history") as response:
                        events = (await response.json())["events"]
                    fired = [e for e in events if e["type"] == "TimerFired" and e["step"] == "payment"]
                    if fired:
                        break
                    await asyncio.sleep(0.1)
                else:
                    raise SystemExit(f"the payment deadline of {workflow_id} never fired")
                async with session.get(f"/v1/workflows/{workflow_id}") as response:
                    created = datetime.fromisoformat((await response.json())["created_at"])
                due = created.timestamp() + options.timeout
                lateness.append((datetime.fromisoformat(fired[0]["at"]).timestamp() - due) * 1000)
            return lateness
    finally:
        controller.send_signal(signal.SIGTERM)
        try:
            controller.wait(timeout=15)
        except subprocess.TimeoutExpired:
            controller.kill()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.timers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=300, help="workflows, each with one deadline (default: 300)")
    parser.add_argument("--rate", type=float, default=100.0, help="orders per second (default: 100)")
    parser.add_argument("--timeout", type=float, default=1.0, help="payment timeout, seconds (default: 1.0)")
    options = parser.parse_args()
    signal.signal(signal.SIGTERM, terminate_as_interrupt)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as workdir, EmbeddedRedis() as redis:
        lateness = asyncio.run(_run(options, redis.url, Path(workdir)))
    ranked = sorted(lateness)
    figures = {f"p{q}": percentile(ranked, q) for q in (50, 95, 99)} | {"max": ranked[-1]}
    verdict = "met" if ranked[-1] <= TARGET_MS else "NOT met"
    print(f"deadline lateness over {len(ranked)} deadlines ({options.rate:g} orders/s, load {load_before[0]:.2f})")
    print("  " + "  ".join(f"{name} {value:.1f} ms" for name, value in figures.items()))
    print(f"  min {ranked[0]:.1f} ms; target: within {TARGET_MS:.0f} ms: {verdict}")


if __name__ == "__main__":
    main()
