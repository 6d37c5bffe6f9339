"""One benchmark run: the processes, the phases, the results.

Synchronous code owns the processes (so they are stopped however the run ends);
each group of phases runs in its own event loop while its processes are up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from bench import baseline
from bench.completion import Classifier, CompletionWatcher, classify_progress, progress_streams
from bench.load import Submitter, closed_loop, open_loop
from bench.orders import HttpSubmitter
from bench.processes import Children, CpuMeter, load_average, streamsaga_command
from bench.profiling import Recorder, redis_counters, redis_delta, summarize
from bench.stats import PhaseResult
from contracts import naming
from contracts.definitions import ORDER_SAGA
from controller.embedded_redis import EmbeddedRedis, free_port
from participants.sdk.connection import connect

log = logging.getLogger(__name__)

T = TypeVar("T")

WORKERS = tuple(dict.fromkeys(step.participant for step in ORDER_SAGA.steps))
# worker settings under which every benchmark order completes
HUGE_PAYMENT_LIMIT = "1000000000"
HUGE_STOCK = "1000000000"
READY_TIMEOUT_S = 60.0


@dataclass
class Options:
    orders: int = 10_000
    concurrency: int = 64
    rate: float = 500.0
    duration: float = 10.0
    warmup: int = 1_000
    partitions: int = naming.DEFAULT_PARTITIONS
    redis_url: str | None = None
    skip_baseline: bool = False
    skip_streamsaga: bool = False
    skip_open_loop: bool = False
    baseline_steps: int = len(baseline.STAGES)
    batch: int = 200
    worker_concurrency: int | None = None
    timeout: float = 30.0
    log_dir: Path | None = None
    profile_dir: Path | None = None
    extra_controller_args: list[str] = field(default_factory=list)
    extra_worker_args: list[str] = field(default_factory=list)


@dataclass
class Report:
    options: Options
    environment: dict[str, Any] = field(default_factory=dict)
    phases: list[PhaseResult] = field(default_factory=list)
    profiles: dict[str, str] = field(default_factory=dict)

    def phase(self, name: str) -> PhaseResult | None:
        return next((p for p in self.phases if p.name == name), None)


class BenchError(RuntimeError):
    pass


def run(options: Options) -> Report:
    """Start what the options ask for, measure, stop everything."""
    report = Report(options)
    report.environment = {
        "cpus": os.cpu_count(),
        "load_average_before": load_average(),
        "python": sys.version.split()[0],
        "partitions": options.partitions,
    }
    with contextlib.ExitStack() as stack:
        if options.redis_url:
            redis_url = options.redis_url
            report.environment["redis"] = "external"
        else:
            server = stack.enter_context(EmbeddedRedis())
            redis_url = server.url
            report.environment["redis"] = f"embedded {server.binary}"
        log_dir = options.log_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="streamsaga-bench-")))
        log_dir.mkdir(parents=True, exist_ok=True)
        report.environment["log_dir"] = str(log_dir)
        run_id = uuid.uuid4().hex[:8]
        if not options.skip_streamsaga:
            with Children(log_dir) as children:
                api_url = _start_streamsaga(children, options, redis_url)
                asyncio.run(_drive_streamsaga(report, children, redis_url, api_url, run_id))
        if not options.skip_baseline:
            with Children(log_dir) as children:
                for stage in baseline.stages(options.baseline_steps):
                    args = [sys.executable, "-m", "bench.baseline", "--redis-url", redis_url]
                    args += ["--stage", stage.participant, "--partitions", str(options.partitions)]
                    args += ["--batch", str(options.batch)]
                    children.start(f"baseline-{stage.participant}", args)
                asyncio.run(_drive_baseline(report, children, redis_url, run_id))
        report.environment["load_average_after"] = load_average()
    return report


# --- streamsaga -------------------------------------------------------------------


def _help(command: list[str]) -> str:
    try:
        done = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"cannot run {' '.join(command)}: {exc}") from exc
    if done.returncode != 0:
        raise BenchError(f"{' '.join(command)} --help failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def _start_streamsaga(children: Children, options: Options, redis_url: str) -> str:
    """Start the controller and the workers; returns the API's base URL."""
    cli = streamsaga_command()
    port = free_port()
    controller = [*cli, "controller", "--redis-url", redis_url, "--host", "127.0.0.1", "--port", str(port)]
    controller += ["--partitions", str(options.partitions), *options.extra_controller_args]
    children.start("controller", controller)
    worker_help = _help([*cli, "worker"])
    for name in WORKERS:
        args = [*cli, "worker", name, "--redis-url", redis_url, "--partitions", str(options.partitions)]
        # settings a worker does not have are left out (e.g. a payment limit on shipping)
        wanted = {"--payment-limit": HUGE_PAYMENT_LIMIT, "--default-stock": HUGE_STOCK}
        if options.worker_concurrency is not None:
            wanted["--concurrency"] = str(options.worker_concurrency)
        for flag, value in wanted.items():
            if flag in worker_help:
                args += [flag, value]
        children.start(f"worker-{name}", [*args, *options.extra_worker_args])
    return f"http://127.0.0.1:{port}"


