"""The ``streamsaga`` command, run as a real process (``python -m controller``)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import ClientError, ClientSession
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from contracts.schema import file_name, schemas
from controller.app import create_app
from controller.cli import WORKER_DEFAULTS, build_parser, main
from controller.embedded_redis import free_port
from controller.exit_status import ExitCode
from controller.settings import REDIS_URL_ENV, ControllerSettings
from controller.store import WorkflowStore
from tests.conftest import eventually
from tests.contracts.test_schema import assert_well_formed

P = 4
CLI_TIMEOUT_S = 110
ORDER: dict[str, Any] = {
    "customer_id": "c-7",
    "items": [{"sku": "BOOK-1", "quantity": 1, "unit_price": "9.99"}],
    "currency": "EUR",
    "ship_to": {"country": "DE"},
}
# streamsaga dev's samples and the outcome each must reach
DEV_OUTCOMES = {
    "completes": "completed",
    "over-limit": "failed",
    "beyond-stock": "compensated",
    "unsupported-country": "compensated",
    "notification-fails": "completed",
}


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for name in (REDIS_URL_ENV, "STREAMSAGA_API"):
        env.pop(name, None)
    return env


async def cli(
    *args: str, stdin: bytes | None = None, cwd: Path | None = None, env: dict[str, str] | None = None
) -> Run:
    """Run ``python -m controller ARGS`` to completion (at most CLI_TIMEOUT_S), without blocking the event loop;
    ``env``: variables to set on top of the test run's (less the STREAMSAGA_ ones :func:`_env` drops)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controller", *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=cwd, env={**_env(), **(env or {})},
    )  # fmt: skip
    try:
        async with asyncio.timeout(CLI_TIMEOUT_S):
            out, err = await process.communicate(stdin)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return Run(process.returncode, out.decode(), err.decode())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))  # a zombie is not running


def pids(output: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"\(pid (\d+)\)", output)]


