"""W3C Trace Context across the saga, and spans when OpenTelemetry is installed.

The ``traceparent`` a client sends with ``POST /v1/orders`` travels in the
envelope of the start event, and every message that follows carries it on: the
SDK copies it from a handled message to the replies, the controller from an event
to the commands it sends.  So every message of a workflow belongs to the client's
trace.

With the ``otel`` extra (``pip install 'streamsaga[otel]'``, which brings
``opentelemetry-api``) the runner and the correlator also open a span per handled
message, a child of the message's ``traceparent``; configure an SDK and exporter
at your entry point as OpenTelemetry describes.  Without it, :func:`span` does nothing.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

# version-traceid-parentid-flags; version ff and all-zero ids are invalid; a future
# version may append fields after the flags
_TRACEPARENT = re.compile(
    r"^(?P<version>(?!ff)[0-9a-f]{2})-(?P<trace_id>(?!0{32})[0-9a-f]{32})-"
    r"(?P<parent_id>(?!0{16})[0-9a-f]{16})-(?P<flags>[0-9a-f]{2})(?:-.*)?$"
)
TRACER_NAME = "streamsaga"


@dataclass(frozen=True)
class TraceParent:
    """The parts of a W3C ``traceparent`` header."""

    version: str
    trace_id: str
    parent_id: str
    flags: str

    @classmethod
    def parse(cls, value: str | None) -> TraceParent | None:
        """The parts of ``value``, or None if it is not a valid traceparent (which
        the spec says to ignore).  Version 00 has exactly four fields."""
        if not value:
            return None
        found = _TRACEPARENT.match(value.strip())
        if found is None or (found["version"] == "00" and value.strip().count("-") != 3):
            return None
        return cls(found["version"], found["trace_id"], found["parent_id"], found["flags"])

    @property
    def sampled(self) -> bool:
        return bool(int(self.flags, 16) & 1)

    def __str__(self) -> str:
        return f"{self.version}-{self.trace_id}-{self.parent_id}-{self.flags}"


@functools.cache
def _opentelemetry() -> tuple[Any, Any] | None:
    """(``opentelemetry.trace``, a W3C propagator) if ``opentelemetry-api`` is installed."""
    try:
        trace = importlib.import_module("opentelemetry.trace")
        tracecontext = importlib.import_module("opentelemetry.trace.propagation.tracecontext")
    except ImportError:
        return None
    return trace, tracecontext.TraceContextTextMapPropagator()


def enabled() -> bool:
    """Whether :func:`span` opens OpenTelemetry spans (``opentelemetry-api`` is importable)."""
    return _opentelemetry() is not None


_NO_SPAN = nullcontext()


def span(
    name: str, traceparent: str | None, attributes: Mapping[str, str | int] | None = None
) -> AbstractContextManager[None]:
    """An OpenTelemetry consumer span around the block, child of ``traceparent``
    (a new trace if it is None); nothing at all without OpenTelemetry."""
    otel = _opentelemetry()
    if otel is None:
        return _NO_SPAN  # once per handled message: not even a generator
    return _span(otel, name, traceparent, attributes)


@contextmanager
def _span(
    otel: tuple[Any, Any], name: str, traceparent: str | None, attributes: Mapping[str, str | int] | None
) -> Iterator[None]:
    trace, propagator = otel
    parent = propagator.extract({"traceparent": traceparent}) if traceparent else None
    tracer = trace.get_tracer(TRACER_NAME)
    with tracer.start_as_current_span(
        name, context=parent, kind=trace.SpanKind.CONSUMER, attributes=dict(attributes or {})
    ):
        yield