async def _drive_streamsaga(report: Report, children: Children, redis_url: str, api_url: str, run_id: str) -> None:
    options = report.options
    redis = connect(redis_url, name="bench")
    connector = aiohttp.TCPConnector(limit=max(options.concurrency, 256), force_close=False)
    session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=options.timeout))
    try:
        await _guarded(children, _wait_http_ready(session, api_url + "/readyz"))
        groups = [
            (naming.message_stream(p, step.trigger), step.participant)
            for step in ORDER_SAGA.steps
            for p in (0, options.partitions - 1)
        ]
        groups += [
            (naming.message_stream(p, t), naming.CONTROLLER_GROUP)
            for t in ORDER_SAGA.message_types()
            for p in (0, options.partitions - 1)
        ]
        await _guarded(children, _wait_groups(redis, groups))
        submit = HttpSubmitter(session, api_url, run_id)
        async with _watching(redis_url, progress_streams(options.partitions), classify_progress) as watcher:
            await _phases(report, "streamsaga", submit, watcher, children, redis)
    finally:
        await session.close()
        await redis.aclose()


# --- baseline ---------------------------------------------------------------------


async def _drive_baseline(report: Report, children: Children, redis_url: str, run_id: str) -> None:
    options = report.options
    redis = connect(redis_url, name="bench")
    try:
        await _guarded(
            children, _wait_groups(redis, baseline.group_streams(options.partitions, options.baseline_steps))
        )
        submit = baseline.BaselineSubmitter(redis, options.partitions, run_id)
        finals = baseline.final_streams(options.partitions, options.baseline_steps)
        async with _watching(redis_url, finals, baseline.classify_final) as watcher:
            await _phases(report, "baseline", submit, watcher, children, redis, open_loop_too=False)
    finally:
        try:
            children.stop()
            await baseline.delete_streams(redis, options.partitions)
        finally:
            await redis.aclose()


# --- phases -----------------------------------------------------------------------


async def _phases(
    report: Report,
    system: str,
    submit: Submitter,
    watcher: CompletionWatcher,
    children: Children,
    redis: Redis,
    *,
    open_loop_too: bool = True,
) -> None:
    options = report.options
    log.info("%s: warm-up, %d orders", system, options.warmup)
    warm = await _guarded(
        children,
        closed_loop(
            f"{system} warm-up",
            submit,
            watcher,
            orders=options.warmup,
            concurrency=options.concurrency,
            max_wait=options.timeout,
        ),
    )
    if warm.not_completed:
        raise BenchError(
            f"{system} warm-up: {warm.not_completed} of {options.warmup} orders did not complete: "
            f"{dict(warm.outcomes)} {warm.error_samples}\n" + "\n".join(c.tail(15) for c in children.started)
        )
    pids = {c.name: c.pid for c in children.started}
    pids["bench"] = os.getpid()
    index = options.warmup

    profile = options.profile_dir is not None and system == "streamsaga"
    log.info("%s: closed loop, %d orders, concurrency %d", system, options.orders, options.concurrency)
    await _measured(
        report,
        children,
        redis,
        pids,
        profile,
        lambda: closed_loop(
            f"{system} closed loop",
            submit,
            watcher,
            orders=options.orders,
            concurrency=options.concurrency,
            first_index=index,
            max_wait=options.timeout,
        ),
    )
    index += options.orders
    if open_loop_too and not options.skip_open_loop:
        log.info("%s: open loop, %.0f/s for %.0fs", system, options.rate, options.duration)
        await _measured(
            report,
            children,
            redis,
            pids,
            False,
            lambda: open_loop(
                f"{system} open loop",
                submit,
                watcher,
                rate=options.rate,
                duration=options.duration,
                first_index=index,
                max_wait=options.timeout,
            ),
        )


