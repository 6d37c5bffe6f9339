"""Log lines that say which workflow, step and attempt they are about — in every process.

Code logs with ``extra={"correlation_id": …, "step": …, "attempt": …}``, or runs
inside :func:`log_context` (the runner does, around every handler, so a handler's
own log lines need no ``extra``), and the formatters put those fields into each
line: after the message as ``[correlation_id=… step=… attempt=…]`` (:class:`TextFormatter`),
or as members of one JSON object per line (:class:`JsonFormatter`), with the
message type and the W3C ``traceparent`` (and its trace id) as well.

Logging is configured only at entry points: :func:`configure_logging`.  The
controller and the example workers use it through ``streamsaga --log-format``;
a worker of your own calls it from its ``main``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Literal, TextIO

import orjson

from participants.sdk import tracing

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")

TEXT_FIELDS = ("correlation_id", "step", "attempt")
"""The fields a text line shows, in this order."""
CONTEXT_FIELDS = (*TEXT_FIELDS, "message_type", "traceparent")
"""The fields a record takes from ``extra=`` or from :func:`log_context`; a JSON line shows them all."""
TEXT_LAYOUT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_EMPTY: Mapping[str, object] = MappingProxyType({})
_CONTEXT: ContextVar[Mapping[str, object]] = ContextVar("streamsaga_log_context", default=_EMPTY)


@contextmanager
def log_context(**fields: object) -> Iterator[None]:
    """Within the block (and the tasks it starts), every log line carries ``fields``
    (None values are left out) unless the record brings its own."""
    given = {name: value for name, value in fields.items() if value is not None}
    token = _CONTEXT.set(MappingProxyType({**_CONTEXT.get(), **given}))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def context_of(record: logging.LogRecord) -> dict[str, object]:
    """The context fields of ``record``: its own (from ``extra=``) over the current :func:`log_context`."""
    found = {name: value for name, value in _CONTEXT.get().items() if name in CONTEXT_FIELDS}
    for name in CONTEXT_FIELDS:
        value = getattr(record, name, None)
        if value is not None:
            found[name] = value
    return found


class ContextFilter(logging.Filter):
    """Stamps the current :func:`log_context` onto each record it sees (where the record
    has no value of its own), so a handler that formats later — or a test reading
    records — still has the fields."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in context_of(record).items():
            setattr(record, name, value)
        return True


class TextFormatter(logging.Formatter):
    """A readable line: time, level, logger, message, then ``[correlation_id=… step=… attempt=…]``
    with whichever of those the record has."""

    def __init__(self, fmt: str = TEXT_LAYOUT) -> None:
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = context_of(record)
        shown = " ".join(f"{name}={fields[name]}" for name in TEXT_FIELDS if name in fields)
        if not shown:
            return line
        # the traceback (if any) stays last, so the fields belong to the first line
        first, newline, rest = line.partition("\n")
        return f"{first} [{shown}]{newline}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``msg``,
    the context fields the record has, ``trace_id`` when it has a valid ``traceparent``,
    and ``exc`` with the traceback of an exception."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, value in context_of(record).items():
            line[name] = value if isinstance(value, int | float | bool) else str(value)
        parsed = tracing.TraceParent.parse(str(line.get("traceparent", "")))
        if parsed is not None:
            line["trace_id"] = parsed.trace_id
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(line).decode()


def formatter(log_format: LogFormat) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return TextFormatter()
    raise ValueError(f"unknown log format {log_format!r}; one of {', '.join(LOG_FORMATS)}")


def configure_logging(level: str | int = "INFO", log_format: LogFormat = "text", stream: TextIO | None = None) -> None:
    """Send every log record at ``level`` and above to ``stream`` (standard error) in ``log_format``.

    For entry points only.  Like :func:`logging.basicConfig`, it changes nothing
    if the root logger has handlers already (say a test runner's).
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(formatter(log_format))
    logging.basicConfig(level=level, handlers=[handler])


OUTAGE_SETTLES_S = 1.0
"""How long a dependency must go without failing before a success ends its outage."""


class Outage:
    """Logs a failing dependency (Redis, mostly) without flooding the log: the first
    failure as a warning, then at most one reminder per ``every_s`` with the count of
    failures since, and the recovery.  A loop retrying twice a second through a
    minute-long outage writes three lines, not a hundred and twenty tracebacks.  One
    that flaps (fails, works, fails again: a Redis at its memory limit, requests that
    race) is one outage too: a success ends it only once :data:`OUTAGE_SETTLES_S` passed
    without a failure (``for_good``: at once, for a one-off operation that got through)."""

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        every_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.what = what
        self.every_s = every_s
        self.clock = clock
        self.failures = 0
        self._since: float | None = None
        self._told = 0.0  # when the last warning was written
        self._last_failure = 0.0

    @property
    def failing(self) -> bool:
        return self._since is not None

    def failed(self, error: BaseException) -> None:
        now = self._last_failure = self.clock()
        self.failures += 1
        if self._since is None:
            self._since = self._told = now
            self.logger.warning("%s failed: %s", self.what, _describe(error))
        elif now - self._told >= self.every_s:
            self._told = now
            self.logger.warning(
                "%s still failing after %.0fs (%d failures): %s",
                self.what,
                now - self._since,
                self.failures,
                _describe(error),
            )

    def recovered(self, for_good: bool = False) -> None:
        if self._since is None:
            return
        now = self.clock()
        if not for_good and now - self._last_failure < OUTAGE_SETTLES_S:
            return  # it failed moments ago: flapping, not over yet
        self.logger.info("%s works again after %.1fs (%d failures)", self.what, now - self._since, self.failures)
        self._since = None
        self.failures = 0


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