@pytest.fixture
async def api_url(redis: Redis, redis_url: str) -> AsyncIterator[str]:
    settings = ControllerSettings(redis_url=redis_url, partitions=P, consumer="cli-tests", block_ms=50)
    server = TestServer(create_app(settings), host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


# --- contracts export ---------------------------------------------------------------


async def test_contracts_export_writes_one_well_formed_schema_file_per_type(tmp_path: Path) -> None:
    run = await cli("contracts", "export", "--out", str(tmp_path / "schemas"))

    assert run.returncode == 0, run.stderr
    expected = schemas()
    assert sorted(p.name for p in (tmp_path / "schemas").iterdir()) == sorted(file_name(n) for n in expected)
    for name, schema in expected.items():
        written = orjson.loads((tmp_path / "schemas" / file_name(name)).read_bytes())
        assert written == schema
        assert_well_formed(name, written)


async def test_contracts_export_without_out_prints_every_schema_as_one_object() -> None:
    run = await cli("contracts", "export")

    assert run.returncode == 0, run.stderr
    assert orjson.loads(run.stdout) == schemas()


# --- submit -------------------------------------------------------------------------


async def test_submit_of_the_readmes_example_file_prints_the_workflow_id_and_its_location(
    api_url: str, redis: Redis
) -> None:
    order = Path(__file__).parents[2] / "examples" / "order.json"

    run = await cli("submit", str(order), "--api", api_url)

    assert run.returncode == 0, run.stderr
    workflow_id, location = run.stdout.splitlines()
    assert location == f"Location: {api_url}/v1/workflows/{workflow_id}"
    instance = await WorkflowStore(redis, P).load(workflow_id)
    assert instance is not None
    assert instance.input["order"]["items"] == orjson.loads(order.read_bytes())["items"]


async def test_submit_reads_standard_input_and_sends_the_idempotency_key(api_url: str) -> None:
    body = orjson.dumps(ORDER)

    first = await cli("submit", "-", "--api", api_url, "--idempotency-key", "cli-1", stdin=body)
    again = await cli("submit", "-", "--api", api_url, "--idempotency-key", "cli-1", stdin=body)

    assert first.returncode == again.returncode == 0, first.stderr + again.stderr
    assert first.stdout == again.stdout
    assert "replayed" in again.stderr


async def test_submit_exits_non_zero_with_the_problem_naming_the_field(api_url: str) -> None:
    bad = {**ORDER, "items": [{"sku": "BOOK-1", "quantity": 0, "unit_price": "9.99"}]}

    run = await cli("submit", "-", "--api", api_url, stdin=orjson.dumps(bad))

    assert run.returncode == 1
    assert run.stdout == ""
    assert "422 Invalid input" in run.stderr
    assert "items.0.quantity" in run.stderr


async def test_submit_reports_an_api_it_cannot_reach() -> None:
    run = await cli("submit", "-", "--api", f"http://127.0.0.1:{free_port()}", stdin=orjson.dumps(ORDER))

    assert run.returncode == 1
    assert "cannot reach the API" in run.stderr


# --- cancel, retry ---------------------------------------------------------------------


async def submitted(api_url: str) -> str:
    """The id of an order submitted with `streamsaga submit`."""
    run = await cli("submit", "-", "--api", api_url, stdin=orjson.dumps(ORDER))
    assert run.returncode == 0, run.stderr
    return run.stdout.split()[0]


async def test_cancel_asks_the_controller_and_records_who_and_why(api_url: str, redis: Redis) -> None:
    workflow_id = await submitted(api_url)

    run = await cli("cancel", workflow_id, "--api", api_url, "--by", "alice", "--reason", "customer called")

    assert run.returncode == 0, run.stderr
    assert run.stdout == f"{workflow_id} compensating\n"  # waiting for the running payment step
    [request] = [h for h in await WorkflowStore(redis, P).history(workflow_id) if h.type == "CancelRequested"]
    assert request.producer == "operator:alice"
    instance = await WorkflowStore(redis, P).load(workflow_id)
    assert instance is not None
    assert instance.error == "cancelled by alice: customer called"


async def test_cancel_with_watch_follows_the_workflow_after_the_request(api_url: str) -> None:
    workflow_id = await submitted(api_url)

    # no worker runs: the compensation waits for the payment step's deadline, past --timeout
    run = await cli("cancel", workflow_id, "--api", api_url, "--watch", "--timeout", "1", "--plain")

    assert run.returncode == ExitCode.TIMEOUT, run.stderr
    assert run.stdout.startswith(f"{workflow_id} compensating\n")
    assert "CancelRequested" in run.stdout
    assert "still compensating" in run.stderr


@pytest.mark.parametrize(
    ("command", "status"), [("cancel", "404 Workflow not found"), ("retry", "409 Not allowed in the workflow's state")]
)
async def test_an_operator_request_the_api_refuses_exits_1_with_the_problem(
    api_url: str, command: str, status: str
) -> None:
    workflow_id = "no-such-workflow" if command == "cancel" else await submitted(api_url)  # running: no retry

    run = await cli(command, workflow_id, "--api", api_url)

    assert run.returncode == 1
    assert run.stdout == ""
    assert f"streamsaga {command}: {status}" in run.stderr


# --- controller, ledger, arguments ----------------------------------------------------


async def test_controller_serves_the_api_and_stops_gracefully_on_sigterm(redis: Redis, redis_url: str) -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controller", "controller",
        "--redis-url", redis_url, "--port", str(port), "--partitions", str(P),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=_env(),
    )  # fmt: skip
    try:
        async with ClientSession(base_url=f"http://127.0.0.1:{port}") as session:

            async def ready() -> int:
                try:
                    async with session.get("/readyz") as response:
                        return response.status
                except ClientError:
                    return 0

            await eventually(ready, lambda status: status == 200, what="the controller's readiness")
            async with session.post("/v1/orders", json=ORDER) as response:
                assert response.status == 202
        process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), 20)
        assert process.returncode == 0, err.decode()
        assert "stopping" in err.decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_controller_refuses_invalid_definitions_naming_the_problem(tmp_path: Path) -> None:
    definitions = tmp_path / "definitions.json"
    definitions.write_text('[{"name": "refund"}]')

    run = await cli(
        "controller", "--definitions", str(definitions), "--redis-url", f"redis://127.0.0.1:{free_port()}/0"
    )

    assert run.returncode == 2
    assert "invalid workflow definitions" in run.stderr
    assert "0.steps" in run.stderr


