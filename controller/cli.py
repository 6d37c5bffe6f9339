"""The ``streamsaga`` command: the only place that reads the environment and configures logging."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError
from yarl import URL

from contracts.definitions import ORDER_SAGA
from controller.settings import DEFAULT_REDIS_URL, REDIS_URL_ENV, ControllerSettings

log = logging.getLogger(__name__)

API_ENV = "STREAMSAGA_API"
DEFAULT_API = "http://127.0.0.1:8080"
EXAMPLE_WORKERS = tuple(step.participant for step in ORDER_SAGA.steps)
# Worker defaults as the help text states them; tests/controller/test_cli.py pins them to WorkerSettings.
WORKER_DEFAULTS = {
    "concurrency": 64,
    "payment_limit": "1000.00",
    "default_stock": 100,
    "countries": "US,CA,GB,DE,FR,NL",
}


def _defaults() -> ControllerSettings:
    """The controller's defaults, for the options' defaults and help texts."""
    return ControllerSettings(consumer="-")


async def until_signalled(work: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``work(stop)`` with SIGINT and SIGTERM setting ``stop`` instead of killing the process."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await work(stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


# --- argument types ----------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


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
            claim_idle_ms=args.claim_idle_ms,
            max_deliveries=args.max_deliveries,
            **({"consumer": args.consumer} if args.consumer else {}),
        )
    except ValueError as exc:
        print(f"streamsaga controller: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(until_signalled(lambda stop: serve(settings, stop)))
    except (ValidationError, orjson.JSONDecodeError) as exc:
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
    p.add_argument("--batch", type=_positive, default=d.batch, help="entries per read (default: %(default)s)")
    p.add_argument(
        "--block-ms", type=_positive, default=d.block_ms, help="longest blocking read, ms (default: %(default)s)"
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
    }
    settings = WorkerSettings(**{name: value for name, value in given.items() if value is not None})
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
    p.set_defaults(run=_worker)


# --- submit ------------------------------------------------------------------------


async def _post(url: str, body: bytes, idempotency_key: str | None) -> int:
    import aiohttp

    headers = {"Content-Type": "application/json"}
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    try:
        async with aiohttp.ClientSession() as session, session.post(url, data=body, headers=headers) as response:
            text = await response.text()
            if response.status >= 400:
                _print_problem(response.status, text)
                return 1
            accepted = orjson.loads(text)
            location = response.headers.get("Location", "")
            print(accepted["workflow_id"])
            print(f"Location: {response.url.join(URL(location)) if location else '-'}")
            if response.headers.get("Idempotent-Replayed") == "true":
                print("(replayed: this Idempotency-Key was used before with the same body)", file=sys.stderr)
            return 0
    except aiohttp.ClientError as exc:
        print(f"streamsaga submit: cannot reach the API at {url}: {exc}", file=sys.stderr)
        return 1


def _print_problem(status: int, text: str) -> None:
    try:
        problem = orjson.loads(text)
    except orjson.JSONDecodeError:
        problem = {"title": "error", "detail": text.strip()}
    print(f"streamsaga submit: {status} {problem.get('title', '')}: {problem.get('detail', '')}", file=sys.stderr)
    for error in problem.get("errors") or []:
        print(f"  {error.get('field')}: {error.get('message')}", file=sys.stderr)


def _submit(args: argparse.Namespace) -> int:
    try:
        body = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    except OSError as exc:
        print(f"streamsaga submit: {exc}", file=sys.stderr)
        return 1
    path = "/v1/orders" if args.workflow is None else f"/v1/workflows/{args.workflow}"
    return asyncio.run(_post(args.api.rstrip("/") + path, body, args.idempotency_key))


def _submit_parser(sub: Any) -> None:
    p = sub.add_parser("submit", help="start a workflow from a JSON file", description=(
        "POST a JSON body to the API: an order (POST /v1/orders) or, with --workflow, the start payload "
        "of any workflow.  Prints the workflow id, then its Location; exits 1 with the problem's detail "
        "if the API rejects it."
    ))  # fmt: skip
    p.add_argument("file", metavar="FILE", help="JSON file to send, or - for standard input")
    p.add_argument(
        "--api",
        default=os.environ.get(API_ENV, DEFAULT_API),
        help=f"base URL of the API (default: ${API_ENV}, else {DEFAULT_API})",
    )
    p.add_argument("--idempotency-key", metavar="KEY", help="send this Idempotency-Key header")
    p.add_argument("--workflow", metavar="NAME", help="start workflow NAME instead of an order")
    p.set_defaults(run=_submit)


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


def _ledger(args: argparse.Namespace) -> int:
    from participants.ledger import Ledger, format_ledger, read_ledger
    from participants.sdk.connection import connect

    async def read() -> Ledger:
        redis = connect(args.redis_url, name="streamsaga-ledger")
        try:
            return await read_ledger(redis)
        finally:
            await redis.aclose()

    ledger = asyncio.run(read())
    if args.json:
        shown = {**ledger.model_dump(mode="json"), "net_cents": ledger.net_cents, "balanced": ledger.balanced}
        print(orjson.dumps(shown, option=orjson.OPT_INDENT_2).decode())
    else:
        print(format_ledger(ledger))
    return 0 if ledger.balanced else 1


def _ledger_parser(sub: Any) -> None:
    p = sub.add_parser("ledger", help="show the example workers' ledgers", description=(
        "Show what the example workers recorded — payments and refunds, reservations and releases, "
        "shipments and cancellations — and whether they balance (exit 1 if they do not)."
    ))  # fmt: skip
    _add_redis_url(p)
    p.add_argument("--json", action="store_true", help="print the ledger as JSON")
    p.set_defaults(run=_ledger)


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
    )
    return asyncio.run(run_dev(options))


def _dev_parser(sub: Any) -> None:
    p = sub.add_parser("dev", help="run everything locally with sample orders", description=(
        "Start Redis (an embedded server under DATA_DIR/redis unless --redis-url or $STREAMSAGA_REDIS_URL "
        "is given), the controller and the four example workers as child processes (their logs go to "
        "DATA_DIR/logs), submit sample orders that complete, fail and compensate, show their progress "
        "live, print the ledger, and keep running until Ctrl-C.  Stopping stops every child and the "
        "embedded Redis."
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
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_dev_parser, _controller_parser, _worker_parser, _submit_parser, _contracts_parser, _ledger_parser):
        add(sub)
    return parser


class _Formatter(logging.Formatter):
    """Appends the correlation id (the workflow id) of records that carry one."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        correlation_id = getattr(record, "correlation_id", None)
        return f"{line} [correlation_id={correlation_id}]" if correlation_id else line


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``streamsaga``; returns the exit status."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    result: int = args.run(args)
    return result
