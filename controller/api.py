"""The HTTP API: its routes, their handlers, and the one middleware that answers
every error with an ``application/problem+json`` document (see :mod:`controller.errors`).

The process state the handlers use lives on the application under the typed keys
below; :func:`controller.app.create_app` fills them.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from contracts import naming
from contracts.definitions import ORDER_SAGA, WorkflowDefinition
from contracts.envelope import utcnow
from contracts.messages import CANCEL_REQUESTED, PAYLOADS, RETRY_REQUESTED, OrderIn
from controller import dead_letters, liveness, openapi
from controller.definitions import Definitions, UnknownWorkflow
from controller.errors import (
    ApiError,
    BodyTooLarge,
    DeadLetterNotFound,
    DeadLetterNotReplayable,
    DefinitionNotFound,
    FieldError,
    IdempotencyKeyReused,
    InvalidInput,
    MalformedBody,
    MethodNotAllowed,
    RouteNotFound,
    StartOutcomeUnknown,
    Unavailable,
    UnsupportedMediaType,
    WorkflowNotFound,
    WorkflowStateConflict,
    field_errors,
)
from controller.instance import HIDDEN_FIELDS, SUMMARY_FIELDS, Instance, WorkflowStatus
from controller.progress import FeedFilter, ProgressHub, decode_cursor, stream_feed, stream_workflow
from controller.settings import ControllerSettings
from controller.state_machine import NotAllowed, effective_sla
from controller.store import IdempotencyConflict, StartUncertain, WorkflowStore
from participants.sdk import tracing
from participants.sdk.connection import refusing_writes
from participants.sdk.logs import Outage

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_BODY_BYTES = openapi.MAX_BODY_BYTES
MAX_LIST_LIMIT = openapi.MAX_LIST_LIMIT
JSON = openapi.JSON
PROBLEM_JSON = openapi.PROBLEM_JSON
PING_TIMEOUT_S = 2.0

SETTINGS = web.AppKey("settings", ControllerSettings)
REDIS = web.AppKey("redis", Redis)
STORE = web.AppKey("store", WorkflowStore)
DEFINITIONS = web.AppKey("definitions", Definitions)
CONTRACTS = web.AppKey("contracts", bytes)  # the JSON Schemas, serialised once
CORRELATOR_READY = web.AppKey("correlator_ready", asyncio.Event)  # set while the correlator's groups exist and it runs
# the API's requests failing on Redis, logged without a flood: unreachable, or refusing writes
REDIS_OUTAGE = web.AppKey("redis_outage", Outage)
REDIS_REFUSING = web.AppKey("redis_refusing", Outage)
PROGRESS = web.AppKey("progress", ProgressHub)  # the live progress feeds' one reader; .clients counts them

_IDEMPOTENCY_KEY = re.compile(openapi.IDEMPOTENCY_KEY_PATTERN)
# W3C Trace Context: version-traceid-parentid-flags; an invalid header is ignored, as the spec asks.

routes = web.RouteTableDef()


# --- errors ------------------------------------------------------------------------


class _HttpError(ApiError):
    """An error aiohttp raised itself (for instance a malformed request line)."""

    slug = "http"

    def __init__(self, exc: web.HTTPException) -> None:
        super().__init__(exc.text or exc.reason)
        self.status = exc.status
        self.title = exc.reason


@web.middleware
async def problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every error as an RFC 9457 problem document — the only place errors become HTTP."""
    headers: dict[str, str] = {}
    try:
        return await handler(request)
    except ApiError as exc:
        error = exc
    except web.HTTPRequestEntityTooLarge:
        error = BodyTooLarge(MAX_BODY_BYTES)
    except web.HTTPNotFound:
        error = RouteNotFound(request.path)
    except web.HTTPMethodNotAllowed as exc:
        error = MethodNotAllowed(request.method, exc.allowed_methods)
        headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = _HttpError(exc)
    except RedisError as exc:
        refused = refusing_writes(exc)
        request.app[REDIS_REFUSING if refused else REDIS_OUTAGE].failed(exc)  # once, then every 30 s
        error = Unavailable(f"Redis refuses writes: {exc}" if refused else f"Redis did not answer: {exc}")
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        error = ApiError("an unexpected error occurred; the controller's log has the details")
    if error.status >= 500 and not isinstance(error, Unavailable):  # Unavailable was logged where it arose
        log.warning("%s %s -> %d: %s", request.method, request.path, error.status, error.detail)
    else:
        log.debug("%s %s -> %d: %s", request.method, request.path, error.status, error.detail)
    return _problem(error, request, {**headers, **error.headers()})