async def test_controller_tuning_flags_reach_its_settings(tmp_path: Path) -> None:
    run = await cli(
        "controller", "--timer-interval-s", "2", "--redis-url", f"redis://127.0.0.1:{free_port()}/0"
    )  # fmt: skip

    assert run.returncode == 2
    assert "timer_interval_s must be within (0, 1], not 2.0" in run.stderr
    args = build_parser().parse_args(
        ["controller", "--stream-min-age-s", "60", "--sse-buffer-events", "50", "--liveness-grace-s", "0"]
    )
    assert (args.stream_min_age_s, args.sse_buffer_events, args.liveness_grace_s) == (60.0, 50, 0.0)
    assert (args.instance_cache_size, args.access_log) == (10_000, False)
    args = build_parser().parse_args(["controller", "--instance-cache-size", "0", "--access-log"])
    assert (args.instance_cache_size, args.access_log) == (0, True)
    assert build_parser().parse_args(["controller", "--without-order-saga"]).without_order_saga
    assert main(["controller", "--without-order-saga"]) == 2  # and no --definitions: nothing to run


async def test_ledger_of_an_empty_redis_balances(redis: Redis, redis_url: str) -> None:
    run = await cli("ledger", "--json", "--redis-url", redis_url)

    assert run.returncode == 0, run.stderr
    ledger = orjson.loads(run.stdout)
    assert ledger["balanced"] is True
    assert ledger["orders"] == []


async def test_ledger_of_a_redis_it_cannot_reach_says_so_and_exits_2() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    run = await cli("ledger", "--redis-url", url)

    assert run.returncode == 2
    assert run.stderr.startswith(f"streamsaga ledger: cannot use Redis at {url}: "), run.stderr
    assert "Traceback" not in run.stderr


def test_worker_help_states_the_workers_own_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    from participants.workers import WorkerSettings

    defaults = WorkerSettings(redis_url="redis://unused")
    from_settings = {
        "concurrency": defaults.concurrency,
        "payment_limit": str(defaults.payment_limit),
        "default_stock": defaults.default_stock,
        "countries": ",".join(defaults.countries),
        "outcome_ttl_s": defaults.outcome_ttl_s,
    }
    assert from_settings == WORKER_DEFAULTS
    with pytest.raises(SystemExit) as exited:
        main(["worker", "--help"])
    assert exited.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for value in WORKER_DEFAULTS.values():
        assert f"(default: {value})" in help_text


@pytest.mark.parametrize(
    "argv",
    [
        ["controller", "--partitions", "0"],
        ["controller", "--port", "70000"],
        ["controller", "--instance-cache-size", "-1"],
        ["worker", "payment", "--payment-limit", "lots"],
        ["worker", "shipping", "--countries", "USA"],
        ["contracts"],
    ],
)
def test_invalid_arguments_exit_with_status_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2


def test_settings_the_controller_refuses_exit_with_status_2_naming_them(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["controller", "--block-ms", "5000"]) == 2
    assert "block_ms must be at most 2000" in capsys.readouterr().err


# --- dev ----------------------------------------------------------------------------


def _outcomes(output: str) -> dict[str, str]:
    return dict(re.findall(r"^\s+(?:ok |BAD) (\S+)\s+(\S+)\s+expected", output, flags=re.MULTILINE))


