"""``streamsaga dev``: the whole system on one machine, with sample orders to watch.

It starts Redis (embedded unless a URL is given), the controller and the example
workers as child processes, each in a process group of its own; submits sample
orders whose outcomes are known in advance; prints every change of their state as
it happens; prints the ledger; and, on Ctrl-C, SIGTERM or ``--exit-when-done``,
stops every child and the embedded Redis — leaving nothing running.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import aiohttp

from controller.embedded_redis import EmbeddedRedis, EmbeddedRedisError
from controller.instance import TERMINAL, WorkflowStatus
from participants.sdk.waiting import wait_until
from participants.workers import WORKER_NAMES

POLL_S = 0.1
STOP_GRACE_S = 10.0
DONE = TERMINAL | {WorkflowStatus.NEEDS_ATTENTION}

# The workers run with these settings so that each sample's outcome is certain.
PAYMENT_LIMIT = Decimal("1000.00")
STOCK = 100
COUNTRIES = ("US", "CA", "GB", "DE", "FR", "NL")
UNSUPPORTED_COUNTRY = "BR"
NOTIFY_FAILS_FOR = "erin"


@dataclass(frozen=True)
class DevOptions:
    """What ``streamsaga dev`` was asked for (its defaults live in the CLI)."""

    redis_url: str | None  # None: start an embedded server
    port: int
    partitions: int
    data_dir: Path
    exit_when_done: bool
    timeout_s: float
    log_level: str
    log_format: str = "text"


@dataclass(frozen=True)
class Sample:
    label: str
    order: dict[str, Any]
    expect: WorkflowStatus
    why: str


def _order(customer: str, sku: str, quantity: int, unit_price: Decimal, country: str) -> dict[str, Any]:
    return {
        "customer_id": customer,
        "items": [{"sku": sku, "quantity": quantity, "unit_price": str(unit_price)}],
        "currency": "USD",
        "ship_to": {"country": country, "name": customer.title()},
    }


def samples(run: str) -> list[Sample]:
    """One order per outcome of the order saga.  Their SKUs are the ``run``'s own: the
    data dir persists, and stock taken by earlier runs must not change this run's outcomes."""
    assert UNSUPPORTED_COUNTRY not in COUNTRIES
    found = [
        Sample("completes", _order("alice", f"BOOK-{run}", 2, Decimal("12.50"), "US"), WorkflowStatus.COMPLETED,
               "an ordinary order"),
        Sample("over-limit", _order("bob", f"LAPTOP-{run}", 1, PAYMENT_LIMIT + Decimal("0.01"), "CA"),
               WorkflowStatus.FAILED, f"payment declines a total over {PAYMENT_LIMIT}; nothing to undo"),
        Sample("beyond-stock", _order("carol", f"MUG-{run}", STOCK + 1, Decimal("1.00"), "GB"),
               WorkflowStatus.COMPENSATED, f"inventory has {STOCK} of a SKU; the payment is refunded"),
        Sample("unsupported-country", _order("dave", f"PEN-{run}", 3, Decimal("2.50"), UNSUPPORTED_COUNTRY),
               WorkflowStatus.COMPENSATED, f"shipping to {UNSUPPORTED_COUNTRY} fails; stock and payment are undone"),
        Sample("notification-fails", _order(NOTIFY_FAILS_FOR, f"CARD-{run}", 1, Decimal("4.00"), "DE"),
               WorkflowStatus.COMPLETED, "the notification fails, which is not critical"),
    ]  # fmt: skip
    for sample in found:  # so the ledger's order column says which sample a row is
        sample.order["order_id"] = f"{sample.label}-{run}"
    return found


def say(message: str) -> None:
    print(message, flush=True)


# --- child processes ---------------------------------------------------------------