def _problem(error: ApiError, request: web.Request, headers: dict[str, str]) -> web.Response:
    errors = error.errors or ([FieldError(error.field, error.detail)] if error.field else [])
    body = {
        "type": error.type,
        "title": error.title,
        "status": error.status,
        "detail": error.detail,
        "instance": request.path,
        "field": error.field,
        "errors": [{"field": e.field, "message": e.message} for e in errors],
        **error.extensions(),
    }
    return web.Response(status=error.status, body=orjson.dumps(body), content_type=PROBLEM_JSON, headers=headers)


# --- request and response helpers --------------------------------------------------


def _json(data: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type=JSON, headers=headers)


async def _json_body(request: web.Request) -> Any:
    """The parsed JSON body: 415 unless JSON, 413 beyond the size limit, 400 unless it parses."""
    if request.content_type != JSON:
        raise UnsupportedMediaType(request.headers.get("Content-Type", "(none)"), JSON)
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise BodyTooLarge(MAX_BODY_BYTES)
    raw = await request.read()  # aiohttp stops at client_max_size; the middleware maps that to 413
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedBody(f"the body is not valid JSON: {exc}") from None


def _idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is not None and not _IDEMPOTENCY_KEY.match(key):
        raise InvalidInput.of("Idempotency-Key", "must be 1 to 200 visible ASCII characters")
    return key


def _traceparent(request: web.Request) -> str | None:
    """The request's W3C ``traceparent``, or None when it has none or an invalid one
    (the spec says to ignore it then): the same check the workers' logs make."""
    value = request.headers.get("traceparent")
    return value.strip() if value is not None and tracing.TraceParent.parse(value) is not None else None


def _limit(request: web.Request) -> int:
    """``?limit=`` of a listing: 1 to MAX_LIST_LIMIT, default 100."""
    raw_limit = request.query.get("limit", "100")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIST_LIMIT:
        raise InvalidInput.of("limit", f"must be an integer from 1 to {MAX_LIST_LIMIT}, not {raw_limit!r}")
    return int(raw_limit)


def _links(workflow_id: str) -> dict[str, str]:
    self_ = f"/v1/workflows/{workflow_id}"
    return {"self": self_, "history": f"{self_}/history"}


def _summary(instance: Instance) -> dict[str, Any]:
    data = instance.model_dump(mode="json", include=SUMMARY_FIELDS)
    return {"workflow_id": instance.id, **data, "links": _links(instance.id)}


def _detail(instance: Instance) -> dict[str, Any]:
    data = instance.model_dump(mode="json", exclude=HIDDEN_FIELDS)
    return {"workflow_id": instance.id, **data, "links": _links(instance.id)}


async def _load(request: web.Request) -> Instance:
    workflow_id = request.match_info["id"]
    instance = await request.app[STORE].load(workflow_id)
    request.app[REDIS_OUTAGE].recovered()  # Redis answered
    if instance is None:
        raise WorkflowNotFound(workflow_id)
    return instance


def _sla_seconds(request: web.Request, definition: WorkflowDefinition) -> float | None:
    raw = request.query.get("sla_seconds")
    if raw is None:
        return None
    try:
        requested = float(raw)
        effective_sla(definition, requested)
    except ValueError as exc:
        message = "must be a number of seconds" if "could not convert" in str(exc) else str(exc)
        raise InvalidInput.of("sla_seconds", message) from None
    return requested


def _checked(check: Callable[[], T], found: list[FieldError]) -> T | None:
    """``check()``, or None with its problems added to ``found`` when it raises InvalidInput."""
    try:
        return check()
    except InvalidInput as exc:
        found.extend(exc.errors)
        return None


