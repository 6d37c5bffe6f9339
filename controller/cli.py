"""The ``streamsaga`` command: the only place that reads the environment and configures logging."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import textwrap
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from pydantic import ValidationError
from yarl import URL

from contracts.definitions import ORDER_SAGA
from controller.exit_status import ALL_EXIT_STATUS_HELP, EXIT_STATUS_HELP, ExitCode
from controller.settings import DEFAULT_REDIS_URL, REDIS_URL_ENV, ControllerSettings
from participants.sdk import collector, logs
from participants.sdk.connection import MAX_BLOCK_MS

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from controller.dead_letters import DeadLetter
    from participants.ledger import Ledger

log = logging.getLogger(__name__)
T = TypeVar("T")

API_ENV = "STREAMSAGA_API"
DEFAULT_API = "http://127.0.0.1:8080"
EXAMPLE_WORKERS = tuple(step.participant for step in ORDER_SAGA.steps)
# Worker defaults as the help text states them; tests/controller/test_cli.py pins them to WorkerSettings.
WORKER_DEFAULTS = {
    "concurrency": 64,
    "payment_limit": "1000.00",
    "default_stock": 100,
    "countries": "US,CA,GB,DE,FR,NL",
    "outcome_ttl_s": 604_800,
}


def _defaults() -> ControllerSettings:
    """The controller's defaults, for the options' defaults and help texts."""
    return ControllerSettings(consumer="-")


async def until_signalled(work: Callable[[asyncio.Event], Awaitable[T]]) -> T:
    """Run ``work(stop)`` with SIGINT and SIGTERM setting ``stop`` instead of killing the process."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        return await work(stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


# --- argument types ----------------------------------------------------------------


