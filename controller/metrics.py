"""The controller's Prometheus metrics, served at ``GET /metrics``.

Workflow, step, timer and compensation metrics are read off committed
transitions: :meth:`ControllerMetrics.observe` gets the instance before and the
transition for every commit that took effect — from the correlator (events and
fired timers) and from the store (starts and operator requests).  Each controller
counts what it committed, so summing over controllers counts each thing once.

Two gauges are read when scraped: the lag of every consumer group (from
:func:`controller.liveness.survey`, cached for ``lag_cache_s`` so scrapes do not
hammer Redis) and the number of connected live-progress (SSE) clients.

Labels stay bounded: definition, step and group names and fixed outcome lists —
never a workflow id.  Each app counts into a registry of its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from datetime import datetime

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from redis.asyncio import Redis
from redis.exceptions import RedisError

from contracts.definitions import WorkflowDefinition
from contracts.messages import TIMER_FIRED
from contracts.naming import CONTROLLER_GROUP
from controller import api, liveness
from controller.definitions import Definitions
from controller.instance import TERMINAL, Instance, StepState, StepStatus, WorkflowStatus
from controller.state_machine import Transition
from participants.sdk.metrics import METRICS_PATH, DeadLetterReason, dead_letter_counter, exposition_response

log = logging.getLogger(__name__)

LAG_CACHE_S = 2.0
LAG_TIMEOUT_S = 2.0
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0)
WORKFLOW_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
CONTROLLER_DEAD_LETTERS = (
    DeadLetterReason.UNDECODABLE,
    DeadLetterReason.INVALID_PAYLOAD,
    DeadLetterReason.NO_SUCH_WORKFLOW,
    DeadLetterReason.UNKNOWN_DEFINITION,
    DeadLetterReason.EXHAUSTED,
)
"""The reasons the controller's counter shows from the start, at 0.  ``rejected`` (no
transition could be decided: a bug or a changed definition) appears when it first happens."""
_UNDONE = (StepStatus.COMPENSATING, StepStatus.COMPENSATED)  # a step is undone only after it completed


class ControllerMetrics:
    """The metrics of one controller process (one app), in a registry of their own."""

    def __init__(self, definitions: Definitions, *, lag_cache_s: float = LAG_CACHE_S) -> None:
        self.registry = CollectorRegistry()
        self.lag_cache_s = lag_cache_s
        self.sse_clients: Callable[[], float] = lambda: 0
        """Reads the number of connected live-progress clients; the app sets it when it has a progress hub."""
        r = self.registry
        self.started = Counter("streamsaga_workflows_started", "Workflows started", ["workflow"], registry=r)
        self.finished = Counter(
            "streamsaga_workflows_finished",
            "Workflows that finished: completed, compensated or failed (nothing to undo)",
            ["workflow", "outcome"],
            registry=r,
        )
        self.needs_attention = Counter(
            "streamsaga_workflows_needs_attention",
            "Times a workflow's compensation ran out of retries and it needed an operator",
            ["workflow"],
            registry=r,
        )
        self.workflow_duration = Histogram(
            "streamsaga_workflow_duration_seconds",
            "From start to finish of a workflow, by outcome",
            ["workflow", "outcome"],
            buckets=WORKFLOW_BUCKETS,
            registry=r,
        )
        self.step_duration = Histogram(
            "streamsaga_step_duration_seconds",
            "From start to end of a step, by how it ended: completed, failed or timed_out",
            ["workflow", "step", "outcome"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.step_timeouts = Counter(
            "streamsaga_step_timeouts", "Steps that timed out", ["workflow", "step"], registry=r
        )
        self.sla_breaches = Counter(
            "streamsaga_sla_breaches", "Workflows that breached their SLA", ["workflow"], registry=r
        )
        self.compensations = Counter(
            "streamsaga_compensations",
            "Compensation commands sent, every attempt counted",
            ["workflow", "step"],
            registry=r,
        )
        self.dead_letters = dead_letter_counter(r)
        for reason in CONTROLLER_DEAD_LETTERS:
            self.dead_letters.labels(CONTROLLER_GROUP, reason)
        self.events_applied = Counter(
            "streamsaga_events_applied", "Messages the correlator applied to their workflow", registry=r
        )
        self.events_duplicate = Counter(
            "streamsaga_events_duplicate",
            "Messages the correlator had applied before: redeliveries (not the start events it reads back)",
            registry=r,
        )
        self.timers_fired = Counter(
            "streamsaga_timers_fired", "Fired timers applied to their workflow (stale ones included)", registry=r
        )
        Gauge("streamsaga_sse_clients", "Connected live-progress (SSE) clients", registry=r).set_function(
            lambda: self.sse_clients()
        )
        self.lag: dict[str, int] = {}
        """Consumer group -> lag, as of the last survey."""
        self._lag_until = 0.0
        self._lag_lock = asyncio.Lock()
        r.register(_LagCollector(self))
        ProcessCollector(registry=r)
        self._compensation_commands: dict[tuple[str, int], frozenset[str]] = {}
        self._controller_types = definitions.event_types()
        for definition in definitions:
            self._know(definition)

    def _know(self, definition: WorkflowDefinition) -> None:
        """Remember a definition's compensation commands and show its series at 0 from the start."""
        name = definition.name
        self._compensation_commands[(name, definition.version)] = frozenset(
            step.compensation.command for step in definition.steps if step.compensation
        )
        self.started.labels(name)
        self.needs_attention.labels(name)
        self.sla_breaches.labels(name)
        for outcome in sorted(TERMINAL):
            self.finished.labels(name, outcome)
        for step in definition.steps:
            self.step_timeouts.labels(name, step.name)
            if step.compensation:
                self.compensations.labels(name, step.name)

    # --- from committed transitions ----------------------------------------------------

    def observe(self, before: Instance | None, result: Transition) -> None:
        """Count what one committed transition did; ``before`` is None for a start."""
        after = result.instance
        workflow = after.workflow.name
        if before is None:
            self.started.labels(workflow).inc()
        # a compensated workflow that a late completion reopens finishes once, as far as counting goes
        if (
            after.status in TERMINAL
            and after.finished_at is not None
            and (before is None or before.finished_at is None)
        ):
            self.finished.labels(workflow, after.status).inc()
            self.workflow_duration.labels(workflow, after.status).observe(_seconds(after.created_at, after.finished_at))
        if after.status is WorkflowStatus.NEEDS_ATTENTION and (
            before is None or before.status is not WorkflowStatus.NEEDS_ATTENTION
        ):
            self.needs_attention.labels(workflow).inc()
        if after.sla_breached and not (before is not None and before.sla_breached):
            self.sla_breaches.labels(workflow).inc()
        earlier = {step.name: step for step in before.steps} if before is not None else {}
        for step in after.steps:
            self._observe_step(workflow, earlier.get(step.name), step)
        commands = self._compensation_commands.get((workflow, after.workflow.version), frozenset())
        for message in result.outgoing:
            if message.type in commands:
                self.compensations.labels(workflow, str(message.payload.get("step", ""))).inc()
        cause = result.history[0] if result.history else None
        if cause is not None and cause.direction == "in" and cause.type == TIMER_FIRED:
            self.timers_fired.inc()

    def _observe_step(self, workflow: str, was: StepState | None, step: StepState) -> None:
        if step.finished_at is not None and step.started_at is not None and (was is None or was.finished_at is None):
            # a step that completed while the workflow compensates is at once being undone
            outcome = StepStatus.COMPLETED if step.status in _UNDONE else step.status
            self.step_duration.labels(workflow, step.name, outcome).observe(_seconds(step.started_at, step.finished_at))
        if step.status is StepStatus.TIMED_OUT and (was is None or was.status is not StepStatus.TIMED_OUT):
            self.step_timeouts.labels(workflow, step.name).inc()

    def applied(self) -> None:
        self.events_applied.inc()

    def duplicate(self) -> None:
        self.events_duplicate.inc()

    def dead_lettered(self, reason: DeadLetterReason) -> None:
        self.dead_letters.labels(CONTROLLER_GROUP, reason).inc()

    # --- read when scraped ---------------------------------------------------------------

    async def refresh_lag(self, redis: Redis, partitions: int) -> None:
        """Survey the consumer groups' lag unless the last survey is younger than ``lag_cache_s``.

        If Redis does not answer within :data:`LAG_TIMEOUT_S` the lag is left out
        of the exposition (no stale numbers) until the next survey.
        """
        async with self._lag_lock:  # concurrent scrapes share one survey
            if time.monotonic() < self._lag_until:
                return
            try:
                async with asyncio.timeout(LAG_TIMEOUT_S):
                    found = await liveness.survey(redis, partitions, self._controller_types)
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("cannot survey the consumer groups' lag for %s: %s", METRICS_PATH, exc or "timed out")
                self.lag = {}
            else:
                lag: dict[str, int] = {found.controller.group: found.controller.lag.total}
                for view in found.participants:
                    lag[view.group] = lag.get(view.group, 0) + view.lag.total
                self.lag = lag
            self._lag_until = time.monotonic() + self.lag_cache_s


class _LagCollector(Collector):
    """``streamsaga_consumer_lag{group}`` from the last survey."""

    def __init__(self, metrics: ControllerMetrics) -> None:
        self.metrics = metrics

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "streamsaga_consumer_lag",
            "Entries a consumer group has yet to finish (undelivered plus pending), over every partition",
            labels=["group"],
        )

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for group, lag in sorted(self.metrics.lag.items()):
            family.add_metric([group], lag)
        yield family


def _seconds(start: datetime, end: datetime) -> float:
    return max(0.0, (end - start).total_seconds())


METRICS = web.AppKey("metrics", ControllerMetrics)
routes = web.RouteTableDef()


@routes.get(METRICS_PATH)
async def get_metrics(request: web.Request) -> web.Response:
    """The controller's metrics in the Prometheus text format (OpenMetrics if the ``Accept`` header asks)."""
    metrics = request.app[METRICS]
    await metrics.refresh_lag(request.app[api.REDIS], request.app[api.SETTINGS].partitions)
    return exposition_response(metrics.registry, request)
