"""``python -m bench.sse``: what 1,000 live SSE clients cost the order benchmark.

Starts the deployment ``python -m bench`` uses (embedded Redis, the controller and
the four example workers as separate processes), runs a closed-loop order phase
with no SSE client, then connects ``--clients`` clients to ``GET /v1/events`` on
the controller from a separate process and runs the same closed loop again.  It
prints throughput and end-to-end latency of both phases, and the SSE delivery
latency — from a progress line's ``at`` (when the controller decided it) to its
receipt by a client — measured on every event by ``--probes`` of the clients
(the others only count events and bytes, so the client process stays light) and
on the oldest event of every read by all clients.

A client cut off with ``overflow`` reconnects with ``Last-Event-ID`` at once; the
counts of both are printed.  The probes check that every workflow they saw from
its first line arrived without a gap or a duplicate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import resource
import signal
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import aiohttp
import orjson
from redis.exceptions import RedisError

from bench.completion import CompletionWatcher
from bench.load import Submitter, closed_loop
from bench.processes import ChildFailed, Children
from bench.run import (
    BenchError,
    Interrupted,
    Options,
    Report,
    _Drive,
    _start_streamsaga,
    add_deployment_arguments,
    add_output_arguments,
    bench_environment,
    terminate_as_interrupt,
)
from bench.stats import PhaseResult, percentile
from participants.sdk import collector

log = logging.getLogger(__name__)

CONNECT_CONCURRENCY = 50
CONNECT_TIMEOUT_S = 120.0
CLIENT_STOP_TIMEOUT_S = 30.0
_EVENT = b"\nevent: "
_AT = b'"at":"'
_OVERFLOW = b"event: overflow\ndata: "


@dataclass
class SseOptions:
    clients: int = 1_000
    probes: int = 50
    query: str = ""
    orders: int = 2_000
    warmup: int = 300


@dataclass
class SseReport:
    report: Report
    sse: SseOptions
    clients: dict[str, Any] = field(default_factory=dict)
    records: int = 0
    """Progress records written during the phase with clients (what an unfiltered client should get)."""


# --- the clients' process -------------------------------------------------------------


@dataclass
class _Tally:
    connected: int = 0
    failed: int = 0
    errors: int = 0
    overflows: int = 0
    resumed: int = 0
    events: list[int] = field(default_factory=list)
    bytes: int = 0
    probe_latencies: list[float] = field(default_factory=list)
    read_latencies: list[float] = field(default_factory=list)
    probe_events: int = 0
    order_violations: int = 0
    measuring: bool = False

    def reset(self) -> None:
        self.events = [0] * len(self.events)
        self.bytes = 0
        self.overflows = self.resumed = self.errors = 0
        self.probe_latencies.clear()
        self.read_latencies.clear()
        self.probe_events = 0
        self.order_violations = 0


def _at(raw: bytes) -> float:
    return datetime.fromisoformat(raw.decode()).timestamp()


class _Probe:
    """Parses every event of one client: its delivery latency, and per workflow, gaps and duplicates."""

    def __init__(self, tally: _Tally) -> None:
        self.tally = tally
        self.buffer = b""
        self.last_seq: dict[str, int] = {}

    def feed(self, chunk: bytes, now: float) -> None:
        self.buffer += chunk
        *frames, self.buffer = self.buffer.split(b"\n\n")
        for frame in frames:
            start = frame.find(b"\ndata: ")
            if start < 0 or frame.startswith(b"event: "):  # comments, retry:, end/overflow
                continue
            data = orjson.loads(frame[start + 7 :])
            if self.tally.measuring:
                self.tally.probe_latencies.append(now - datetime.fromisoformat(data["at"]).timestamp())
                self.tally.probe_events += 1
            workflow_id, seq = data["workflow_id"], data["seq"]
            last = self.last_seq.get(workflow_id)
            if last is None and seq != 0:
                continue  # began before this client connected
            if seq != (-1 if last is None else last) + 1:
                self.tally.order_violations += 1
            self.last_seq[workflow_id] = seq


async def _client(
    session: aiohttp.ClientSession, url: str, index: int, tally: _Tally, probe: bool, connected: asyncio.Event
) -> None:
    """One SSE client: reads until cancelled, resuming after an ``overflow`` with Last-Event-ID."""
    last_event_id: str | None = None
    first = True
    parser = _Probe(tally) if probe else None
    while True:
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        tail = b""
        try:
            async with session.get(url, headers=headers) as response:
                if response.status != 200:
                    tally.failed += 1
                    log.warning("client %d: HTTP %d %s", index, response.status, (await response.text())[:200])
                    connected.set()
                    return
                if first:
                    tally.connected += 1
                    first = False
                    connected.set()
                async for chunk in response.content.iter_any():
                    now = time.time()
                    events = (tail[-7:] + chunk).count(_EVENT)
                    tail = (tail + chunk)[-4096:]
                    if tally.measuring:
                        tally.events[index] += events
                        tally.bytes += len(chunk)
                        at = chunk.find(_AT)
                        if at >= 0:
                            end = chunk.find(b'"', at + 6)
                            if end > 0:
                                tally.read_latencies.append(now - _at(chunk[at + 6 : end]))
                    if parser is not None:
                        parser.feed(chunk, now)
        except (aiohttp.ClientError, OSError) as exc:
            tally.errors += 1
            log.debug("client %d: %r", index, exc)
            await asyncio.sleep(1)
            continue
        found = tail.rfind(_OVERFLOW)
        if found < 0:
            await asyncio.sleep(1)  # the server closed (shutting down): reconnect as EventSource would
            continue
        overflow = orjson.loads(tail[found + len(_OVERFLOW) :].split(b"\n", 1)[0])
        tally.overflows += 1
        tally.resumed += 1
        last_event_id = overflow["last_event_id"]
        if tally.measuring:
            tally.events[index] -= 1  # the overflow event itself


async def _serve_clients(url: str, clients: int, probes: int) -> None:
    """The clients' process: connect, say so, then measure between ``measure`` and ``stop`` on stdin."""
    tally = _Tally(events=[0] * clients)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None, sock_connect=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks: list[asyncio.Task[None]] = []
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def connect(index: int) -> None:
            connected = asyncio.Event()
            async with gate:
                tasks.append(asyncio.create_task(_client(session, url, index, tally, index < probes, connected)))
                await connected.wait()

        started = time.perf_counter()
        await asyncio.gather(*(connect(i) for i in range(clients)))
        _say({"connected": tally.connected, "failed": tally.failed, "seconds": time.perf_counter() - started})
        cpu_before = _own_cpu()
        while command := (await reader.readline()).decode().strip():
            if command == "measure":
                tally.reset()
                tally.measuring = True
                cpu_before = _own_cpu()
                _say({"measuring": True})
            elif command == "stop":
                tally.measuring = False
                _say(_summary(tally, _own_cpu() - cpu_before))
                break
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _say(message: dict[str, Any]) -> None:
    sys.stdout.buffer.write(orjson.dumps(message) + b"\n")
    sys.stdout.flush()