def _integer(text: str, minimum: int, below: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{below}: {text!r}")
    return value


def _positive(text: str) -> int:
    return _integer(text, 1, "must be positive")


def _non_negative(text: str) -> int:
    return _integer(text, 0, "must not be negative")


def _port(text: str) -> int:
    value = int(text) if text.isdigit() else -1
    if not 0 <= value <= 65_535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {text!r}")
    return value


def _money(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not an amount: {text!r}") from None
    if not value.is_finite() or value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative amount: {text!r}")
    return value


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _countries(text: str) -> tuple[str, ...]:
    codes = tuple(code.upper() for code in _names(text))
    bad = [code for code in codes if len(code) != 2 or not code.isalpha()]
    if bad:
        raise argparse.ArgumentTypeError(f"not ISO 3166-1 alpha-2 codes: {', '.join(bad)}")
    return codes


def _add_redis_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis-url",
        default=os.environ.get(REDIS_URL_ENV, DEFAULT_REDIS_URL),
        help=f"Redis to use (default: ${REDIS_URL_ENV}, else {DEFAULT_REDIS_URL})",
    )


def _add_partitions(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--partitions",
        type=_positive,
        default=_defaults().partitions,
        help="partitions of the deployment; every process must agree (default: %(default)s)",
    )


# --- controller --------------------------------------------------------------------


def _controller(args: argparse.Namespace) -> int:
    from controller.app import serve
    from controller.definitions import NoDefinitions

    try:
        settings = ControllerSettings(
            redis_url=args.redis_url,
            host=args.host,
            port=args.port,
            partitions=args.partitions,
            batch=args.batch,
            block_ms=args.block_ms,
            retention_s=args.retention_s,
            definitions_path=args.definitions,
            order_saga=not args.without_order_saga,
            claim_idle_ms=args.claim_idle_ms,
            max_deliveries=args.max_deliveries,
            timer_interval_s=args.timer_interval_s,
            retention_interval_s=args.retention_interval_s,
            stream_min_age_s=args.stream_min_age_s,
            liveness_grace_s=args.liveness_grace_s,
            liveness_forget_s=args.liveness_forget_s,
            progress_maxlen=args.progress_maxlen,
            sse_keepalive_s=args.sse_keepalive_s,
            sse_buffer_events=args.sse_buffer_events,
            instance_cache_size=args.instance_cache_size,
            access_log=args.access_log,
            **({"consumer": args.consumer} if args.consumer else {}),
        )
    except ValueError as exc:
        print(f"streamsaga controller: {exc}", file=sys.stderr)
        return 2
    try:
        collector.tune()
        asyncio.run(until_signalled(lambda stop: serve(settings, stop)))
    except (ValidationError, orjson.JSONDecodeError, NoDefinitions) as exc:
        print(f"streamsaga controller: invalid workflow definitions in {args.definitions}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"streamsaga controller: {exc}", file=sys.stderr)
        return 1
    return 0


def _controller_parser(sub: Any) -> None:
    d = _defaults()
    p = sub.add_parser("controller", help="run the controller: HTTP API and correlator", description=(
        "Serve the HTTP API and correlate events into workflow state until SIGINT or SIGTERM, "
        "then stop gracefully."
    ))  # fmt: skip
    _add_redis_url(p)
    p.add_argument("--host", default=d.host, help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=_port, default=d.port, help="port to listen on (default: %(default)s)")
    _add_partitions(p)
    p.add_argument("--consumer", help="consumer name in the controller group (default: HOSTNAME-PID)")
    p.add_argument(
        "--definitions",
        type=Path,
        metavar="FILE",
        help="JSON file with a list of workflow definitions, loaded besides the built-in order saga",
    )
    p.add_argument(
        "--without-order-saga",
        action="store_true",
        help="run only the --definitions file's workflows, not the built-in order saga: POST /v1/orders "
        "answers 404, no step of it is reported uncovered, and events of order workflows already running "
        "are dead-lettered (no workflow definition)",
    )
    p.add_argument("--batch", type=_positive, default=d.batch, help="entries per read (default: %(default)s)")
    p.add_argument(
        "--block-ms",
        type=_positive,
        default=d.block_ms,
        help=f"longest blocking read, ms, at most {MAX_BLOCK_MS} (default: %(default)s)",
    )
    p.add_argument(
        "--retention-s",
        type=_positive,
        default=d.retention_s,
        help="seconds a finished workflow is kept (default: %(default)s)",
    )
    p.add_argument(
        "--claim-idle-ms",
        type=_positive,
        default=d.claim_idle_ms,
        help="take over a dead peer's entries idle this long, ms (default: %(default)s)",
    )
    p.add_argument(
        "--max-deliveries",
        type=_positive,
        default=d.max_deliveries,
        help="dead-letter an entry after this many deliveries (default: %(default)s)",
    )
    tuning = [
        ("--timer-interval-s", "timer_interval_s", "how often due deadlines are fired, s"),
        ("--retention-interval-s", "retention_interval_s", "how often streams are trimmed, s"),
        ("--stream-min-age-s", "stream_min_age_s", "never trim stream entries younger than this, s"),
        (
            "--liveness-grace-s",
            "liveness_grace_s",
            "wait this long for workers before warning about uncovered steps, s",
        ),
        ("--liveness-forget-s", "liveness_forget_s", "forget a dead worker's heartbeat after this long, s"),
        ("--sse-keepalive-s", "sse_keepalive_s", "keep-alive comment on an idle SSE stream after this long, s"),
    ]
    for flag, name, meaning in tuning:
        p.add_argument(flag, type=_seconds, default=getattr(d, name), help=f"{meaning} (default: %(default)s)")
    p.add_argument(
        "--progress-maxlen",
        type=_positive,
        default=d.progress_maxlen,
        metavar="N",
        help="progress records kept per partition for live views to resume from, about 380 bytes each "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--sse-buffer-events",
        type=_positive,
        default=d.sse_buffer_events,
        help="events an SSE client may fall behind before it is cut off (default: %(default)s)",
    )
    p.add_argument(
        "--instance-cache-size",
        type=_non_negative,
        default=d.instance_cache_size,
        metavar="N",
        help="workflow instances kept in memory after a commit, so the next event needs no read; "
        "0 reads every time (default: %(default)s)",
    )
    p.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=d.access_log,
        help="log a line per HTTP request at INFO (default: off)",
    )
    p.set_defaults(run=_controller)


# --- worker ------------------------------------------------------------------------


def _worker(args: argparse.Namespace) -> int:
    from participants.workers import WORKER_NAMES, WorkerSettings, run_worker

    if args.name not in WORKER_NAMES:
        print(f"streamsaga worker: unknown worker {args.name!r}; one of {', '.join(WORKER_NAMES)}", file=sys.stderr)
        return 2
    given = {
        "redis_url": args.redis_url,
        "partitions": args.partitions,
        "consumer": args.consumer,
        "concurrency": args.concurrency,
        "payment_limit": args.payment_limit,
        "default_stock": args.default_stock,
        "countries": args.countries,
        "notify_fail_customers": args.notify_fail_customers,
        "refund_fail_customers": args.refund_fail_customers,
        "outcome_ttl_s": args.outcome_ttl_s,
        "metrics_port": args.metrics_port,
        "metrics_host": args.metrics_host,
    }
    settings = WorkerSettings(**{name: value for name, value in given.items() if value is not None})
    collector.tune()
    asyncio.run(until_signalled(lambda stop: run_worker(args.name, settings, stop)))
    return 0


def _worker_parser(sub: Any) -> None:
    p = sub.add_parser("worker", help="run one example participant", description=(
        "Run one of the example participants until SIGINT or SIGTERM, then drain and stop. "
        "Each setting applies to the worker it concerns and is ignored by the others."
    ))  # fmt: skip
    p.add_argument("name", metavar="NAME", help=f"the worker: {', '.join(EXAMPLE_WORKERS)}")
    _add_redis_url(p)
    _add_partitions(p)
    p.add_argument("--consumer", help="consumer name in the worker's group (default: HOSTNAME-PID)")
    p.add_argument(
        "--concurrency",
        type=_positive,
        help=f"messages handled at once (default: {WORKER_DEFAULTS['concurrency']})",
    )
    p.add_argument(
        "--payment-limit",
        type=_money,
        metavar="AMOUNT",
        help=f"payment declines an order whose total exceeds this (default: {WORKER_DEFAULTS['payment_limit']})",
    )
    p.add_argument(
        "--default-stock",
        type=int,
        metavar="N",
        help=f"inventory's stock of a SKU it has not seen (default: {WORKER_DEFAULTS['default_stock']})",
    )
    p.add_argument(
        "--countries",
        type=_countries,
        metavar="CC,CC,...",
        help=f"countries shipping delivers to (default: {WORKER_DEFAULTS['countries']})",
    )
    p.add_argument(
        "--notify-fail-customers",
        type=_names,
        metavar="ID,ID,...",
        help="customer ids whose notification fails, to exercise a non-critical failure (default: none)",
    )
    p.add_argument(
        "--refund-fail-customers",
        type=_names,
        metavar="ID,ID,...",
        help="customer ids whose refund fails, to exercise a compensation that needs attention (default: none)",
    )
    p.add_argument(
        "--outcome-ttl-s",
        type=_positive,
        metavar="S",
        help="seconds the record of a handled message is kept: a redelivery within it is not handled again "
        f"(default: {WORKER_DEFAULTS['outcome_ttl_s']})",
    )
    p.add_argument(
        "--metrics-port",
        type=_port,
        metavar="PORT",
        help="serve Prometheus metrics of the handlers at http://HOST:PORT/metrics (default: 0, off)",
    )
    p.add_argument("--metrics-host", metavar="HOST", help="address of the metrics endpoint (default: 127.0.0.1)")
    p.set_defaults(run=_worker)


# --- submit ------------------------------------------------------------------------


async def _post(url: str, body: bytes, command: str, headers: dict[str, str] | None = None) -> _Posted | None:
    """POST a JSON body to the API; None (after saying why on standard error) if it refused
    or could not be reached."""
    import aiohttp

    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, data=body, headers={"Content-Type": "application/json", **(headers or {})}) as response,
        ):
            text = await response.text()
            if response.status >= 400:
                _print_problem(response.status, text, command)
                return None
            return _Posted(orjson.loads(text), response.url, dict(response.headers))
    except aiohttp.ClientError as exc:
        print(f"streamsaga {command}: cannot reach the API at {url}: {exc}", file=sys.stderr)
        return None


