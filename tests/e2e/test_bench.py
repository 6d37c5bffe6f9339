"""`streamsaga bench` end to end: its own Redis, the controller and the workers as
processes, both loops and the baseline, on a load small enough for a test."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import orjson
import pytest

pytestmark = pytest.mark.e2e

ORDERS = 40
RATE = 20
DURATION_S = 1


def test_the_benchmark_runs_every_phase_and_reports_figures_and_targets() -> None:
    done = subprocess.run(
        [
            *(sys.executable, "-m", "controller", "bench", "--json"),
            *("--orders", str(ORDERS), "--warmup", "10", "--concurrency", "8"),
            *("--rate", str(RATE), "--duration", str(DURATION_S)),
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    report: dict[str, Any] = orjson.loads(done.stdout)

    phases = {phase["name"]: phase for phase in report["phases"]}
    assert set(phases) == {"streamsaga closed loop", "streamsaga open loop", "baseline closed loop"}
    for name in ("streamsaga closed loop", "baseline closed loop"):
        assert (phases[name]["completed"], phases[name]["not_completed"]) == (ORDERS, 0), name
    assert (phases["streamsaga open loop"]["completed"], phases["streamsaga open loop"]["not_completed"]) == (
        RATE * DURATION_S,
        0,
    )
    for phase in phases.values():
        assert phase["workflows_per_s"] > 0
        latency = phase["latency_ms"]
        assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    cpu = phases["streamsaga closed loop"]["cpu_us_per_workflow"]
    workers = {f"worker-{name}" for name in ("payment", "inventory", "shipping", "notification")}
    assert {"controller", *workers, "redis", "bench", "total"} == set(cpu)
    assert all(us > 0 for us in cpu.values())
    assert report["ratio_closed_loop_streamsaga_to_baseline"] > 0
    assert set(report["targets"]) == {"closed_loop_workflows_per_s", "open_loop_p99_ms"}
    memory = report["memory"]
    assert memory["workflows"] == 10 + ORDERS + RATE * DURATION_S  # warm-up, closed loop, open loop
    assert memory["keys"]["instance"] == memory["keys"]["history"] == memory["workflows"]
    assert memory["keys"]["outcome records"] == 4 * memory["workflows"]  # one per message each worker handled
    assert all(size > 0 for size in memory["bytes_per_workflow"].values())