def _latency(values: list[float]) -> dict[str, float | None]:
    ordered = sorted(values)
    found = {f"p{q}": percentile(ordered, q) * 1000 for q in (50, 95, 99)}
    found["max"] = ordered[-1] * 1000 if ordered else math.nan
    return {k: None if math.isnan(v) else round(v, 1) for k, v in found.items()}


def _summary(tally: _Tally, cpu_s: float) -> dict[str, Any]:
    events = sorted(tally.events)
    return {
        "connected": tally.connected,
        "failed": tally.failed,
        "errors": tally.errors,
        "overflows": tally.overflows,
        "resumed": tally.resumed,
        "events_total": sum(events),
        "events_per_client": {
            "min": events[0] if events else 0,
            "median": statistics.median(events) if events else 0,
            "max": events[-1] if events else 0,
        },
        "megabytes": round(tally.bytes / 1e6, 1),
        "probe_events": tally.probe_events,
        "probe_latency_ms": _latency(tally.probe_latencies),
        "read_latency_ms": _latency(tally.read_latencies),
        "probe_order_violations": tally.order_violations,
        "cpu_s": round(cpu_s, 2),
    }


# --- the benchmark ------------------------------------------------------------------


class _Clients:
    """The clients' child process, driven over its stdin and stdout."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, url: str, sse: SseOptions) -> _Clients:
        args = [sys.executable, "-m", "bench.sse", "--serve-clients", url]
        args += ["--clients", str(sse.clients), "--probes", str(sse.probes)]
        process = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, start_new_session=True
        )
        return cls(process)

    async def hear(self, timeout: float) -> dict[str, Any]:  # noqa: ASYNC109 - a deadline for the child's answer
        assert self.process.stdout is not None
        async with asyncio.timeout(timeout):
            line = await self.process.stdout.readline()
        if not line:
            raise BenchError(f"the SSE clients' process exited with {await self.process.wait()}")
        message: dict[str, Any] = orjson.loads(line)
        return message

    async def tell(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command.encode() + b"\n")
        await self.process.stdin.drain()

    async def stop(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


class _SseDrive(_Drive):
    """The order benchmark's driver with other phases: without clients, then with them."""

    def __init__(self, result: SseReport, children: Children, redis_url: str, api_url: str) -> None:
        super().__init__(result.report, children, redis_url)
        self.result = result
        self.api_url = api_url

    async def _phases(
        self,
        system: str,
        submit: Submitter,
        watcher: CompletionWatcher,
        *,
        open_loop_too: bool = True,
    ) -> None:
        options, sse = self.options, self.result.sse
        index = 0

        def loop(name: str, orders: int) -> Callable[[], Awaitable[PhaseResult]]:
            nonlocal index
            first, index = index, index + orders
            return lambda: closed_loop(
                name,
                submit,
                watcher,
                orders=orders,
                concurrency=options.concurrency,
                first_index=first,
                max_wait=options.timeout,
                stop=self.stop,
            )

        log.info("warm-up, %d orders", sse.warmup)
        warm = await loop("warm-up", sse.warmup)()
        self.raise_if_stopped()
        if warm.not_completed:
            raise BenchError(f"warm-up: {warm.not_completed} orders did not complete: {dict(warm.outcomes)}")
        pids = {c.name: c.pid for c in self.children.started}
        pids["bench"] = os.getpid()

        log.info("closed loop without SSE clients, %d orders", sse.orders)
        await self._measured(pids, False, loop("no SSE clients", sse.orders))

        url = f"{self.api_url}/v1/events" + (f"?{sse.query}" if sse.query else "")
        clients = await _Clients.start(url, sse)
        try:
            log.info("connecting %d SSE clients to %s", sse.clients, url)
            hello = await clients.hear(CONNECT_TIMEOUT_S)
            if hello["connected"] < sse.clients:
                raise BenchError(f"only {hello['connected']} of {sse.clients} SSE clients connected: {hello}")
            log.info("%d SSE clients connected in %.1fs", hello["connected"], hello["seconds"])
            await clients.tell("measure")
            await clients.hear(CONNECT_TIMEOUT_S)
            pids["sse-clients"] = clients.process.pid
            records = watcher.records
            log.info("closed loop with %d SSE clients, %d orders", sse.clients, sse.orders)
            profile = options.profile_dir is not None
            await self._measured(pids, profile, loop(f"{sse.clients} SSE clients", sse.orders))
            await self._settled(watcher)
            self.result.records = watcher.records - records
            await clients.tell("stop")
            self.result.clients = await clients.hear(CLIENT_STOP_TIMEOUT_S)
        finally:
            await clients.stop()

    async def _settled(self, watcher: CompletionWatcher) -> None:
        """Wait until no progress record came for a moment, so late lines reach the clients' count."""
        seen = -1
        while seen != watcher.records:
            seen = watcher.records
            await asyncio.sleep(0.5)