@dataclass(frozen=True)
class _Posted:
    body: Any
    url: URL
    headers: dict[str, str]


async def _start(url: str, body: bytes, idempotency_key: str | None) -> tuple[int, str | None]:
    """POST a start request; (exit status, the workflow id if it was accepted)."""
    posted = await _post(url, body, "submit", {"Idempotency-Key": idempotency_key} if idempotency_key else None)
    if posted is None:
        return 1, None
    location = posted.headers.get("Location", "")
    print(posted.body["workflow_id"])
    print(f"Location: {posted.url.join(URL(location)) if location else '-'}")
    if posted.headers.get("Idempotent-Replayed") == "true":
        print("(replayed: this Idempotency-Key was used before with the same body)", file=sys.stderr)
    sys.stdout.flush()  # before a --watch view takes over standard output
    return 0, str(posted.body["workflow_id"])


def _print_problem(status: int, text: str, command: str) -> None:
    from controller.event_source import problem_of

    problem = {"title": "error", **problem_of(text)}
    print(f"streamsaga {command}: {status} {problem.get('title', '')}: {problem.get('detail', '')}", file=sys.stderr)
    for error in problem.get("errors") or []:
        print(f"  {error.get('field')}: {error.get('message')}", file=sys.stderr)


def _submit(args: argparse.Namespace) -> int:
    try:
        body = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    except OSError as exc:
        print(f"streamsaga submit: {exc}", file=sys.stderr)
        return 1
    path = "/v1/orders" if args.workflow is None else f"/v1/workflows/{args.workflow}"
    status, workflow_id = asyncio.run(_start(args.api.rstrip("/") + path, body, args.idempotency_key))
    if status or not args.watch or workflow_id is None:
        return status
    return _watch_run(args, workflow_id)