async def _start(
    request: web.Request, definition: WorkflowDefinition, payload: dict[str, Any] | None, invalid: list[FieldError]
) -> web.Response:
    """Start ``definition`` with ``payload``; 422 listing what is wrong with the body (``invalid``, with
    ``payload`` None) and with the request's Idempotency-Key and ``?sla_seconds=`` at once."""
    key = _checked(lambda: _idempotency_key(request), invalid)
    sla_s = _checked(lambda: _sla_seconds(request, definition), invalid)
    if invalid:
        raise InvalidInput(invalid)
    assert payload is not None
    traceparent = _traceparent(request)
    try:
        instance, created = await request.app[STORE].start(
            definition, payload, utcnow(), idempotency_key=key, traceparent=traceparent, sla_s=sla_s
        )
    except IdempotencyConflict as exc:
        raise IdempotencyKeyReused(exc.key) from None
    except StartUncertain as exc:
        request.app[REDIS_OUTAGE].failed(exc.cause)
        raise StartOutcomeUnknown(exc.workflow_id, _links(exc.workflow_id)["self"], str(exc.cause)) from None
    request.app[REDIS_OUTAGE].recovered()  # a start went through: Redis answers and takes writes
    request.app[REDIS_REFUSING].recovered()
    log.info(
        "%s %s workflow %s",
        "started" if created else "replayed",
        definition.name,
        instance.id,
        extra={"correlation_id": instance.id, "traceparent": traceparent},
    )
    links = _links(instance.id)
    headers = {"Location": links["self"]}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    body = {"workflow_id": instance.id, "status": instance.status.value, "links": links}
    return _json(body, status=202, headers=headers)


# --- routes ------------------------------------------------------------------------


@routes.post("/v1/orders")
async def start_order(request: web.Request) -> web.Response:
    """Start an order saga; the body is an ``OrderIn``."""
    definitions = request.app[DEFINITIONS]
    try:
        definition = definitions.latest(ORDER_SAGA.name)
    except UnknownWorkflow:  # a controller started --without-order-saga: whatever the body
        raise DefinitionNotFound(ORDER_SAGA.name, definitions.names()) from None
    body = await _json_body(request)
    try:
        order = OrderIn.model_validate(body)
    except ValidationError as exc:
        return await _start(request, definition, None, field_errors(exc))
    return await _start(request, definition, {"order": order.model_dump(mode="json", exclude_none=True)}, [])


@routes.post("/v1/workflows/{name}")
async def start_workflow(request: web.Request) -> web.Response:
    """Start any defined workflow; the body is the payload of its start event, as is."""
    name = request.match_info["name"]
    definitions = request.app[DEFINITIONS]
    try:
        definition = definitions.latest(name)
    except UnknownWorkflow:
        raise DefinitionNotFound(name, definitions.names()) from None
    body = await _json_body(request)
    if not isinstance(body, dict):
        invalid = [FieldError("body", f"must be a JSON object: the payload of {definition.start}")]
        return await _start(request, definition, None, invalid)
    model = PAYLOADS.get(definition.start)  # a type without a registered model takes any object
    if model is not None:
        try:
            model.model_validate(body)
        except ValidationError as exc:
            return await _start(request, definition, None, field_errors(exc))
    return await _start(request, definition, body, [])


@routes.get("/v1/workflows")
async def list_workflows(request: web.Request) -> web.Response:
    """The most recently updated workflows, newest first; ``?status=`` filters, ``?limit=`` caps."""
    status: WorkflowStatus | None = None
    if (raw_status := request.query.get("status")) is not None:
        try:
            status = WorkflowStatus(raw_status)
        except ValueError:
            known = ", ".join(s.value for s in WorkflowStatus)
            raise InvalidInput.of("status", f"unknown status {raw_status!r}; one of {known}") from None
    instances = await request.app[STORE].list(status, _limit(request))
    return _json({"workflows": [_summary(instance) for instance in instances]})


@routes.get("/v1/workflows/{id}")
async def get_workflow(request: web.Request) -> web.Response:
    """A workflow's state: status, error, and each step with its timestamps."""
    return _json(_detail(await _load(request)))


@routes.get("/v1/workflows/{id}/history")
async def get_history(request: web.Request) -> web.Response:
    """Every message a workflow received or sent, oldest first."""
    instance = await _load(request)
    entries = await request.app[STORE].history(instance.id)
    return _json({"workflow_id": instance.id, "events": [entry.model_dump(mode="json") for entry in entries]})


class _OperatorRequestIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    by: str | None = Field(default=None, min_length=1, max_length=200)
    reason: str | None = Field(default=None, max_length=1000)


