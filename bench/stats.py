"""Latency samples and the summary of one load phase."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


def percentile(sorted_values: list[float], q: float) -> float:
    """The ``q``-th percentile (0–100) by the nearest-rank method; NaN when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class PhaseResult:
    """What one load phase measured.  Latencies are in seconds."""

    name: str
    wall_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    offered_rate: float | None = None
    max_schedule_lag_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)
    redis_commands: dict[str, dict[str, float]] = field(default_factory=dict)
    error_samples: dict[str, str] = field(default_factory=dict)

    def record(self, outcome: str, latency: float, detail: str = "") -> None:
        self.outcomes[outcome] += 1
        if detail and outcome not in self.error_samples:
            self.error_samples[outcome] = detail
        if outcome == "completed":
            self.latencies.append(latency)

    @property
    def completed(self) -> int:
        return self.outcomes["completed"]

    @property
    def not_completed(self) -> int:
        return sum(n for outcome, n in self.outcomes.items() if outcome != "completed")

    @property
    def throughput(self) -> float:
        """Completed workflows per second of wall time."""
        return self.completed / self.wall_s if self.wall_s > 0 else 0.0

    def latency_ms(self) -> dict[str, float]:
        values = sorted(self.latencies)
        return {
            "p50": percentile(values, 50) * 1000,
            "p95": percentile(values, 95) * 1000,
            "p99": percentile(values, 99) * 1000,
            "max": (values[-1] if values else math.nan) * 1000,
        }

    def cpu_percent(self) -> dict[str, float]:
        """CPU use of each process during the phase, in % of one core."""
        return {name: 100 * seconds / self.wall_s for name, seconds in self.cpu_s.items()} if self.wall_s else {}

    def cpu_us_per_workflow(self) -> dict[str, float]:
        """CPU time of each process per completed workflow, in microseconds."""
        done = self.completed
        return {name: 1e6 * seconds / done for name, seconds in self.cpu_s.items()} if done else {}

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "wall_s": round(self.wall_s, 3),
            "offered_rate": self.offered_rate,
            "completed": self.completed,
            "not_completed": self.not_completed,
            "outcomes": dict(self.outcomes),
            "workflows_per_s": round(self.throughput, 1),
            "latency_ms": {k: _round(v) for k, v in self.latency_ms().items()},
            "max_schedule_lag_ms": round(self.max_schedule_lag_s * 1000, 2),
            "cpu_percent": {k: round(v, 1) for k, v in self.cpu_percent().items()},
            "cpu_us_per_workflow": {k: round(v, 1) for k, v in self.cpu_us_per_workflow().items()},
            "redis_commands": self.redis_commands,
            "error_samples": self.error_samples,
        }


def _round(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 2)