def _submit_parser(sub: Any) -> None:
    p = sub.add_parser("submit", help="start a workflow from a JSON file", description=textwrap.fill(
        "POST a JSON body to the API: an order (POST /v1/orders) or, with --workflow, the start payload "
        "of any workflow.  Prints the workflow id, then its Location; exits 1 with the problem's detail "
        "if the API rejects it.  With --watch it then follows the workflow like `streamsaga watch ID` "
        "and exits with the status that states its outcome."
    ), epilog="with --watch, " + EXIT_STATUS_HELP, formatter_class=_RAW)  # fmt: skip
    p.add_argument("file", metavar="FILE", help="JSON file to send, or - for standard input")
    _add_api(p)
    p.add_argument("--idempotency-key", metavar="KEY", help="send this Idempotency-Key header")
    p.add_argument("--workflow", metavar="NAME", help="start workflow NAME instead of an order")
    _add_then_watch(p)
    p.set_defaults(run=_submit)


# --- cancel, retry --------------------------------------------------------------------


async def _operator_post(url: str, body: bytes, command: str) -> int:
    """POST an operator's request; prints the workflow's status after it, or the problem (exit 1)."""
    posted = await _post(url, body, command)
    if posted is None:
        return 1
    print(f"{posted.body['workflow_id']} {posted.body['status']}")
    sys.stdout.flush()  # before a --watch view takes over standard output
    return 0


def _operator(args: argparse.Namespace) -> int:
    body = orjson.dumps({key: value for key, value in (("by", args.by), ("reason", args.reason)) if value})
    url = f"{args.api.rstrip('/')}/v1/workflows/{args.id}/{args.command}"
    status = asyncio.run(_operator_post(url, body, args.command))
    if status or not args.watch:
        return status
    return _watch_run(args, args.id)


def _operator_parsers(sub: Any) -> None:
    what = {
        "cancel": (
            "cancel a running workflow",
            "Ask the controller to cancel a running workflow (POST /v1/workflows/ID/cancel): it compensates "
            "what completed, last step first, once the steps already triggered have answered or timed out.",
        ),
        "retry": (
            "retry the compensation of a workflow that needs attention",
            "Ask the controller to resume the compensation of a workflow that needs attention "
            "(POST /v1/workflows/ID/retry), each compensation that gave up with a fresh count of attempts.",
        ),
    }
    for command, (summary, description) in what.items():
        p = sub.add_parser(command, help=summary, description=textwrap.fill(
            f"{description}  Prints the workflow id and its status after the request; exits 1 with the "
            "problem's detail if the API refuses it (404: no such workflow, 409: not in a state that allows "
            "it).  With --watch it then follows the workflow like `streamsaga watch ID`."
        ), epilog="with --watch, " + EXIT_STATUS_HELP, formatter_class=_RAW)  # fmt: skip
        p.add_argument("id", metavar="ID", help="the workflow id")
        _add_api(p)
        p.add_argument("--by", metavar="NAME", help="who asks, recorded in the history (default: the API's own)")
        p.add_argument("--reason", metavar="TEXT", help="why, recorded in the history")
        _add_then_watch(p)
        p.set_defaults(run=_operator)


# --- watch -------------------------------------------------------------------------

_RAW = argparse.RawDescriptionHelpFormatter  # descriptions are filled by hand, epilogs are tables


def _add_api(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api",
        default=os.environ.get(API_ENV, DEFAULT_API),
        help=f"base URL of the API (default: ${API_ENV}, else {DEFAULT_API})",
    )


def _add_then_watch(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--watch", action="store_true", help="then follow the workflow to its outcome, live")
    _add_watch_options(parser)


def _add_watch_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout", type=_seconds, metavar="SECONDS", help="give up after SECONDS (exit 6; watch --all exits 0)"
    )
    parser.add_argument(
        "--until-terminal",
        action="store_true",
        help="do not stop at needs_attention: wait for completed, compensated or failed",
    )
    parser.add_argument(
        "--plain", action="store_true", help="print one line per event even on a terminal (the default elsewhere)"
    )


def _watch_run(args: argparse.Namespace, workflow_id: str | None) -> int:
    """Watch ``workflow_id`` (``None``: every workflow) until the outcome, a signal or --timeout."""
    from rich.console import Console

    from controller import watch

    console = Console()  # standard output; a live view only if it is a terminal

    async def work(stop: asyncio.Event) -> int:
        async with watch.client_session() as session:
            api = watch.ApiClient(session, args.api)
            if workflow_id is None:
                return await watch.watch_all(api, console, stop, plain=args.plain, timeout=args.timeout)
            following = watch.watch_workflow(
                api, workflow_id, console, until_terminal=args.until_terminal, plain=args.plain, timeout=args.timeout
            )
            return await watch.until_stopped(following, stop)

    return asyncio.run(until_signalled(work))