async def _operator_request(request: web.Request, message_type: str) -> web.Response:
    workflow_id = request.match_info["id"]
    payload: dict[str, Any] = {}
    if request.can_read_body:
        try:
            payload = _OperatorRequestIn.model_validate(await _json_body(request)).model_dump(exclude_none=True)
        except ValidationError as exc:
            raise InvalidInput.from_validation(exc) from None
    try:
        updated = await request.app[STORE].request(
            request.app[DEFINITIONS], workflow_id, message_type, payload, utcnow()
        )
    except NotAllowed as exc:
        raise WorkflowStateConflict(workflow_id, str(exc)) from None
    except LookupError:
        raise WorkflowNotFound(workflow_id) from None
    log.info("%s for workflow %s: %s", message_type, workflow_id, payload, extra={"correlation_id": workflow_id})
    return _json(_detail(updated), status=202)


@routes.post("/v1/workflows/{id}/cancel")
async def cancel_workflow(request: web.Request) -> web.Response:
    """Cancel a running workflow: it compensates what it completed.  Body (optional): ``{by, reason}``."""
    return await _operator_request(request, CANCEL_REQUESTED)


@routes.post("/v1/workflows/{id}/retry")
async def retry_workflow(request: web.Request) -> web.Response:
    """Resume the compensation of a workflow that needs attention.  Body (optional): ``{by, reason}``."""
    return await _operator_request(request, RETRY_REQUESTED)


@routes.get("/v1/participants")
async def list_participants(request: web.Request) -> web.Response:
    """Every participant with a heartbeat (its consumers, live or not, and its
    subscriptions with their lag), the controller group's lag, and every step no
    live worker subscribes to.  See :mod:`controller.liveness`."""
    settings = request.app[SETTINGS]
    definitions = request.app[DEFINITIONS]
    found = await liveness.survey(
        request.app[REDIS],
        settings.partitions,
        definitions.event_types(),
        forget_after_s=settings.liveness_forget_s,
    )
    uncovered = liveness.uncovered_steps(definitions, found.participants)
    uncovered = await liveness.waiting(request.app[REDIS], settings.partitions, uncovered)
    return _json(
        {
            "participants": [view.as_json() for view in found.participants],
            "controller": found.controller.as_json(),
            "uncovered": [missing.as_json() for missing in uncovered],
        }
    )


# --- live progress (Server-Sent Events, see controller.progress) -----------------------

_SEQ = re.compile(r"^[0-9]{1,18}$")


def _last_event_id(request: web.Request) -> tuple[str, str] | None:
    """(value, its name) of the ``Last-Event-ID`` header (as EventSource sends it on reconnecting),
    else of ``?last_event_id=`` for clients that cannot set headers."""
    for name, value in (
        ("Last-Event-ID", request.headers.get("Last-Event-ID")),
        ("last_event_id", request.query.get("last_event_id")),
    ):
        if value:
            return value.strip(), name
    return None


def _query_set(request: web.Request, name: str, known: list[str]) -> frozenset[str] | None:
    """A comma-separated query parameter whose every value is in ``known``; None if absent."""
    raw = request.query.get(name)
    if raw is None:
        return None
    values = frozenset(value.strip() for value in raw.split(","))
    unknown = sorted(values - set(known))
    if unknown:
        raise InvalidInput.of(name, f"unknown {', '.join(map(repr, unknown))}; one or more of {', '.join(known)}")
    return values