def run_sse(options: Options, sse: SseOptions) -> SseReport:
    """Start the deployment, measure both phases, stop everything."""
    result = SseReport(Report(options), sse)
    with (
        bench_environment(result.report, "streamsaga-bench-sse-") as (redis_url, log_dir),
        Children(log_dir) as children,
    ):
        api_url = _start_streamsaga(children, options, redis_url)
        drive = _SseDrive(result, children, redis_url, api_url)
        asyncio.run(drive.streamsaga(api_url, uuid.uuid4().hex[:8]))
    return result


# --- output -------------------------------------------------------------------------


def as_json(result: SseReport) -> dict[str, Any]:
    return {
        "sse": asdict(result.sse),
        "environment": result.report.environment,
        "phases": [phase.as_dict() for phase in result.report.phases],
        "progress_records": result.records,
        "clients": result.clients,
        "profiles": result.report.profiles,
    }


def as_text(result: SseReport) -> str:
    env, sse, clients = result.report.environment, result.sse, result.clients
    target = "/v1/events" + (f"?{sse.query}" if sse.query else "")
    lines = [
        f"SSE fan-out bench — {env.get('cpus')} CPUs, load average before {env.get('load_average_before')}, "
        f"after {env.get('load_average_after')}; {env.get('partitions')} partitions; "
        f"{sse.clients} clients on {target}",
        "",
        f"{'closed loop':<22} {'done':>6} {'not ok':>6} {'wf/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
        f"{'max ms':>8} {'controller CPU':>15}",
    ]
    phases = result.report.phases
    for phase in phases:
        lat = phase.latency_ms()
        cpu = phase.cpu_percent().get("controller", math.nan)
        lines.append(
            f"{phase.name:<22} {phase.completed:>6} {phase.not_completed:>6} {phase.throughput:>7.0f} "
            f"{lat['p50']:>8.1f} {lat['p95']:>8.1f} {lat['p99']:>8.1f} {lat['max']:>8.1f} {cpu:>14.0f}%"
        )
    if len(phases) == 2 and phases[0].throughput:
        change = phases[1].throughput / phases[0].throughput - 1
        p50 = phases[1].latency_ms()["p50"] - phases[0].latency_ms()["p50"]
        lines += ["", f"with the clients: throughput {change:+.0%}, end-to-end p50 {p50:+.1f} ms"]
    if clients:
        per = clients["events_per_client"]
        probe, read = clients["probe_latency_ms"], clients["read_latency_ms"]
        lines += [
            "",
            "SSE delivery latency, progress line `at` -> client receipt (ms):",
            f"  every event, {sse.probes} probe clients ({clients['probe_events']} events): "
            f"p50 {probe['p50']}  p95 {probe['p95']}  p99 {probe['p99']}  max {probe['max']}",
            f"  oldest event of each read, all {clients['connected']} clients: "
            f"p50 {read['p50']}  p95 {read['p95']}  p99 {read['p99']}  max {read['max']}",
            f"SSE delivered {clients['events_total']} events ({clients['megabytes']} MB); per client "
            f"min {per['min']} / median {per['median']} / max {per['max']}, of {result.records} progress records "
            f"written during the phase",
            f"overflows {clients['overflows']} (each resumed with Last-Event-ID), connection errors "
            f"{clients['errors']}, probe order violations {clients['probe_order_violations']}",
        ]
    if phases:
        last = phases[-1].cpu_percent()
        shown = ", ".join(f"{name} {value:.0f}%" for name, value in last.items() if name != "total")
        lines += ["", f"CPU during the phase with clients (% of one core): {shown}"]
    return "\n".join(lines)