def _watch(args: argparse.Namespace) -> int:
    if (args.id is not None) == args.all:
        args.parser.error("give a workflow ID or --all, not both" if args.all else "give a workflow ID or --all")
    if args.all and args.until_terminal:
        args.parser.error("--until-terminal applies to one workflow, not to --all")
    return _watch_run(args, args.id)


def _watch_parser(sub: Any) -> None:
    p = sub.add_parser("watch", help="follow a workflow (or every one) live", description=textwrap.fill(
        "Follow workflow ID: a timeline of its steps — status, when each started, how long it took, the "
        "deadline it runs against, compensations and attempts — updated as events arrive, until its "
        "outcome, which the exit status states.  With --all: the in-flight workflows (definition, status, "
        "current step, age) and how many workflows are in each status, live.  On a terminal this is a live "
        "view; elsewhere (a pipe, CI) or with --plain, one line per event."
    ), epilog=f"{EXIT_STATUS_HELP}\n{ALL_EXIT_STATUS_HELP}", formatter_class=_RAW)  # fmt: skip
    p.add_argument("id", nargs="?", metavar="ID", help="the workflow to follow")
    p.add_argument("--all", action="store_true", help="watch every workflow instead of one")
    _add_api(p)
    _add_watch_options(p)
    p.set_defaults(run=_watch, parser=p)


# --- contracts ---------------------------------------------------------------------


