"""One benchmark run: the processes, the phases, the results.

Synchronous code owns the processes (so they are stopped however the run ends);
each system's phases run in their own event loop while its processes are up.

A Ctrl-C, a SIGTERM or a dead child stops the load *cooperatively* — clients take
no new order, waiting workflows resolve as ``aborted`` — rather than by
cancelling tasks: on Python 3.11 ``asyncio.wait_for`` (which redis-py uses for
every send) can swallow a cancellation, and a benchmark that ignores Ctrl-C is
worse than none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from argparse import _ArgumentGroup as ArgumentGroup
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from bench import baseline
from bench.completion import Classifier, CompletionWatcher, classify_progress, progress_streams
from bench.keepalive import KeepAliveClient
from bench.load import Submitter, closed_loop, open_loop
from bench.memory import Footprint, footprint
from bench.orders import HttpSubmitter
from bench.processes import ChildFailed, Children, CpuMeter, load_average, streamsaga_command
from bench.profiling import Recorder, redis_counters, redis_delta, summarize
from bench.stats import PhaseResult
from contracts import naming
from contracts.definitions import ORDER_SAGA
from controller.embedded_redis import EmbeddedRedis, free_port
from participants.sdk.connection import connect, text

log = logging.getLogger(__name__)

WORKERS = tuple(dict.fromkeys(step.participant for step in ORDER_SAGA.steps))
# worker settings under which every benchmark order completes
HUGE_PAYMENT_LIMIT = "1000000000"
HUGE_STOCK = "1000000000"
READY_TIMEOUT_S = 60.0
PROFILED = ("controller", "worker-payment")


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
    log_level: str | None = None
    cli: str | None = None
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
    memory: Footprint | None = None
    """What streamsaga's workflows left in Redis, measured after its phases."""

    def phase(self, name: str) -> PhaseResult | None:
        return next((p for p in self.phases if p.name == name), None)


