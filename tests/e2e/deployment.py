"""A real deployment for end-to-end tests: the controller and the example workers
as separate processes on the test run's Redis."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
from redis.asyncio import Redis

from contracts import naming
from contracts.definitions import ORDER_SAGA, RetryPolicy, WorkflowDefinition
from controller.embedded_redis import free_port
from participants.workers import WORKER_NAMES

PARTITIONS = 4
NO_NOTIFY_CUSTOMER = "no-notify"
TERMINAL = ("completed", "compensated", "failed")
SHIPPING_TIMEOUT_S = 1.5
POLL_S = 0.05  # polling interval of every wait below, each bounded by a deadline
FREEZE_POLL_S = 0.001  # catching a process while it holds entries needs a tight poll


class Deployment:
    def __init__(self, redis_url: str, log_dir: Path) -> None:
        self.redis_url = redis_url
        self.log_dir = log_dir
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.controller_args: list[str] = []

    def _spawn(self, name: str, args: Sequence[str]) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "controller", "--log-level", "INFO", *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        self.processes[name] = process
        return process

    def start_controller(self, name: str = "controller", *extra: str) -> None:
        self._spawn(
            name,
            [
                "controller",
                "--redis-url",
                self.redis_url,
                "--partitions",
                str(PARTITIONS),
                "--port",
                str(self.port),
                "--consumer",
                name,
                *self.controller_args,
                *extra,
            ],
        )

    def start_worker(self, worker: str, replica: int = 1, *extra: str) -> str:
        name = f"{worker}-{replica}"
        self._spawn(
            name,
            [
                "worker",
                worker,
                "--redis-url",
                self.redis_url,
                "--partitions",
                str(PARTITIONS),
                "--consumer",
                name,
                "--notify-fail-customers",
                NO_NOTIFY_CUSTOMER,
                *extra,
            ],
        )
        return name

    def start_all(self, *, without: Sequence[str] = ()) -> None:
        self.start_controller()
        for worker in WORKER_NAMES:
            if worker not in without:
                self.start_worker(worker)

    def kill(self, name: str) -> None:
        """kill -9: no drain, no cleanup — a crash."""
        process = self.processes.pop(name)
        process.send_signal(signal.SIGKILL)
        process.send_signal(signal.SIGCONT)
        process.wait(timeout=10)

    async def kill_holding_entries(self, redis: Redis, name: str, group: str, types: Sequence[str]) -> int:
        """kill -9 ``name`` at a moment it holds delivered, unacknowledged entries.

        The process is frozen (SIGSTOP) when it is seen holding entries, so it cannot
        ack them between the check and the kill; returns how many it held.
        """
        streams = [naming.message_stream(p, t) for p in range(PARTITIONS) for t in types]
        process = self.processes[name]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if await self._pending_of(redis, streams, group, name):
                process.send_signal(signal.SIGSTOP)
                held = await self._pending_of(redis, streams, group, name)
                if held:
                    self.kill(name)
                    return held
                process.send_signal(signal.SIGCONT)
            await asyncio.sleep(FREEZE_POLL_S)
        raise AssertionError(f"{name} never held an unacknowledged entry")

    @staticmethod
    async def _pending_of(redis: Redis, streams: Sequence[str], group: str, consumer: str) -> int:
        async with redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xpending(stream, group)
            summaries = await pipe.execute(raise_on_error=False)
        held = 0
        for summary in summaries:
            if isinstance(summary, dict):
                for row in summary.get("consumers") or []:
                    if row["name"] in (consumer, consumer.encode()):
                        held += int(row["pending"])
        return held

    def stop_process(self, name: str) -> None:
        """SIGTERM: the process drains and exits."""
        process = self.processes.pop(name)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.log_dir.glob("*.log")))

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise AssertionError(f"{name} exited with {process.returncode}\n{self.logs()}")
            try:
                async with session.get(f"{self.api}/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(POLL_S)
        raise AssertionError(f"controller not ready after {timeout}s\n{self.logs()}")

    async def submit(
        self, session: aiohttp.ClientSession, order: dict[str, Any], key: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        headers = {"Idempotency-Key": key} if key else {}
        async with session.post(f"{self.api}/v1/orders", json=order, headers=headers) as response:
            body: dict[str, Any] = await response.json(content_type=None)
            return response.status, body

    async def workflow(self, session: aiohttp.ClientSession, workflow_id: str) -> dict[str, Any]:
        async with session.get(f"{self.api}/v1/workflows/{workflow_id}") as response:
            assert response.status == 200, await response.text()
            body: dict[str, Any] = await response.json()
            return body

    async def history(self, session: aiohttp.ClientSession, workflow_id: str) -> list[dict[str, Any]]:
        async with session.get(f"{self.api}/v1/workflows/{workflow_id}/history") as response:
            assert response.status == 200, await response.text()
            body = await response.json()
            return list(body["events"] if isinstance(body, dict) else body)

    async def wait_terminal(
        self,
        session: aiohttp.ClientSession,
        workflow_ids: Sequence[str],
        timeout: float = 60.0,  # noqa: ASYNC109
    ) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        done: dict[str, dict[str, Any]] = {}
        while True:
            for workflow_id in workflow_ids:
                if workflow_id in done:
                    continue
                try:
                    state = await self.workflow(session, workflow_id)
                except aiohttp.ClientError:
                    continue  # the controller may be restarting
                if state["status"] in TERMINAL:
                    done[workflow_id] = state
            if len(done) == len(workflow_ids):
                return done
            if time.monotonic() > deadline:
                missing = [w for w in workflow_ids if w not in done]
                raise AssertionError(f"{len(missing)} workflows not finished, e.g. {missing[:3]}\n{self.logs()}")
            await asyncio.sleep(POLL_S)


def order(
    customer: str = "c-1",
    items: Sequence[tuple[str, int, str]] = (("SKU-1", 1, "10.00"),),
    country: str = "US",
) -> dict[str, Any]:
    return {
        "customer_id": customer,
        "items": [{"sku": sku, "quantity": quantity, "unit_price": price} for sku, quantity, price in items],
        "currency": "USD",
        "ship_to": {"country": country, "city": "Springfield"},
    }


def short_order_saga(**changes: Any) -> WorkflowDefinition:
    """The order saga, version 2, with deadlines short enough for tests."""
    steps = []
    for step in ORDER_SAGA.steps:
        update: dict[str, Any] = {"timeout_s": SHIPPING_TIMEOUT_S if step.name == "shipping" else 20.0}
        if step.compensation:
            update["compensation"] = step.compensation.model_copy(
                update={"timeout_s": 2.0, "retry": RetryPolicy(max_attempts=3, base_s=0.2, max_s=1.0)}
            )
        steps.append(step.model_copy(update=update))
    return ORDER_SAGA.model_copy(update={"version": 2, "steps": tuple(steps), "sla_s": 60.0, **changes})