def _parent_death_signal() -> Callable[[], None] | None:
    """On Linux, a child asks to get SIGTERM should this process die without stopping it."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork: the child only calls it
    pr_set_pdeathsig = 1

    def ask() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return ask


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    def tail(self, lines: int = 20) -> str:
        self.log_file.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Children:
    """The child processes, each leading its own process group (so the terminal's Ctrl-C
    reaches only this supervisor, which stops them in order)."""

    log_dir: Path
    log_level: str
    log_format: str = "text"
    running: list[Child] = field(default_factory=list)

    def spawn(self, name: str, *args: str) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        log_file = log_path.open("wb")  # this run's log only: an earlier run's lines would bury its errors
        process = subprocess.Popen(
            [sys.executable, "-m", "controller", "--log-level", self.log_level, "--log-format", self.log_format, *args],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_parent_death_signal(),  # safe: no threads exist yet when the children start
        )
        child = Child(name, process, log_path, log_file)
        self.running.append(child)
        say(f"dev: started {name} (pid {process.pid}), log {log_path}")
        return child

    def exited(self) -> list[Child]:
        return [child for child in self.running if child.process.poll() is not None]

    async def stop(self) -> None:
        """SIGTERM every group, wait for a graceful drain, SIGKILL what is left."""
        for child in self.running:
            _signal_group(child.process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for child in self.running:
            try:
                await asyncio.to_thread(child.process.wait, max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                say(f"dev: {child.name} did not stop within {STOP_GRACE_S:.0f}s; killing it")
            _signal_group(child.process, signal.SIGKILL)  # also ends anything a child left in its group
            child.process.wait()
            child.log_file.close()
            say(f"dev: stopped {child.name} (exit {child.process.returncode})")
        self.running.clear()


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        # the child leads its group, so its pid is the group's id
        os.killpg(process.pid, sig)


@contextlib.contextmanager
def _redis(options: DevOptions) -> Iterator[str]:
    if options.redis_url is not None:
        say(f"dev: using Redis at {options.redis_url}")
        yield options.redis_url
        return
    # absolute: redis-server resolves --logfile after changing into --dir
    with EmbeddedRedis(data_dir=(options.data_dir / "redis").resolve(), persist=True) as server:
        assert server.process is not None
        say(f"dev: started embedded redis-server (pid {server.process.pid}) at {server.url}, data in {server.data_dir}")
        yield server.url
    say("dev: stopped embedded redis-server")


# --- watching the samples ----------------------------------------------------------


def _clock() -> str:
    return datetime.now().strftime("%H:%M:%S.%f")[:-3]


def _changes(before: dict[str, Any] | None, after: dict[str, Any]) -> Iterator[str]:
    """Readable lines for what changed between two views of a workflow."""
    old_steps = {s["name"]: s for s in before["steps"]} if before else {}
    for step in after["steps"]:
        old = old_steps.get(step["name"])
        if (old["status"] if old else "pending") != step["status"]:
            error = f"  ({step['error']})" if step.get("error") else ""
            yield f"{step['name']:<13} {step['status']}{error}"
    if before is None or before["status"] != after["status"]:
        error = f"  ({after['error']})" if after.get("error") else ""
        yield f"{'workflow':<13} {after['status']}{error}"


async def _wait_for(
    session: aiohttp.ClientSession,
    children: Children,
    stop: asyncio.Event,
    path: str,
    ready: Callable[[Any], bool] = lambda _: True,
) -> bool:
    """Poll ``GET path`` until it answers 200 with a body ``ready`` accepts; False if a
    child exits (its last log lines are shown) or ``stop`` is set first."""
    while not stop.is_set():
        if dead := children.exited():
            for child in dead:
                say(f"dev: {child.name} exited with {child.process.returncode}; last lines of {child.log_path}:")
                say(child.tail())
            return False
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(path) as response:
                if response.status == 200 and ready(await response.json(content_type=None)):
                    return True
        await wait_until(stop, POLL_S)
    return False


def _workers_live(body: Any) -> bool:
    """Every example worker heartbeats, per ``GET /v1/participants``."""
    return {p["name"] for p in body["participants"] if p["live"]} >= set(WORKER_NAMES)


async def _submit(session: aiohttp.ClientSession, sample: Sample) -> str | None:
    async with session.post("/v1/orders", json=sample.order) as response:
        body = await response.json(content_type=None)
    if response.status != 202:
        say(f"dev: sample {sample.label} was rejected: {response.status} {body.get('detail')}")
        return None
    workflow_id: str = body["workflow_id"]
    return workflow_id


async def _watch(
    session: aiohttp.ClientSession, started: dict[str, Sample], final: dict[str, str], stop: asyncio.Event
) -> None:
    """Poll each workflow until it is done, printing every change; fills ``final`` (id -> final status)."""
    seen: dict[str, dict[str, Any] | None] = dict.fromkeys(started)
    while not stop.is_set() and len(final) < len(started):
        for workflow_id, sample in started.items():
            if workflow_id in final:
                continue
            async with session.get(f"/v1/workflows/{workflow_id}") as response:
                if response.status != 200:
                    continue
                view = await response.json()
            for line in _changes(seen[workflow_id], view):
                say(f"{_clock()}  {sample.label:<20} {line}")
            seen[workflow_id] = view
            if view["status"] in DONE:
                final[workflow_id] = view["status"]
        await wait_until(stop, POLL_S)


async def _print_ledger(redis_url: str, partitions: int) -> None:
    from controller.cli import read_settled_ledger
    from participants.ledger import format_ledger

    ledger = await read_settled_ledger(redis_url, partitions, "streamsaga-dev")
    say("\nledger:")
    say(format_ledger(ledger))


async def _session(options: DevOptions, redis_url: str, children: Children, stop: asyncio.Event) -> bool:
    """Start the processes, run the samples; whether every sample ended as expected."""
    common = ("--redis-url", redis_url, "--partitions", str(options.partitions))
    children.spawn("controller", "controller", *common, "--port", str(options.port))
    for name in WORKER_NAMES:
        children.spawn(
            name,
            "worker", name, *common,
            "--payment-limit", str(PAYMENT_LIMIT),
            "--default-stock", str(STOCK),
            "--countries", ",".join(COUNTRIES),
            "--notify-fail-customers", NOTIFY_FAILS_FOR,
        )  # fmt: skip
    api = f"http://127.0.0.1:{options.port}"
    async with aiohttp.ClientSession(base_url=api) as session:
        try:
            async with asyncio.timeout(options.timeout_s):
                ready = await _wait_for(session, children, stop, "/readyz")
        except TimeoutError:
            say(f"dev: the API was not ready within {options.timeout_s:.0f}s; see {children.log_dir}")
            ready = False
        if ready:
            say(f"dev: API ready at {api}")
            # samples have deadlines: send none before every worker is serving
            try:
                async with asyncio.timeout(options.timeout_s):
                    ready = await _wait_for(session, children, stop, "/v1/participants", _workers_live)
            except TimeoutError:
                say(f"dev: the workers were not all live within {options.timeout_s:.0f}s; see {children.log_dir}")
                ready = False
        if not ready:
            return False
        say(f"dev: workers live: {', '.join(WORKER_NAMES)}")
        started: dict[str, Sample] = {}
        for sample in samples(datetime.now().strftime("%Y%m%d%H%M%S")):
            workflow_id = await _submit(session, sample)
            if workflow_id is None:
                return False
            started[workflow_id] = sample
            say(f"{_clock()}  {sample.label:<20} submitted     {workflow_id}  (expect {sample.expect}: {sample.why})")
        final: dict[str, str] = {}
        try:
            async with asyncio.timeout(options.timeout_s):
                await _watch(session, started, final, stop)
        except TimeoutError:
            say(f"dev: samples still running after {options.timeout_s:.0f}s")
    say("\noutcomes:")
    all_ok = True
    for workflow_id, sample in started.items():
        outcome = final.get(workflow_id, "unfinished")
        ok = outcome == sample.expect
        all_ok &= ok
        say(f"  {'ok ' if ok else 'BAD'} {sample.label:<20} {outcome:<12} expected {sample.expect:<12} {workflow_id}")
    await _print_ledger(redis_url, options.partitions)
    return all_ok


async def run_dev(options: DevOptions) -> int:
    """Run ``streamsaga dev``; the exit status (1 if a sample missed its expected outcome)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    children = Children(options.data_dir / "logs", options.log_level, options.log_format)
    all_ok = False
    try:
        with _redis(options) as redis_url:
            try:
                all_ok = await _session(options, redis_url, children, stop)
                if not options.exit_when_done and not stop.is_set():
                    api = f"http://127.0.0.1:{options.port}"
                    say(f"\ndev: running; API on {api}; Ctrl-C stops everything")
                    say(f"dev: from another shell: export STREAMSAGA_REDIS_URL={redis_url} STREAMSAGA_API={api}")
                    say("     then: streamsaga submit examples/order.json --watch; streamsaga ledger")
                    await _keep_running(children, stop)
            finally:
                await children.stop()
    except EmbeddedRedisError as exc:
        say(f"dev: {exc}")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0 if all_ok else 1


async def _keep_running(children: Children, stop: asyncio.Event) -> None:
    reported: set[str] = set()
    while not stop.is_set():
        for child in children.exited():
            if child.name not in reported:
                reported.add(child.name)
                say(f"dev: {child.name} exited with {child.process.returncode}; see {child.log_path}")
        await wait_until(stop, 1.0)