@pytest.mark.e2e
async def test_dev_runs_every_sample_to_its_expected_outcome_and_leaves_nothing_running(tmp_path: Path) -> None:
    run = await cli(
        "--log-format", "json", "dev", "--exit-when-done", "--port", str(free_port()), "--timeout", "60", cwd=tmp_path
    )  # fmt: skip

    assert run.returncode == 0, run.stdout + run.stderr
    assert _outcomes(run.stdout) == DEV_OUTCOMES
    assert re.search(r"notification-fails\s+notification\s+failed", run.stdout)
    assert "ledger balances" in run.stdout
    # each ledger row names its sample and the outcome it was checked against
    assert re.search(r"\s+compensated\s+unsupported-country-\d+\s+USD", run.stdout), run.stdout
    assert re.search(r"\s+completed\s+completes-\d+\s+USD", run.stdout), run.stdout
    started = pids(run.stdout)
    assert len(started) == 6  # the embedded redis-server, the controller and four workers
    assert [pid for pid in started if alive(pid)] == []
    assert (tmp_path / ".streamsaga" / "redis").is_dir()
    assert {p.name for p in (tmp_path / ".streamsaga" / "logs").iterdir()} == {
        f"{name}.log" for name in ("controller", "payment", "inventory", "shipping", "notification")
    }
    # the children log in the format dev was given
    first_line = (tmp_path / ".streamsaga" / "logs" / "payment.log").read_text().splitlines()[0]
    assert json.loads(first_line)["logger"].startswith("participants")


@pytest.mark.e2e
async def test_dev_stops_every_process_on_sigterm(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controller", "dev", "--port", str(free_port()),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, cwd=tmp_path, env=_env(),
    )  # fmt: skip
    assert process.stdout is not None
    output: list[str] = []
    try:
        async with asyncio.timeout(90):
            while not (output and output[-1].lstrip().startswith("then: streamsaga submit")):
                line = await process.stdout.readline()
                assert line, "dev ended before it was running:\n" + "".join(output)
                output.append(line.decode())
        # what it says to run from another shell reaches its Redis
        exported = re.search(r"export (STREAMSAGA_REDIS_URL=\S+) (STREAMSAGA_API=\S+)", "".join(output))
        assert exported is not None, "".join(output)
        env = dict(assignment.split("=", 1) for assignment in exported.groups())
        started_at = re.escape(env["STREAMSAGA_REDIS_URL"])
        assert re.search(rf"started embedded redis-server \(pid \d+\) at {started_at},", "".join(output))
        ledger = await cli("ledger", "--json", env=env)
        assert ledger.returncode == 0, ledger.stderr
        assert len(orjson.loads(ledger.stdout)["orders"]) == len(DEV_OUTCOMES) - 1  # the declined one records none
        process.send_signal(signal.SIGTERM)
        rest, _ = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    text = "".join(output) + rest.decode()

    assert process.returncode == 0, text
    assert _outcomes(text) == DEV_OUTCOMES
    started = pids(text)
    assert len(started) == 6
    assert [pid for pid in started if alive(pid)] == []
    assert "dev: stopped embedded redis-server" in text


def test_bench_passes_every_argument_on_to_the_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["bench", "--orders", "10", "--help"])
    assert exited.value.code == 0
    usage = capsys.readouterr().out
    assert usage.startswith("usage: streamsaga bench")
    assert "--concurrency" in usage
    assert "--rate" in usage


def test_bench_refuses_what_the_benchmark_refuses(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["bench", "--orders", "0"])
    assert exited.value.code == 2
    assert "must be positive" in capsys.readouterr().err


def test_other_commands_still_refuse_unknown_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["ledger", "--orders", "10"])
    assert exited.value.code == 2
    assert "unrecognized arguments: --orders 10" in capsys.readouterr().err


def test_each_dev_run_orders_skus_of_its_own() -> None:
    from controller.dev import samples

    def skus(run: str) -> set[str]:
        return {item["sku"] for sample in samples(run) for item in sample.order["items"]}

    # .streamsaga/redis persists: stock one run took must not decide another run's outcomes
    assert skus("20261122000000").isdisjoint(skus("20261122000001"))