class BenchError(RuntimeError):
    pass


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: the run stopped early."""


def add_deployment_arguments(group: ArgumentGroup, defaults: Options) -> None:
    """The options of the deployment under test that every bench command shares."""
    group.add_argument(
        "--partitions", type=int, default=defaults.partitions, help="partitions of every process (default: %(default)s)"
    )
    group.add_argument("--redis-url", help="use this Redis instead of starting an embedded one; it gets written to")
    group.add_argument(
        "--cli",
        metavar="COMMAND",
        help="command line that runs `streamsaga` (default: the one installed beside this Python), "
        "e.g. a wrapper to try a change",
    )


def add_output_arguments(group: ArgumentGroup, profiled: str) -> None:
    """The output options every bench command shares; ``profiled``: the phase --profile records."""
    group.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    group.add_argument(
        "--log-dir",
        type=Path,
        help="keep the processes' logs here (default: a temporary directory, kept only if the run fails)",
    )
    group.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help=f"py-spy record the controller and the payment worker during {profiled} into DIR",
    )
    group.add_argument("-v", "--verbose", action="store_true")


def run(options: Options) -> Report:
    """Start what the options ask for, measure, stop everything."""
    report = Report(options)
    with bench_environment(report, "streamsaga-bench-") as (redis_url, log_dir):
        run_id = uuid.uuid4().hex[:8]
        if not options.skip_streamsaga:
            with Children(log_dir) as children:
                api_url = _start_streamsaga(children, options, redis_url)
                asyncio.run(_Drive(report, children, redis_url).streamsaga(api_url, run_id))
        if not options.skip_baseline:
            with Children(log_dir) as children:
                for stage in baseline.stages(options.baseline_steps):
                    args = [sys.executable, "-m", "bench.baseline", "--redis-url", redis_url]
                    args += ["--stage", stage.participant, "--partitions", str(options.partitions)]
                    args += ["--batch", str(options.batch)]
                    children.start(f"baseline-{stage.participant}", args)
                asyncio.run(_Drive(report, children, redis_url).baseline(run_id))
    return report


@contextlib.contextmanager
def bench_environment(report: Report, log_prefix: str) -> Iterator[tuple[str, Path]]:
    """What a run stands on: its Redis (``--redis-url``, else an embedded one) and the
    directory for the processes' logs, yielded as (Redis URL, log dir).  Records the
    machine in ``report.environment``; the logs are removed after a run that
    succeeded, unless ``--log-dir`` named where to keep them."""
    options = report.options
    report.environment = {
        "cpus": os.cpu_count(),
        "load_average_before": load_average(),
        "python": sys.version.split()[0],
        "partitions": options.partitions,
    }
    log_dir = options.log_dir or Path(tempfile.mkdtemp(prefix=log_prefix))
    log_dir.mkdir(parents=True, exist_ok=True)
    report.environment["log_dir"] = str(log_dir)
    succeeded = False
    try:
        with contextlib.ExitStack() as stack:
            if options.redis_url:
                redis_url = options.redis_url
                report.environment["redis"] = "external"
            else:
                with _sigint_blocked():  # inherited: a Ctrl-C must reach us, not stop Redis under the children
                    server = stack.enter_context(EmbeddedRedis())
                redis_url = server.url
                report.environment["redis"] = f"embedded {server.binary}"
            yield redis_url, log_dir
        succeeded = True
    finally:
        report.environment["load_average_after"] = load_average()
        if options.log_dir is None and succeeded:
            shutil.rmtree(log_dir, ignore_errors=True)
            report.environment["log_dir"] = None
        elif not succeeded:
            log.info("process logs kept in %s", log_dir)


# --- starting streamsaga ------------------------------------------------------------


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
    cli = streamsaga_command(options.cli)
    if options.log_level:
        cli += ["--log-level", options.log_level]
    port = free_port()
    controller = [*cli, "controller", "--redis-url", redis_url, "--host", "127.0.0.1", "--port", str(port)]
    controller += ["--partitions", str(options.partitions), *options.extra_controller_args]
    worker_help = _help([*streamsaga_command(options.cli), "worker"])
    # a setting the worker CLI does not have is left out rather than failing the run
    wanted = {"--payment-limit": HUGE_PAYMENT_LIMIT, "--default-stock": HUGE_STOCK}
    if options.worker_concurrency is not None:
        wanted["--concurrency"] = str(options.worker_concurrency)
    settings: list[str] = []
    for flag, value in wanted.items():
        if flag in worker_help:
            settings += [flag, value]
        else:
            log.warning("`streamsaga worker` has no %s option; not passing it", flag)
    children.start("controller", controller)
    for name in WORKERS:
        args = [*cli, "worker", name, "--redis-url", redis_url, "--partitions", str(options.partitions)]
        children.start(f"worker-{name}", [*args, *settings, *options.extra_worker_args])
    return f"http://127.0.0.1:{port}"


# --- driving load -------------------------------------------------------------------


class _Drive:
    """The phases of one system, in one event loop, stoppable by signal or a dead child."""

    def __init__(self, report: Report, children: Children, redis_url: str) -> None:
        self.report = report
        self.options = report.options
        self.children = children
        self.redis_url = redis_url
        self.stop = asyncio.Event()
        self.reason: BaseException | None = None
        self.watchers: list[CompletionWatcher] = []

    def abort(self, reason: BaseException) -> None:
        if self.reason is None:
            self.reason = reason
            log.warning("stopping the load: %s", str(reason).splitlines()[0] if str(reason) else type(reason).__name__)
        self.stop.set()
        for watcher in self.watchers:
            watcher.abort()

    def raise_if_stopped(self) -> None:
        if self.reason is not None:
            raise self.reason

    @contextlib.asynccontextmanager
    async def _running(self) -> AsyncIterator[Redis]:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self.abort, Interrupted(signal.Signals(signum).name))
        watchdog = asyncio.create_task(self._watch_children(), name="child-watchdog")
        redis = connect(self.redis_url, name="bench")
        try:
            yield redis
        finally:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
            await redis.aclose()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
        self.raise_if_stopped()

    async def _watch_children(self) -> None:
        while not self.stop.is_set():
            try:
                self.children.check()
            except ChildFailed as exc:
                self.abort(exc)
                return
            await asyncio.sleep(0.25)

    @contextlib.asynccontextmanager
    async def _watching(self, streams: list[str], classify: Classifier) -> AsyncIterator[CompletionWatcher]:
        reader = connect(self.redis_url, name="bench-watcher")
        watcher = CompletionWatcher(reader, streams, classify)
        await watcher.start()
        self.watchers.append(watcher)
        try:
            yield watcher
        finally:
            self.watchers.remove(watcher)
            await watcher.stop()
            await reader.aclose()

    async def streamsaga(self, api_url: str, run_id: str) -> None:
        options = self.options
        async with self._running() as redis:
            connector = aiohttp.TCPConnector(limit=max(options.concurrency, 256))
            timeout = aiohttp.ClientTimeout(total=options.timeout)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                await self._wait_http_ready(session, api_url + "/readyz")
                edges = (0, options.partitions - 1)
                groups = [(naming.message_stream(p, s.trigger), s.participant) for s in ORDER_SAGA.steps for p in edges]
                # the controller's own start event is left out: whether it reads it back is its business
                groups += [
                    (naming.message_stream(p, t), naming.CONTROLLER_GROUP)
                    for t in sorted(ORDER_SAGA.message_types() - {ORDER_SAGA.start})
                    for p in edges
                ]
                await self._wait_groups(redis, groups)
                async with (
                    KeepAliveClient(api_url, limit=max(options.concurrency, 256)) as client,
                    self._watching(progress_streams(options.partitions), classify_progress) as watcher,
                ):
                    await self._phases("streamsaga", HttpSubmitter(client, run_id, options.timeout), watcher)
                self.report.memory = await footprint(redis)

    async def baseline(self, run_id: str) -> None:
        options = self.options
        async with self._running() as redis:
            try:
                await self._wait_groups(redis, baseline.group_streams(options.partitions, options.baseline_steps))
                submit = baseline.BaselineSubmitter(redis, options.partitions, run_id)
                finals = baseline.final_streams(options.partitions, options.baseline_steps)
                async with self._watching(finals, baseline.classify_final) as watcher:
                    await self._phases("baseline", submit, watcher, open_loop_too=False)
            finally:
                self.children.stop()
                # best effort: leave a server given with --redis-url as we found it
                with contextlib.suppress(RedisError, OSError):
                    await baseline.delete_streams(redis, options.partitions)

    async def _phases(
        self,
        system: str,
        submit: Submitter,
        watcher: CompletionWatcher,
        *,
        open_loop_too: bool = True,
    ) -> None:
        options = self.options
        log.info("%s: warm-up, %d orders", system, options.warmup)
        warm = await closed_loop(
            f"{system} warm-up",
            submit,
            watcher,
            orders=options.warmup,
            concurrency=options.concurrency,
            max_wait=options.timeout,
            stop=self.stop,
        )
        self.raise_if_stopped()
        if warm.not_completed:
            tails = "\n".join(c.tail(15) for c in self.children.started)
            raise BenchError(
                f"{system} warm-up: {warm.not_completed} of {options.warmup} orders did not complete: "
                f"{dict(warm.outcomes)} {warm.error_samples}\n{tails}"
            )
        pids = {c.name: c.pid for c in self.children.started}
        pids["bench"] = os.getpid()
        index = options.warmup

        log.info("%s: closed loop, %d orders, concurrency %d", system, options.orders, options.concurrency)
        await self._measured(
            pids,
            system == "streamsaga",
            lambda: closed_loop(
                f"{system} closed loop",
                submit,
                watcher,
                orders=options.orders,
                concurrency=options.concurrency,
                first_index=index,
                max_wait=options.timeout,
                stop=self.stop,
            ),
        )
        index += options.orders
        if open_loop_too and not options.skip_open_loop:
            log.info("%s: open loop, %.0f/s for %.0fs", system, options.rate, options.duration)
            await self._measured(
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
                    stop=self.stop,
                ),
            )

    async def _measured(
        self, pids: dict[str, int], profile: bool, phase: Callable[[], Awaitable[PhaseResult]]
    ) -> PhaseResult:
        redis = connect(self.redis_url, name="bench-stats")
        recorder = None
        if profile and self.options.profile_dir is not None:
            recorder = Recorder(self.options.profile_dir, {n: p for n, p in pids.items() if n in PROFILED})
            recorder.start()
        try:
            meter = CpuMeter(pids, own="bench")
            before = await redis_counters(redis)
            meter.start()
            try:
                result = await phase()
            finally:
                written = recorder.stop() if recorder else []
            cpu = meter.stop()
            after = await redis_counters(redis)
        finally:
            await redis.aclose()
        self.raise_if_stopped()
        # Redis reports its own CPU, which works for a server given with --redis-url too
        redis_cpu, commands = redis_delta(before, after)
        cpu["redis"] = redis_cpu
        cpu["total"] = cpu.get("total", 0.0) + redis_cpu
        result.cpu_s = cpu
        result.redis_commands = commands
        for path in written:
            self.report.profiles[path.stem] = summarize(path)
        self.report.phases.append(result)
        log.info("%s: %.0f workflows/s, latency ms %s", result.name, result.throughput, _rounded(result.latency_ms()))
        return result

    async def _wait_http_ready(self, session: aiohttp.ClientSession, url: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        last = "no answer"
        while time.monotonic() < deadline:
            self.raise_if_stopped()
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
                    last = f"HTTP {response.status}: {(await response.text())[:200]}"
            except aiohttp.ClientError as exc:
                last = repr(exc)
            await asyncio.sleep(0.1)
        raise BenchError(f"{url} not ready after {READY_TIMEOUT_S:.0f}s: {last}")

    async def _wait_groups(self, redis: Redis, groups: list[tuple[str, str]]) -> None:
        """Wait until every (stream, consumer group) exists, i.e. every consumer has started."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        missing = groups
        while time.monotonic() < deadline:
            self.raise_if_stopped()
            async with redis.pipeline(transaction=False) as pipe:
                for stream, _ in missing:
                    pipe.xinfo_groups(stream)
                replies = await pipe.execute(raise_on_error=False)
            missing = [
                (stream, group)
                for (stream, group), reply in zip(missing, replies, strict=True)
                if isinstance(reply, ResponseError) or group not in {text(g["name"]) for g in reply}
            ]
            if not missing:
                return
            await asyncio.sleep(0.1)
        raise BenchError(f"consumer groups not created after {READY_TIMEOUT_S:.0f}s: {missing[:4]}")


# --- helpers ------------------------------------------------------------------------


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """Block SIGINT while starting a child that does not get its own session: the
    child inherits the blocked signal, so the terminal's Ctrl-C reaches only us and
    we stop the child in order.  A Ctrl-C meanwhile is delivered right after."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 1) for k, v in values.items()}


def terminate_as_interrupt(signum: int, frame: FrameType | None) -> None:
    """A SIGTERM handler: unwind like Ctrl-C, so every child and the Redis are stopped."""
    raise KeyboardInterrupt