@routes.get("/v1/workflows/{id}/events")
async def workflow_events(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events of one workflow: its history, then each new line as it is correlated
    (``id:`` its ``seq``), and a final ``end`` once it is terminal.  ``Last-Event-ID`` resumes."""
    after = None
    if (given := _last_event_id(request)) is not None:
        value, name = given
        if not _SEQ.match(value):
            raise InvalidInput.of(name, f"must be the id of an event of this stream (a line's seq), not {value!r}")
        after = int(value)
    instance = await _load(request)
    return await stream_workflow(request, request.app[PROGRESS], request.app[REDIS], instance, after)


@routes.get("/v1/events")
async def events_feed(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events of every workflow's new history lines, live; ``?workflow=`` (definitions)
    and ``?status=`` (the workflow's status after the line) filter; ``Last-Event-ID`` resumes."""
    feed_filter = FeedFilter(
        workflows=_query_set(request, "workflow", request.app[DEFINITIONS].names()),
        statuses=_query_set(request, "status", [status.value for status in WorkflowStatus]),
    )
    cursor = None
    if (given := _last_event_id(request)) is not None:
        value, name = given
        try:
            cursor = decode_cursor(value, request.app[SETTINGS].partitions)
        except ValueError as exc:
            raise InvalidInput.of(name, str(exc)) from None
    return await stream_feed(request, request.app[PROGRESS], request.app[REDIS], feed_filter, cursor)


# --- dead letters ------------------------------------------------------------------


def _dead_letter_id(request: web.Request) -> str:
    dead_letter_id = request.match_info["id"]
    try:
        dead_letters.DeadLetterId.parse(dead_letter_id)
    except dead_letters.InvalidDeadLetterId as exc:
        raise InvalidInput.of("id", str(exc)) from None
    return dead_letter_id


def _dead_letter_view(letter: dead_letters.DeadLetter) -> dict[str, Any]:
    self_ = f"/v1/dead-letters/{letter.id}"
    links = {"self": self_, "replay": f"{self_}/replay"}
    if letter.correlation_id:
        links["workflow"] = f"/v1/workflows/{letter.correlation_id}"
    return {**letter.model_dump(mode="json"), "links": links}


def _query_text(request: web.Request, name: str) -> str | None:
    value = request.query.get(name)
    if value is not None and not value:
        raise InvalidInput.of(name, "must not be empty; leave it out to match any")
    return value


@routes.get("/v1/dead-letters")
async def list_dead_letters(request: web.Request) -> web.Response:
    """Dead letters of every partition, newest first; ``?group=``, ``?type=``, ``?workflow_id=`` filter,
    ``?limit=`` caps."""
    found = await dead_letters.list_dead_letters(
        request.app[REDIS],
        request.app[STORE].partitions,
        limit=_limit(request),
        group=_query_text(request, "group"),
        type=_query_text(request, "type"),
        workflow_id=_query_text(request, "workflow_id"),
    )
    return _json({"dead_letters": [_dead_letter_view(letter) for letter in found]})


class _PurgeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    older_than_s: float | None = Field(default=None, ge=0, le=100 * 365 * 86_400)


@routes.post("/v1/dead-letters/purge")
async def purge_dead_letters(request: web.Request) -> web.Response:
    """Delete every dead letter, or (body ``{"older_than_s": N}``) those older than N seconds."""
    body = _PurgeIn()
    if request.can_read_body:
        try:
            body = _PurgeIn.model_validate(await _json_body(request))
        except ValidationError as exc:
            raise InvalidInput.from_validation(exc) from None
    older_than_ms = None if body.older_than_s is None else round(body.older_than_s * 1000)
    purged = await dead_letters.purge(request.app[REDIS], request.app[STORE].partitions, older_than_ms=older_than_ms)
    if older_than_ms is None:
        log.info("purged every dead letter: %d", purged)
    else:
        log.info("purged %d dead letters older than %ss", purged, body.older_than_s)
    return _json({"purged": purged})


@routes.get("/v1/dead-letters/{id}")
async def get_dead_letter(request: web.Request) -> web.Response:
    """One dead letter: the reason, where it came from, who gave up, and its original fields."""
    dead_letter_id = _dead_letter_id(request)
    letter = await dead_letters.get(request.app[REDIS], dead_letter_id)
    if letter is None:
        raise DeadLetterNotFound(dead_letter_id)
    return _json(_dead_letter_view(letter))


@routes.post("/v1/dead-letters/{id}/replay")
async def replay_dead_letter(request: web.Request) -> web.Response:
    """Write a dead letter's original fields back to its source stream and delete it, atomically."""
    dead_letter_id = _dead_letter_id(request)
    store = request.app[STORE]
    try:
        letter, entry_id = await dead_letters.replay(
            request.app[REDIS], dead_letter_id, partitions=store.partitions, script=store.script
        )
    except dead_letters.NoSuchDeadLetter:
        raise DeadLetterNotFound(dead_letter_id) from None
    except dead_letters.NotReplayable as exc:
        raise DeadLetterNotReplayable(dead_letter_id, exc.reason) from None
    log.info(
        "replayed dead letter %s to %s as %s",
        dead_letter_id,
        letter.source_stream,
        entry_id,
        extra={"correlation_id": letter.correlation_id},
    )
    body: dict[str, Any] = {
        "dead_letter_id": dead_letter_id,
        "stream": letter.source_stream,
        "entry_id": entry_id,
        "type": letter.type,
        "correlation_id": letter.correlation_id,
        "message_id": letter.message_id,
    }
    if letter.correlation_id:
        body["links"] = {"workflow": f"/v1/workflows/{letter.correlation_id}"}
    return _json(body, status=202)


@routes.delete("/v1/dead-letters/{id}")
async def delete_dead_letter(request: web.Request) -> web.Response:
    """Delete one dead letter without replaying it."""
    dead_letter_id = _dead_letter_id(request)
    if not await dead_letters.purge(request.app[REDIS], request.app[STORE].partitions, ids=[dead_letter_id]):
        raise DeadLetterNotFound(dead_letter_id)
    log.info("deleted dead letter %s", dead_letter_id)
    return web.Response(status=204)


# --- the dashboard ------------------------------------------------------------------

STATIC_DIR = Path(__file__).parent / "static"
_STATIC_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*\.(?:js|css|svg|png)$")
# The page loads nothing but its own script and stylesheet and talks only to this API.
_DASHBOARD_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# Revalidate on every load (a cheap 304), so an upgraded controller never serves a stale page.
_NO_CACHE = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


@routes.get("/")
async def dashboard(request: web.Request) -> web.FileResponse:
    """The operator's dashboard: plain HTML, CSS and JavaScript from ``controller/static``."""
    return web.FileResponse(STATIC_DIR / "index.html", headers={**_NO_CACHE, "Content-Security-Policy": _DASHBOARD_CSP})


@routes.get("/static/{name}")
async def static_file(request: web.Request) -> web.FileResponse:
    """A file of the dashboard, by name; nothing outside ``controller/static`` and no listing."""
    name = request.match_info["name"]
    path = STATIC_DIR / name
    if not _STATIC_NAME.match(name) or not path.is_file():
        raise RouteNotFound(request.path)
    return web.FileResponse(path, headers=_NO_CACHE)


@routes.get("/v1/stats")
async def workflow_stats(request: web.Request) -> web.Response:
    """How many workflows are in each status (finished ones until they expire), and in all."""
    partitions = request.app[STORE].partitions
    statuses = list(WorkflowStatus)
    async with request.app[REDIS].pipeline(transaction=False) as pipe:
        for p in range(partitions):
            for status in statuses:
                pipe.zcard(naming.status_index_key(p, status))
        sizes: list[int] = await pipe.execute()
    counts = {status.value: sum(sizes[i :: len(statuses)]) for i, status in enumerate(statuses)}
    return _json({"counts": counts, "total": sum(counts.values())})


@routes.get("/v1/definitions")
async def list_definitions(request: web.Request) -> web.Response:
    """Every workflow definition this controller runs (each version), by name then version:
    the steps, who answers them and their deadlines."""
    definitions = request.app[DEFINITIONS]
    found = sorted(definitions, key=lambda d: (d.name, d.version))
    return _json({"definitions": [definition.model_dump(mode="json") for definition in found]})


@routes.get("/v1/contracts")
async def get_contracts(request: web.Request) -> web.Response:
    """The wire contract as JSON Schemas, by name (see :mod:`contracts.schema`)."""
    return web.Response(body=request.app[CONTRACTS], content_type=JSON)


@routes.get("/v1/openapi.json")
async def get_openapi(request: web.Request) -> web.Response:
    """This API as OpenAPI 3.1, built from the app's routes (see :mod:`controller.openapi`)."""
    bodies: dict[str, type[BaseModel]] = {"OperatorRequest": _OperatorRequestIn, "DeadLetterPurge": _PurgeIn}
    return _json(openapi.document(openapi.routes_of(request.app.router), bodies))


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """The process is alive and serving."""
    return _json({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """Ready when Redis answers PING and the correlator's consumer groups are prepared."""
    redis_ok = await _pings(request.app[REDIS], request.app[REDIS_OUTAGE])
    checks = {"redis": redis_ok, "correlator": request.app[CORRELATOR_READY].is_set()}
    if not all(checks.values()):
        failing = ", ".join(name for name, ok in checks.items() if not ok)
        raise Unavailable(f"not ready: {failing}", checks=checks)
    return _json({"status": "ready", "checks": checks})


async def _pings(redis: Redis, outage: Outage) -> bool:
    try:
        async with asyncio.timeout(PING_TIMEOUT_S):
            answered = bool(await redis.ping())
    except (RedisError, OSError, TimeoutError) as exc:
        outage.failed(exc)
        return False
    outage.recovered()
    return answered
