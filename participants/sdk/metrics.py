"""Prometheus metrics of a participant's handlers, and the HTTP endpoint that serves them.

Every :class:`~participants.sdk.runner.Runner` counts into a registry of its own
(:class:`RunnerMetrics`), so several runners — or a runner and a controller — can
share a process.  With ``RunnerSettings.metrics_port`` set, the runner serves it at
``GET /metrics`` on that port, in its own event loop, for as long as it runs.

Labels stay bounded: participant and message type names come from the code, the
outcome and the dead-letter reason from the fixed lists below — never an id.
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager
from enum import StrEnum
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from contracts.envelope import DecodeError
from contracts.messages import PayloadError

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
HANDLER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Seconds; handlers time out after ``handler_timeout_s`` (60 s by default)."""


class HandlerOutcome(StrEnum):
    """What became of one delivery of a message to a participant."""

    OK = "ok"
    """Handled; its outcome and replies were committed."""
    DUPLICATE = "duplicate"
    """Handled before; acked without running the handler again."""
    RETRY = "retry"
    """The handler raised ``Retry``; tried again after its delay."""
    FAILED = "failed"
    """The handler raised (or timed out); tried again after a backoff."""
    REJECTED = "rejected"
    """The handler raised ``Reject``; dead-lettered at once."""
    DEAD_LETTERED = "dead_lettered"
    """Undecodable, an invalid payload, or failed on its last delivery: dead-lettered."""


class DeadLetterReason(StrEnum):
    """Why a consumer dead-lettered a message, as a bounded label (the full reason is in the dead letter)."""

    UNDECODABLE = "undecodable"
    """Not an envelope, or on a stream or in a partition it does not belong to."""
    INVALID_PAYLOAD = "invalid_payload"
    """The payload does not match its type's schema."""
    REJECTED = "rejected"
    """A handler rejected it (or, at the controller, no transition could be decided for it)."""
    EXHAUSTED = "exhausted"
    """Still failing after the last allowed delivery."""
    NO_SUCH_WORKFLOW = "no_such_workflow"
    """The controller has no workflow of its correlation id (never started, or expired)."""
    UNKNOWN_DEFINITION = "unknown_definition"
    """The controller has no definition of the workflow's name and version."""


def dead_letter_reason(error: DecodeError | PayloadError) -> DeadLetterReason:
    """The reason kind of an entry that could not be decoded."""
    return DeadLetterReason.INVALID_PAYLOAD if isinstance(error, PayloadError) else DeadLetterReason.UNDECODABLE


def dead_letter_counter(registry: CollectorRegistry) -> Counter:
    """``streamsaga_dead_letters_total{group,reason_kind}``: the same family in every process."""
    return Counter(
        "streamsaga_dead_letters",
        "Messages a consumer group dead-lettered, by why",
        ["group", "reason_kind"],
        registry=registry,
    )


class RunnerMetrics:
    """The metrics of one participant's handlers, in a registry of their own."""

    def __init__(self, participant: str, group: str, registry: CollectorRegistry | None = None) -> None:
        self.participant = participant
        self.group = group
        self.registry = registry if registry is not None else CollectorRegistry()
        self.messages = Counter(
            "streamsaga_handler_messages",
            "Deliveries of messages to a participant, by message type and outcome",
            ["participant", "type", "outcome"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "streamsaga_handler_duration_seconds",
            "Time a participant's handler took, by message type (any outcome)",
            ["participant", "type"],
            buckets=HANDLER_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "streamsaga_handler_in_flight",
            "Handlers of a participant running now",
            ["participant"],
            registry=self.registry,
        )
        self.dead_letters = dead_letter_counter(self.registry)
        self._in_flight_child = self.in_flight.labels(participant)  # present (at 0) before the first message
        # the labelled children, looked up once per message type (labels() costs a lock and a tuple)
        self._message_children: dict[tuple[str, HandlerOutcome], Counter] = {}
        self._duration_children: dict[str, Histogram] = {}
        ProcessCollector(registry=self.registry)

    def message(self, message_type: str, outcome: HandlerOutcome) -> None:
        child = self._message_children.get((message_type, outcome))
        if child is None:
            child = self._message_children[message_type, outcome] = self.messages.labels(
                self.participant, message_type, outcome
            )
        child.inc()

    def dead_lettered(self, message_type: str, reason: DeadLetterReason) -> None:
        """One delivery dead-lettered: counted as its handler outcome and by reason."""
        outcome = HandlerOutcome.REJECTED if reason is DeadLetterReason.REJECTED else HandlerOutcome.DEAD_LETTERED
        self.message(message_type, outcome)
        self.dead_letters.labels(self.group, reason).inc()

    def handling(self, message_type: str) -> AbstractContextManager[None]:
        """Time the block as one run of the handler of ``message_type``, counting it in flight meanwhile."""
        child = self._duration_children.get(message_type)
        if child is None:
            child = self._duration_children[message_type] = self.duration.labels(self.participant, message_type)
        return _Handling(self._in_flight_child, child)


class _Handling:
    """One run of a handler: in flight while it runs, its duration observed when it ends."""

    __slots__ = ("_duration", "_in_flight", "_started")

    def __init__(self, in_flight: Gauge, duration: Histogram) -> None:
        self._in_flight = in_flight
        self._duration = duration
        self._started = 0.0

    def __enter__(self) -> None:
        self._in_flight.inc()
        self._started = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self._duration.observe(time.perf_counter() - self._started)
        self._in_flight.dec()


def exposition(registry: Collector, accept: str = "") -> tuple[bytes, str]:
    """``registry`` in the format the ``Accept`` header asks for (OpenMetrics or
    Prometheus text, by default the text format 0.0.4), and its content type."""
    encode, content_type = choose_encoder(accept)
    return encode(registry), content_type


def exposition_response(registry: Collector, request: web.Request) -> web.Response:
    from aiohttp import web  # not at import time: a worker without a metrics port never needs it

    body, content_type = exposition(registry, request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})


class MetricsServer:
    """Serves a registry at ``GET /metrics`` on ``host:port`` in the running event loop.

    An async context manager; :attr:`port` is the bound port (useful with port 0).
    """

    def __init__(self, registry: Collector, host: str, port: int) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    async def _metrics(self, request: web.Request) -> web.Response:
        return exposition_response(self.registry, request)

    async def start(self) -> None:
        from aiohttp import web

        app = web.Application()
        app.router.add_get(METRICS_PATH, self._metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        if runner.addresses:
            self.port = int(runner.addresses[0][1])
        log.info("metrics at http://%s:%d%s", self.host, self.port, METRICS_PATH)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> MetricsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
