"""The results of a run, for people and for machines."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

from bench.run import Report

# the targets of the issue, on a 2-core machine with every process local
TARGET_CLOSED_LOOP_WPS = 2_000.0
TARGET_OPEN_LOOP_P99_MS = 25.0
TARGET_OPEN_LOOP_RATE = 500.0

_CPU_ORDER = (
    "controller",
    "worker-payment",
    "worker-inventory",
    "worker-shipping",
    "worker-notification",
    "baseline-payment",
    "baseline-inventory",
    "baseline-shipping",
    "baseline-notification",
    "redis",
    "bench",
    "total",
)


def ratio(report: Report) -> float | None:
    """Our closed-loop throughput as a fraction of the baseline's."""
    ours = report.phase("streamsaga closed loop")
    base = report.phase("baseline closed loop")
    if ours is None or base is None or not base.throughput:
        return None
    return ours.throughput / base.throughput


def targets(report: Report) -> dict[str, dict[str, Any]]:
    checks: dict[str, dict[str, Any]] = {}
    closed = report.phase("streamsaga closed loop")
    if closed is not None:
        checks["closed_loop_workflows_per_s"] = {
            "target": f">= {TARGET_CLOSED_LOOP_WPS:.0f}",
            "measured": round(closed.throughput, 1),
            "met": closed.throughput >= TARGET_CLOSED_LOOP_WPS and closed.not_completed == 0,
        }
    opened = report.phase("streamsaga open loop")
    if opened is not None:
        p99 = opened.latency_ms()["p99"]
        checks["open_loop_p99_ms"] = {
            "target": f"< {TARGET_OPEN_LOOP_P99_MS:.0f} at {TARGET_OPEN_LOOP_RATE:.0f}/s offered",
            "offered_rate": opened.offered_rate,
            "measured": None if math.isnan(p99) else round(p99, 2),
            "met": (
                not math.isnan(p99)
                and p99 < TARGET_OPEN_LOOP_P99_MS
                and (opened.offered_rate or 0) >= TARGET_OPEN_LOOP_RATE
                and opened.not_completed == 0
            ),
        }
    return checks


def as_json(report: Report) -> dict[str, Any]:
    options = {
        k: (str(v) if v is not None and not isinstance(v, int | float | str | bool | list) else v)
        for k, v in asdict(report.options).items()
    }
    return {
        "options": options,
        "environment": report.environment,
        "phases": [phase.as_dict() for phase in report.phases],
        "ratio_closed_loop_streamsaga_to_baseline": _r(ratio(report), 3),
        "targets": targets(report),
        "profiles": report.profiles,
        "memory": report.memory.as_dict() if report.memory else None,
    }


def as_text(report: Report) -> str:
    env = report.environment
    lines = [
        f"streamsaga bench — {env.get('cpus')} CPUs, load average before {env.get('load_average_before')}, "
        f"after {env.get('load_average_after')}; Redis {env.get('redis')}; {env.get('partitions')} partitions",
        "",
        f"{'phase':<24} {'done':>7} {'not ok':>7} {'wf/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8}",
    ]
    for phase in report.phases:
        lat = phase.latency_ms()
        name = phase.name + (f" @{phase.offered_rate:.0f}/s" if phase.offered_rate else "")
        lines.append(
            f"{name:<24} {phase.completed:>7} {phase.not_completed:>7} {phase.throughput:>8.0f} "
            f"{lat['p50']:>8.1f} {lat['p95']:>8.1f} {lat['p99']:>8.1f} {lat['max']:>8.1f}"
        )
        if phase.not_completed:
            lines.append(f"{'':<24} outcomes: {dict(phase.outcomes)} {phase.error_samples}")
        if phase.offered_rate and phase.max_schedule_lag_s > 0.005:
            lines.append(
                f"{'':<24} (the load generator fell behind its schedule by up to "
                f"{phase.max_schedule_lag_s * 1000:.0f} ms; latency counts from the schedule)"
            )
    value = ratio(report)
    if value is not None:
        lines += ["", f"closed-loop throughput, streamsaga / baseline: {value:.2f}"]
    checks = targets(report)
    if checks:
        lines.append("")
        for name, check in checks.items():
            verdict = "met" if check["met"] else "NOT met"
            lines.append(f"target {name} {check['target']}: measured {check['measured']} — {verdict}")
    lines += ["", "CPU per completed workflow (µs) and CPU use (% of one core), per process:"]
    names = [n for n in _CPU_ORDER if any(n in p.cpu_s for p in report.phases)]
    header = f"{'phase':<24} " + " ".join(f"{_short(n):>9}" for n in names)
    lines.append(header)
    for phase in report.phases:
        per = phase.cpu_us_per_workflow()
        pct = phase.cpu_percent()
        lines.append(f"{phase.name:<24} " + " ".join(f"{_cell(per.get(n), 'µs'):>9}" for n in names))
        lines.append(f"{'':<24} " + " ".join(f"{_cell(pct.get(n), '%'):>9}" for n in names))
    lines += [
        "",
        "Redis commands, top by time: calls per completed workflow × µs per call (% of Redis CPU time).",
        "A script's inner commands count both on their own and inside EVALSHA; the rest of Redis CPU is",
        "mostly network I/O.",
    ]
    for phase in report.phases:
        total = phase.cpu_s.get("redis", 0.0) * 1e6 or 1.0
        done = phase.completed or 1
        cells = [
            f"{name} {row['calls'] / done:.2f}×{row['us_per_call']:.1f}µs ({100 * row['usec'] / total:.0f}%)"
            for name, row in list(phase.redis_commands.items())[:6]
        ]
        lines.append(f"  {phase.name}: " + ", ".join(cells))
    if report.memory is not None:
        lines += ["", *report.memory.as_text()]
    for name, summary in report.profiles.items():
        lines += ["", f"py-spy, {name} (closed loop):", summary]
    logs = env.get("log_dir")
    lines += ["", f"process logs: {logs}" if logs else "process logs: removed (pass --log-dir to keep them)"]
    return "\n".join(lines)


def _short(name: str) -> str:
    return name.replace("worker-", "").replace("baseline-", "b-").replace("notification", "notify")[:9]


def _cell(value: float | None, unit: str) -> str:
    return "-" if value is None else f"{value:.0f}{unit}"


def _r(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
