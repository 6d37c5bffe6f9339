"""``python -m bench``: streamsaga's throughput and latency, and the baseline's."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import orjson
from redis.exceptions import RedisError

from bench import report
from bench.processes import ChildFailed
from bench.run import (
    BenchError,
    Interrupted,
    Options,
    add_deployment_arguments,
    add_output_arguments,
    run,
    terminate_as_interrupt,
)
from participants.sdk import collector


def parse(argv: list[str] | None = None, prog: str = "python -m bench") -> tuple[Options, argparse.Namespace]:
    defaults = Options()
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Start an embedded Redis, the streamsaga controller and the four example workers as separate "
            "processes; push orders through POST /v1/orders in a closed loop and at a fixed offered rate; "
            "then run the same choreography written directly on redis.asyncio (the baseline) and print "
            "completed workflows/s, end-to-end latency p50/p95/p99/max and our throughput as a ratio of the "
            "baseline's."
        ),
    )
    load = parser.add_argument_group("load")
    load.add_argument(
        "--orders", type=int, default=defaults.orders, help="orders in the measured closed loop (default: %(default)s)"
    )
    load.add_argument(
        "--concurrency",
        type=int,
        default=defaults.concurrency,
        help="closed-loop clients, each with one workflow in flight (default: %(default)s)",
    )
    load.add_argument(
        "--rate", type=float, default=defaults.rate, help="open-loop offered rate, orders/s (default: %(default)s)"
    )
    load.add_argument(
        "--duration", type=float, default=defaults.duration, help="open-loop duration, seconds (default: %(default)s)"
    )
    load.add_argument(
        "--warmup", type=int, default=defaults.warmup, help="unmeasured closed-loop orders first (default: %(default)s)"
    )
    load.add_argument(
        "--timeout",
        type=float,
        default=defaults.timeout,
        help="seconds a workflow may take before it counts as timed out (default: %(default)s)",
    )
    system = parser.add_argument_group("system under test")
    add_deployment_arguments(system, defaults)
    system.add_argument(
        "--worker-concurrency", type=int, help="--concurrency of every worker (default: the worker's own)"
    )
    system.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="`streamsaga --log-level` of the controller and workers (default: the CLI's own, INFO)",
    )
    system.add_argument(
        "--controller-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `streamsaga controller` (repeatable)",
    )
    system.add_argument(
        "--worker-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for every `streamsaga worker` (repeatable)",
    )
    phases = parser.add_argument_group("what to run")
    phases.add_argument("--skip-baseline", action="store_true", help="do not run the baseline")
    phases.add_argument("--skip-streamsaga", action="store_true", help="run only the baseline")
    phases.add_argument("--skip-open-loop", action="store_true", help="run no open loop")
    phases.add_argument(
        "--baseline-steps",
        type=int,
        default=defaults.baseline_steps,
        help="stages of the baseline choreography: the order saga has 4; 3 stops after shipping (default: %(default)s)",
    )
    phases.add_argument(
        "--batch",
        type=int,
        default=defaults.batch,
        help="baseline XREADGROUP COUNT, as the workers' and controller's default (default: %(default)s)",
    )
    output = parser.add_argument_group("output")
    add_output_arguments(output, "the closed loop")
    output.add_argument("--check", action="store_true", help="exit 1 if a target is not met")
    args = parser.parse_args(argv)
    if args.orders < 1 or args.concurrency < 1 or args.rate <= 0 or args.duration <= 0 or args.warmup < 1:
        parser.error("--orders, --concurrency, --rate, --duration and --warmup must be positive")
    if args.partitions < 1:
        parser.error("--partitions must be positive")
    options = Options(
        orders=args.orders,
        concurrency=args.concurrency,
        rate=args.rate,
        duration=args.duration,
        warmup=args.warmup,
        partitions=args.partitions,
        redis_url=args.redis_url,
        skip_baseline=args.skip_baseline,
        skip_streamsaga=args.skip_streamsaga,
        skip_open_loop=args.skip_open_loop,
        baseline_steps=args.baseline_steps,
        batch=args.batch,
        worker_concurrency=args.worker_concurrency,
        log_level=args.log_level,
        cli=args.cli,
        timeout=args.timeout,
        log_dir=args.log_dir,
        profile_dir=args.profile,
        extra_controller_args=args.controller_arg,
        extra_worker_args=args.worker_arg,
    )
    return options, args


def main(argv: list[str] | None = None, prog: str = "python -m bench") -> int:
    options, args = parse(argv, prog)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    signal.signal(signal.SIGTERM, terminate_as_interrupt)
    collector.tune()  # the load generator shares the cores with what it measures
    try:
        result = run(options)
    except (KeyboardInterrupt, Interrupted):
        print("interrupted; every process was stopped", file=sys.stderr)
        return 130
    except (BenchError, ChildFailed, RedisError) as exc:
        print(f"bench failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(report.as_json(result), option=orjson.OPT_INDENT_2) + b"\n")
    else:
        print(report.as_text(result))
    if any(phase.not_completed for phase in result.phases):
        return 2
    if args.check and not all(check["met"] for check in report.targets(result).values()):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
