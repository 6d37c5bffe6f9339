"""A client of ``text/event-stream`` (Server-Sent Events) over aiohttp.

:class:`EventStreamParser` turns the bytes of a stream into events exactly as the
WHATWG HTML standard's "event stream interpretation" says: lines end in CRLF, LF or
CR (also when a chunk splits them); ``:`` starts a comment; ``data`` lines join with
``\\n``; ``id`` sets the last event id, which persists from event to event (an ``id``
containing NUL is ignored); ``retry`` sets the reconnection delay; an event is
dispatched at a blank line, and only if it has data; an unfinished event at the end
of the stream is dropped.

:class:`EventSource` connects, yields events, and when the connection drops or the
server closes the stream, reconnects after the reconnection delay sending
``Last-Event-ID``, like a browser's ``EventSource``.  The caller decides when it has
seen enough (say a final ``end`` event) and stops iterating; it may also set
:attr:`EventSource.last_event_id` to resume elsewhere (say after an ``overflow``).
"""

from __future__ import annotations

import asyncio
import codecs
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from controller.progress import EVENT_STREAM

log = logging.getLogger(__name__)

DEFAULT_RETRY_S = 1.0
DEFAULT_MAX_FAILURES = 10
# A stream stays open as long as the server likes: no total or read limit, only one on connecting.
STREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=None)


@dataclass(frozen=True)
class ServerSentEvent:
    """One dispatched event: its type (``message`` unless named), its data, and the
    last event id in force when it was dispatched ("" if none was ever set)."""

    event: str = "message"
    data: str = ""
    id: str = ""

    def json(self) -> Any:
        """The data parsed as JSON; raises ``orjson.JSONDecodeError`` if it is not."""
        return orjson.loads(self.data)


class EventStreamParser:
    """Incremental parser of one ``text/event-stream`` connection; feed it bytes as they arrive."""

    def __init__(self, last_event_id: str = "") -> None:
        self.last_event_id = last_event_id
        self.retry_ms: int | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""  # text after the last line break
        self._after_cr = False  # the previous chunk ended in CR: a leading LF belongs to it
        self._at_start = True  # a byte order mark may open the stream
        self._event = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """The events completed by ``chunk``, in order."""
        text = self._decoder.decode(chunk)
        if self._at_start and text:
            text = text.removeprefix("\ufeff")
            self._at_start = False
        if self._after_cr and text.startswith("\n"):
            text = text[1:]
        if text:
            self._after_cr = text.endswith("\r")
        lines = (self._pending + text).replace("\r\n", "\n").replace("\r", "\n").split("\n")
        self._pending = lines.pop()
        events: list[ServerSentEvent] = []
        for line in lines:
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> ServerSentEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment, e.g. a keep-alive
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self.last_event_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry_ms = int(value)
        return None  # any other field is ignored

    def _dispatch(self) -> ServerSentEvent | None:
        event, data = self._event or "message", self._data
        self._event, self._data = "", []
        if not data:
            return None
        return ServerSentEvent(event=event, data="\n".join(data), id=self.last_event_id)


class EventSourceError(Exception):
    """The stream cannot be (re)opened: the server refused it, or could not be reached often enough."""

    def __init__(self, url: str, detail: str, *, status: int | None = None) -> None:
        super().__init__(f"{url}: {detail}")
        self.url = url
        self.detail = detail
        self.status = status


class EventSource:
    """Events of ``url``, reconnecting with ``Last-Event-ID`` when the stream drops or ends.

    A response other than ``200 text/event-stream`` raises :class:`EventSourceError`
    (a ``204`` ends the iteration: the server asks the client not to reconnect), as do
    a first connection that fails and, once connected, ``max_failures`` failed
    reconnection attempts in a row.  Iterate with
    ``contextlib.aclosing`` so the connection closes when you stop early.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        *,
        last_event_id: str = "",
        retry_s: float = DEFAULT_RETRY_S,
        max_failures: int = DEFAULT_MAX_FAILURES,
    ) -> None:
        self.session = session
        self.url = url
        self.last_event_id = last_event_id
        self.retry_s = retry_s
        self.max_failures = max_failures
        self.opened = asyncio.Event()  # set once a connection is open: the server has taken the client on

    async def events(self) -> AsyncGenerator[ServerSentEvent, None]:
        failures = 0
        while True:
            headers = {"Accept": EVENT_STREAM, "Cache-Control": "no-cache"}
            if self.last_event_id:
                headers["Last-Event-ID"] = self.last_event_id
            try:
                async with self.session.get(self.url, headers=headers, timeout=STREAM_TIMEOUT) as response:
                    if response.status == 204:
                        return
                    await self._check(response)
                    failures = 0
                    self.opened.set()
                    parser = EventStreamParser(self.last_event_id)
                    async for chunk in response.content.iter_any():
                        for event in parser.feed(chunk):
                            self.last_event_id = event.id
                            yield event
                        if parser.retry_ms is not None:
                            self.retry_s = parser.retry_ms / 1000
                log.debug("%s: the server closed the stream; resuming after %r", self.url, self.last_event_id)
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
                failures += 1
                if not self.opened.is_set():
                    raise EventSourceError(self.url, f"cannot connect: {exc or type(exc).__name__}") from exc
                if failures >= self.max_failures:
                    raise EventSourceError(self.url, f"cannot reconnect ({failures} tries): {exc}") from exc
                log.debug("%s: %s; reconnecting (try %d)", self.url, exc or type(exc).__name__, failures)
            # the reconnection delay of the protocol (the server may change it with `retry:`)
            await asyncio.sleep(self.retry_s)

    async def _check(self, response: aiohttp.ClientResponse) -> None:
        if response.status == 200 and response.content_type == EVENT_STREAM:
            return
        detail = str(problem_of(await response.read()).get("detail") or "")
        raise EventSourceError(
            self.url, f"{response.status} {response.content_type}: {detail[:300]}", status=response.status
        )


def problem_of(raw: bytes | str) -> dict[str, Any]:
    """An error answer's ``application/problem+json`` document; for a body that is not
    one, ``{"detail": <the body's text>}``."""
    try:
        problem = orjson.loads(raw)
    except orjson.JSONDecodeError:
        problem = None
    if isinstance(problem, dict):
        return problem
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    return {"detail": text.strip()}