# --- the command line ---------------------------------------------------------------


def parse(argv: list[str] | None = None) -> tuple[Options, SseOptions, argparse.Namespace]:
    defaults, sse_defaults = Options(), SseOptions()
    parser = argparse.ArgumentParser(
        prog="python -m bench.sse",
        description=(
            "Run the order benchmark's closed loop on the deployment `python -m bench` uses, first with no SSE "
            "client, then with --clients clients on GET /v1/events of the one controller (from a separate "
            "process); print throughput and end-to-end latency of both, and SSE delivery latency."
        ),
    )
    parser.add_argument("--serve-clients", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=sse_defaults.clients, help="SSE clients (default: %(default)s)")
    parser.add_argument(
        "--probes",
        type=int,
        default=sse_defaults.probes,
        help="of which this many parse and time every event (default: %(default)s)",
    )
    parser.add_argument(
        "--query",
        default=sse_defaults.query,
        metavar="QUERY",
        help="query string of /v1/events, e.g. 'status=completed,compensated,failed' (default: every line)",
    )
    parser.add_argument(
        "--orders", type=int, default=sse_defaults.orders, help="orders in each phase (default: %(default)s)"
    )
    parser.add_argument("--warmup", type=int, default=sse_defaults.warmup, help="warm-up orders (default: %(default)s)")
    parser.add_argument(
        "--concurrency", type=int, default=defaults.concurrency, help="closed-loop clients (default: %(default)s)"
    )
    parser.add_argument("--timeout", type=float, default=defaults.timeout, help="seconds a workflow may take")
    add_deployment_arguments(parser.add_argument_group("system under test"), defaults)
    add_output_arguments(parser.add_argument_group("output"), "the phase with clients")
    args = parser.parse_args(argv)
    if min(args.clients, args.orders, args.warmup, args.concurrency, args.partitions) < 1 or args.probes < 0:
        parser.error(
            "--clients, --orders, --warmup, --concurrency and --partitions must be positive, --probes not negative"
        )
    options = Options(
        concurrency=args.concurrency,
        partitions=args.partitions,
        redis_url=args.redis_url,
        cli=args.cli,
        timeout=args.timeout,
        log_dir=args.log_dir,
        profile_dir=args.profile,
        skip_baseline=True,
        skip_open_loop=True,
    )
    sse = SseOptions(
        clients=args.clients,
        probes=min(args.probes, args.clients),
        query=args.query.lstrip("?"),
        orders=args.orders,
        warmup=args.warmup,
    )
    return options, sse, args


def _enough_descriptors(wanted: int) -> None:
    """Raise the soft limit of open files (inherited by the children) to fit ``wanted``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < wanted:
            log.warning("open files limited to %d (hard limit); %d wanted", new, wanted)


def main(argv: list[str] | None = None) -> int:
    options, sse, args = parse(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    _enough_descriptors(2 * sse.clients + 1_024)
    if args.serve_clients:
        logging.getLogger().setLevel(logging.WARNING)
        asyncio.run(_serve_clients(args.serve_clients, sse.clients, sse.probes))
        return 0
    signal.signal(signal.SIGTERM, terminate_as_interrupt)
    collector.tune()  # as python -m bench does: the clients' parsing is another process, the driver is this one
    try:
        result = run_sse(options, sse)
    except (KeyboardInterrupt, Interrupted):
        print("interrupted; every process was stopped", file=sys.stderr)
        return 130
    except (BenchError, ChildFailed, RedisError, TimeoutError) as exc:
        print(f"bench failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(as_json(result), option=orjson.OPT_INDENT_2) + b"\n")
    else:
        print(as_text(result))
    return 2 if any(phase.not_completed for phase in result.report.phases) else 0


if __name__ == "__main__":
    sys.exit(main())