async def _measured(
    report: Report,
    children: Children,
    redis: Redis,
    pids: dict[str, int],
    profile: bool,
    phase: Callable[[], Awaitable[PhaseResult]],
) -> PhaseResult:
    meter = CpuMeter(pids, own="bench")
    recorder = None
    if profile and report.options.profile_dir is not None:
        wanted = {name: pid for name, pid in pids.items() if name in ("controller", "worker-payment")}
        recorder = Recorder(report.options.profile_dir, wanted)
        recorder.start()
    before = await redis_counters(redis)
    meter.start()
    try:
        result = await _guarded(children, phase())
    finally:
        written = recorder.stop() if recorder else []
    cpu = meter.stop()
    after = await redis_counters(redis)
    redis_cpu, commands = redis_delta(before, after)
    # Redis reports its own CPU, which works for a server given with --redis-url too
    cpu["redis"] = redis_cpu
    cpu["total"] = cpu.get("total", 0.0) + redis_cpu
    result.cpu_s = cpu
    result.redis_commands = commands
    for path in written:
        report.profiles[path.stem] = summarize(path)
    report.phases.append(result)
    log.info("%s: %.0f workflows/s, %s", result.name, result.throughput, result.latency_ms())
    return result


# --- helpers ----------------------------------------------------------------------


async def _guarded(children: Children, work: Awaitable[T], interval: float = 0.25) -> T:
    """``await work``, but fail fast if a child process dies meanwhile."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=interval)
            if done:
                return task.result()
            children.check()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@contextlib.asynccontextmanager
async def _watching(redis_url: str, streams: list[str], classify: Classifier) -> AsyncIterator[CompletionWatcher]:
    reader = connect(redis_url, name="bench-watcher")
    watcher = CompletionWatcher(reader, streams, classify)
    await watcher.start()
    try:
        yield watcher
    finally:
        await watcher.stop()
        await reader.aclose()


async def _wait_http_ready(session: aiohttp.ClientSession, url: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            async with session.get(url) as response:
                if response.status == 200:
                    return
                last = f"HTTP {response.status}: {(await response.text())[:200]}"
        except aiohttp.ClientError as exc:
            last = repr(exc)
        await asyncio.sleep(0.1)
    raise BenchError(f"{url} not ready after {READY_TIMEOUT_S:.0f}s: {last}")


async def _wait_groups(redis: Redis, groups: list[tuple[str, str]]) -> None:
    """Wait until every (stream, consumer group) exists, i.e. every consumer has started."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    missing = groups
    while time.monotonic() < deadline:
        async with redis.pipeline(transaction=False) as pipe:
            for stream, _ in missing:
                pipe.xinfo_groups(stream)
            replies = await pipe.execute(raise_on_error=False)
        missing = [
            (stream, group)
            for (stream, group), reply in zip(missing, replies, strict=True)
            if isinstance(reply, ResponseError) or group not in {_text(g["name"]) for g in reply}
        ]
        if not missing:
            return
        await asyncio.sleep(0.1)
    raise BenchError(f"consumer groups not created after {READY_TIMEOUT_S:.0f}s: {missing[:4]}")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