def _contracts_export(args: argparse.Namespace) -> int:
    from contracts.schema import file_name, schemas

    found = schemas()
    if args.out is None:
        sys.stdout.write(orjson.dumps(found, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, schema in found.items():
        (args.out / file_name(name)).write_bytes(orjson.dumps(schema, option=orjson.OPT_INDENT_2) + b"\n")
    print(f"wrote {len(found)} JSON Schemas to {args.out}")
    return 0


def _contracts_parser(sub: Any) -> None:
    p = sub.add_parser("contracts", help="the wire contract as JSON Schema")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    export = actions.add_parser("export", help="export the JSON Schemas", description=(
        "Export the JSON Schemas of the envelope, every payload type, the order body and workflow "
        "definitions: one NAME.json file each into --out, or all as one JSON object on standard output."
    ))  # fmt: skip
    export.add_argument("--out", type=Path, metavar="DIR", help="directory to write one file per schema into")
    export.set_defaults(run=_contracts_export)


# --- ledger ------------------------------------------------------------------------


async def read_settled_ledger(redis_url: str, partitions: int, name: str) -> Ledger:
    """The example workers' ledger, each order beside its workflow's status (see ``Ledger.settle``)."""
    from controller.store import WorkflowStore
    from participants.ledger import read_ledger
    from participants.sdk.connection import connect

    redis = connect(redis_url, name=name)
    try:
        ledger = await read_ledger(redis)
        ledger.settle(await WorkflowStore(redis, partitions).statuses(o.workflow_id for o in ledger.orders))
        return ledger
    finally:
        await redis.aclose()


def _ledger(args: argparse.Namespace) -> int:
    from redis.exceptions import RedisError

    from participants.ledger import format_ledger

    try:
        ledger = asyncio.run(read_settled_ledger(args.redis_url, args.partitions, "streamsaga-ledger"))
    except (RedisError, OSError) as exc:
        print(f"streamsaga ledger: cannot use Redis at {args.redis_url}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        shown = {
            **ledger.model_dump(mode="json"),
            "net_cents": ledger.net_cents,
            "mismatches": {o.workflow_id: o.mismatch for o in ledger.mismatches},
            "unsettled": ledger.unsettled,
            "balanced": ledger.balanced,
        }
        print(orjson.dumps(shown, option=orjson.OPT_INDENT_2).decode())
    else:
        print(format_ledger(ledger))
    return 0 if ledger.balanced else 1


def _ledger_parser(sub: Any) -> None:
    p = sub.add_parser("ledger", help="show the example workers' ledgers", description=(
        "Show what the example workers recorded — payments and refunds, reservations and releases, "
        "shipments and cancellations — beside each workflow's status, and whether they balance (exit 1 if "
        "they do not, 2 if Redis cannot be read): stock is conserved, nothing is refunded beyond its "
        "capture, a completed order kept everything and a failed or compensated one kept nothing.  Run it "
        "once no workflow is running: an order whose late completion has not reached the controller yet "
        "shows as not balancing.  --partitions must be the deployment's, or no workflow is found and no "
        "order is checked (the count is shown)."
    ))  # fmt: skip
    _add_redis_url(p)
    _add_partitions(p)
    p.add_argument("--json", action="store_true", help="print the ledger as JSON")
    p.set_defaults(run=_ledger)


# --- dlq ---------------------------------------------------------------------------

REASON_WIDTH = 72


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a non-negative number of seconds: {text!r}")
    return value


def _dlq_fail(args: argparse.Namespace, message: str) -> None:
    print(f"streamsaga dlq {args.action}: {message}", file=sys.stderr)


def _with_redis(args: argparse.Namespace, work: Callable[[Redis], Awaitable[int]]) -> int:
    """Run ``work(redis)`` on a client of ``--redis-url``; exit 1 if Redis cannot be used."""
    from redis.exceptions import RedisError

    from participants.sdk.connection import connect

    async def run() -> int:
        redis = connect(args.redis_url, name=f"streamsaga-dlq-{args.action}")
        try:
            return await work(redis)
        finally:
            await redis.aclose()

    try:
        return asyncio.run(run())
    except BrokenPipeError:
        raise  # our reader left (`dlq list | head`), not Redis: see main()
    except (RedisError, OSError) as exc:
        _dlq_fail(args, f"cannot use Redis at {args.redis_url}: {exc}")
        return 1


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_dead_letters(letters: Sequence[DeadLetter]) -> str:
    """Dead letters as a table, one line each; the reason shortened to fit."""
    from participants.ledger import text_table

    header = ["ID", "FAILED AT (UTC)", "TRIES", "GROUP", "TYPE", "WORKFLOW", "REASON"]
    rows = [
        [
            letter.id,
            _when(letter.failed_at),
            str(letter.deliveries),
            letter.group or "-",
            letter.type or "-",
            letter.correlation_id or "-",
            _shorten(letter.reason, REASON_WIDTH),
        ]
        for letter in letters
    ]
    return "\n".join(text_table(header, rows, right={2}))


def format_dead_letter(letter: DeadLetter) -> str:
    """One dead letter in full: where it came from, why, and its original fields."""
    lines = [
        f"id:           {letter.id}",
        f"reason:       {letter.reason}",
        f"type:         {letter.type or '-'}",
        f"workflow:     {letter.correlation_id or '-'}",
        f"message id:   {letter.message_id or '-'}",
        f"source:       {letter.source_stream} entry {letter.source_id}",
        f"given up by:  group {letter.group}, consumer {letter.consumer}",
        f"deliveries:   {letter.deliveries}",
        f"failed at:    {_when(letter.failed_at)} UTC",
        "original fields:" if letter.fields else "original fields: (none)",
    ]
    for name, value in letter.fields.items():
        lines.append(f"  {name}: {_pretty_json(value)}")
    return "\n".join(lines)


def _pretty_json(value: str) -> str:
    """A JSON object or array indented under its field name; anything else as is."""
    if not value.startswith(("{", "[")):
        return value
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError:
        return value
    return orjson.dumps(parsed, option=orjson.OPT_INDENT_2).decode().replace("\n", "\n  ")


def _dlq_json(data: Any) -> None:
    print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


def _dlq_list(args: argparse.Namespace) -> int:
    from controller import dead_letters

    async def work(redis: Redis) -> int:
        found = await dead_letters.list_dead_letters(
            redis, args.partitions, limit=args.limit, group=args.group, type=args.type, workflow_id=args.workflow
        )
        if args.json:
            _dlq_json({"dead_letters": [letter.model_dump(mode="json") for letter in found]})
        elif not found:
            filtered = args.group or args.type or args.workflow
            print("no dead letters" + (" match" if filtered else ""))
        else:
            print(format_dead_letters(found))
            if len(found) == args.limit:
                print(f"(the newest {args.limit}; --limit shows more)", file=sys.stderr)
        return 0

    return _with_redis(args, work)


def _dlq_show(args: argparse.Namespace) -> int:
    from controller import dead_letters

    try:
        dead_letters.DeadLetterId.parse(args.id)
    except dead_letters.InvalidDeadLetterId as exc:
        _dlq_fail(args, str(exc))
        return 2

    async def work(redis: Redis) -> int:
        letter = await dead_letters.get(redis, args.id)
        if letter is None:
            _dlq_fail(args, str(dead_letters.NoSuchDeadLetter(args.id)))
            return 1
        if args.json:
            _dlq_json(letter.model_dump(mode="json"))
        else:
            print(format_dead_letter(letter))
        return 0

    return _with_redis(args, work)


def _dlq_replay(args: argparse.Namespace) -> int:
    from controller import dead_letters
    from participants.sdk.commit import CommitScript

    try:
        for dead_letter_id in args.ids:
            dead_letters.DeadLetterId.parse(dead_letter_id)
    except dead_letters.InvalidDeadLetterId as exc:
        _dlq_fail(args, f"{exc}; nothing replayed")
        return 2

    async def work(redis: Redis) -> int:
        script = CommitScript()
        failed = 0
        letters: list[dead_letters.DeadLetter] = []
        for dead_letter_id in dict.fromkeys(args.ids):
            letter = await dead_letters.get(redis, dead_letter_id)
            if letter is None:
                _dlq_fail(args, str(dead_letters.NoSuchDeadLetter(dead_letter_id)))
                failed += 1
            else:
                letters.append(letter)
        # in the order the messages first came, whatever order the ids were given in (`dlq list`
        # shows the newest first): a workflow's timer replayed before the events it raced
        # would time out a step whose completion is only replayed after it
        for letter in sorted(letters, key=_first_came):
            try:
                entry_id = await dead_letters.replay_letter(redis, letter, partitions=args.partitions, script=script)
            except dead_letters.NotReplayable as exc:
                _dlq_fail(args, str(exc))
                failed += 1
                continue
            print(f"replayed {letter.id} to {letter.source_stream} as {entry_id}")
        return 1 if failed else 0

    return _with_redis(args, work)


def _first_came(letter: DeadLetter) -> tuple[int, int]:
    """When a dead letter's message first came: its source entry's id, or when that is missing
    or unreadable (a letter written by hand), the dead letter's own."""
    from participants.sdk.consumer import entry_order

    try:
        return entry_order(letter.source_id)
    except ValueError:
        return entry_order(letter.entry_id)


def _dlq_purge(args: argparse.Namespace) -> int:
    from controller import dead_letters

    given = {"--all": args.all, "ID": bool(args.ids), "--older-than": args.older_than is not None}
    chosen = [name for name, on in given.items() if on]
    if len(chosen) != 1:
        but = f", not {' and '.join(chosen)}" if chosen else ""
        _dlq_fail(args, f"give exactly one of --all, IDs or --older-than{but}")
        return 2
    try:
        for dead_letter_id in args.ids:
            dead_letters.DeadLetterId.parse(dead_letter_id)
    except dead_letters.InvalidDeadLetterId as exc:
        _dlq_fail(args, f"{exc}; nothing purged")
        return 2
    if args.all:
        what = f"every dead letter of {args.partitions} partitions"
    elif args.ids:
        count = len(set(args.ids))
        what = f"{count} dead letter{'s' if count > 1 else ''}"
    else:
        what = f"every dead letter older than {args.older_than:g}s"
    if not args.yes:
        if not sys.stdin.isatty():
            _dlq_fail(args, f"refusing to purge {what} without --yes (standard input is not a terminal)")
            return 2
        try:
            answer = input(f"Purge {what} from {args.redis_url}? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            _dlq_fail(args, "nothing purged")
            return 1
    older_than_ms = None if args.older_than is None else round(args.older_than * 1000)

    async def work(redis: Redis) -> int:
        purged = await dead_letters.purge(redis, args.partitions, ids=args.ids or None, older_than_ms=older_than_ms)
        print(f"purged {purged} dead letter{'' if purged == 1 else 's'}")
        return 0

    return _with_redis(args, work)


def _dlq_common(parser: argparse.ArgumentParser) -> None:
    _add_redis_url(parser)
    _add_partitions(parser)


def _dlq_parser(sub: Any) -> None:
    p = sub.add_parser("dlq", help="inspect, replay and purge dead letters", description=(
        "Dead letters are messages a consumer (the controller or a worker) could not handle: undecodable, "
        "on the wrong stream, an invalid payload, no such workflow, or a handler that kept failing. Each "
        "partition keeps them in its dead-letter stream with the reason, the original fields and the "
        "delivery count. An ID is <partition>-<entry id>, e.g. 7-1795292530341-0. See docs/operations.md."
    ))  # fmt: skip
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    listing = actions.add_parser("list", help="list dead letters, newest first", description=(
        "List the newest dead letters of every partition, newest first, one line each."
    ))  # fmt: skip
    _dlq_common(listing)
    listing.add_argument(
        "--limit", type=_positive, default=100, metavar="N", help="show at most N (default: %(default)s)"
    )
    listing.add_argument("--group", metavar="G", help="only those given up by consumer group G (controller, payment…)")
    listing.add_argument("--type", metavar="T", help="only messages of type T")
    listing.add_argument("--workflow", metavar="ID", help="only messages of workflow ID (their correlation id)")
    listing.add_argument(
        "--json", action="store_true", help='print {"dead_letters": [...]} as JSON: the API\'s fields but its links'
    )
    listing.set_defaults(run=_dlq_list)

    show = actions.add_parser("show", help="show one dead letter in full", description=(
        "Show one dead letter: the reason, where it was, who gave up after how many deliveries, and "
        "every original field (the envelope pretty-printed). Exits 1 if there is no such dead letter."
    ))  # fmt: skip
    _dlq_common(show)
    show.add_argument("id", metavar="ID", help="the dead letter's id")
    show.add_argument("--json", action="store_true", help="print it as JSON: the API's fields but its links")
    show.set_defaults(run=_dlq_show)

    replay = actions.add_parser("replay", help="send dead letters back to their streams", description=(
        "Write each dead letter's original fields back to the stream it came from and delete it, atomically, "
        "so every group reading that stream gets it again (consumers that already handled its message_id "
        "skip it). Fix the cause first. A dead letter whose fields could not stand on that stream "
        "(say an undecodable entry) is refused. Several IDs are replayed in the order their messages "
        "first came, oldest first, whatever order they are given in. Exits 1 if any ID could not be "
        "replayed."
    ))  # fmt: skip
    _dlq_common(replay)
    replay.add_argument("ids", nargs="+", metavar="ID", help="dead letters to replay")
    replay.set_defaults(run=_dlq_replay)

    purge = actions.add_parser("purge", help="delete dead letters", description=(
        "Delete dead letters for good: every one (--all), the given IDs, or those older than SECONDS. "
        "Without --yes it asks for confirmation when standard input is a terminal, and refuses otherwise."
    ))  # fmt: skip
    _dlq_common(purge)
    purge.add_argument("ids", nargs="*", metavar="ID", help="dead letters to delete")
    purge.add_argument("--all", action="store_true", help="delete every dead letter of every partition")
    purge.add_argument(
        "--older-than", type=_seconds, metavar="SECONDS", help="delete those that arrived longer ago than this"
    )
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    purge.set_defaults(run=_dlq_purge)


# --- dev ---------------------------------------------------------------------------


def _dev(args: argparse.Namespace) -> int:
    from controller.dev import DevOptions, run_dev

    options = DevOptions(
        redis_url=args.redis_url,
        port=args.port,
        partitions=args.partitions,
        data_dir=args.data_dir,
        exit_when_done=args.exit_when_done,
        timeout_s=args.timeout,
        log_level=args.log_level,
        log_format=args.log_format,
    )
    return asyncio.run(run_dev(options))


def _dev_parser(sub: Any) -> None:
    p = sub.add_parser("dev", help="run everything locally with sample orders", description=(
        "Start Redis (an embedded server under DATA_DIR/redis unless --redis-url or $STREAMSAGA_REDIS_URL "
        "is given), the controller and the four example workers as child processes (their logs go to "
        "DATA_DIR/logs, begun afresh each run), submit sample orders that complete, fail and compensate, "
        "show their progress live, print the ledger, and keep running until Ctrl-C, saying how to point "
        "the other commands at it.  Stopping stops every child and the embedded Redis."
    ))  # fmt: skip
    p.add_argument(
        "--redis-url",
        default=os.environ.get(REDIS_URL_ENV),
        help=f"use this Redis instead of an embedded one (default: ${REDIS_URL_ENV}, else embedded)",
    )
    p.add_argument("--port", type=_port, default=_defaults().port, help="port of the API (default: %(default)s)")
    _add_partitions(p)
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".streamsaga"),
        help="where the embedded Redis keeps its data and the children their logs (default: %(default)s)",
    )
    p.add_argument(
        "--exit-when-done",
        action="store_true",
        help="stop once the samples finish; exit 0 only if each reached its expected outcome",
    )
    p.add_argument(
        "--timeout",
        type=_positive,
        default=60,
        metavar="S",
        help="seconds to wait for the API to be ready and for the samples to finish (default: %(default)s)",
    )
    p.set_defaults(run=_dev)


# --- entry point -------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamsaga",
        description="Front-controller hybrid sagas on Redis Streams.",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (default: %(default)s)",
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=logs.LOG_FORMATS,
        help="log lines as readable text or as one JSON object each (default: %(default)s)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _dev_parser,
        _controller_parser,
        _worker_parser,
        _submit_parser,
        _operator_parsers,
        _watch_parser,
        _contracts_parser,
        _ledger_parser,
        _dlq_parser,
        _bench_parser,
    ):
        add(sub)
    return parser


def _bench_parser(sub: Any) -> None:
    # every argument after `bench`, --help included, is the benchmark's own (bench/__main__.py)
    p = sub.add_parser(
        "bench",
        add_help=False,
        help="measure throughput and latency against a bare-Redis baseline (`streamsaga bench --help`)",
    )
    p.set_defaults(run=_bench, passes_arguments_on=True)


def _bench(args: argparse.Namespace) -> int:
    from bench.__main__ import main as bench

    return bench(args.passed_on, prog="streamsaga bench")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``streamsaga``; returns the exit status."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "passes_arguments_on", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.passed_on = unknown
    # every process's log lines carry the correlation id, step and attempt (see participants.sdk.logs)
    logs.configure_logging(args.log_level, args.log_format)
    try:
        result: int = args.run(args)
    except BrokenPipeError:
        # whoever read our output stopped (`streamsaga watch ID | head`): end quietly, and keep
        # the interpreter's own flush at exit from failing the same way
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return int(ExitCode.ERROR)
    return result
