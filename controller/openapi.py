"""``GET /v1/openapi.json``: the HTTP API described as OpenAPI 3.1.  No I/O.

:func:`document` builds the description from the application's route table
(:func:`routes_of`) and :data:`OPERATIONS`, one entry per route: its summary,
parameters, request body and answers.  Path parameters are taken from the path;
every operation also answers ``default`` with a problem document
(``#/components/schemas/Problem``, RFC 9457, rendered by :func:`controller.api.problems`).

**Documenting a new route**: add an entry ``("METHOD", "/path/{param}"): Operation(...)``
to :data:`OPERATIONS`, with the path exactly as the route registers it.
``tests/controller/test_openapi.py`` fails for a route without an entry, and for an
entry without a route, so the description cannot drift from the routes.

**Schemas**: ``components.schemas`` holds

* every JSON Schema of the wire contract (:func:`contracts.schema.schemas`, what
  ``GET /v1/contracts`` serves) under its own name, with its ``$defs`` lifted into
  ``components.schemas`` beside it and its ``$ref``\\ s rewritten to point there,
  so every ``$ref`` of the document resolves within it (``$schema`` and ``$id`` are
  left out: the schema's ``externalDocs`` names where it comes from);
* the API's own bodies and answers, from the pydantic models that produce them;
* ``Problem``, once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from aiohttp import web
from pydantic import BaseModel

from contracts.schema import ID_PREFIX, schemas
from controller.dead_letters import DeadLetter
from controller.instance import HIDDEN_FIELDS, SUMMARY_FIELDS, HistoryEntry, Instance, StepState, WorkflowStatus
from controller.progress import EVENT_STREAM

OPENAPI_VERSION = "3.1.0"
JSON = "application/json"
PROBLEM_JSON = "application/problem+json"
SCHEMA_REF = "#/components/schemas/"
RESPONSE_REF = "#/components/responses/"
CONTRACTS_PATH = "/v1/contracts"

_STRING = {"type": "string"}
_PATH_PARAM = re.compile(r"{([^}:]+)(?::[^}]*)?}")


def ref(name: str) -> dict[str, Any]:
    """A reference to ``components.schemas[name]``."""
    return {"$ref": SCHEMA_REF + name}


# --- the per-route table ------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """A query, header or path parameter."""

    name: str
    where: Literal["query", "header", "path"]
    description: str
    schema: Mapping[str, Any] = field(default_factory=lambda: {"type": "string"})
    required: bool = False


@dataclass(frozen=True)
class Reply:
    """A successful answer: its description, body schema (none for an empty body) and headers."""

    description: str
    schema: Mapping[str, Any] | None = None
    media_type: str = JSON
    headers: Mapping[str, str] = field(default_factory=dict)  # name -> description
    extensions: Mapping[str, Any] = field(default_factory=dict)  # x-… members of the media type


@dataclass(frozen=True)
class Operation:
    """What :data:`OPERATIONS` says about one route."""

    summary: str
    tag: str
    replies: Mapping[int, Reply]
    description: str = ""
    params: tuple[Param, ...] = ()
    body: str | None = None  # the components.schemas name of its JSON body
    body_required: bool = True
    problems: tuple[int, ...] = ()  # statuses it answers with a problem document, besides `default`


# the limits the API publishes and enforces (controller.api)
MAX_BODY_BYTES = 1 << 20
MAX_LIST_LIMIT = 1_000
IDEMPOTENCY_KEY_PATTERN = r"^[\x21-\x7e]{1,200}$"

# Problem answers, by status: components.responses name and description.
PROBLEMS = {
    400: ("MalformedBody", "The body is not JSON."),
    404: ("NotFound", "No such resource (workflow, definition, dead letter or route)."),
    409: ("Conflict", "The request conflicts with the resource's state or an earlier request."),
    413: ("BodyTooLarge", f"The body exceeds {MAX_BODY_BYTES >> 20} MiB."),
    415: ("UnsupportedMediaType", "Content-Type is not application/json."),
    422: ("InvalidInput", "A field is missing, of the wrong type or out of range; `field` names it."),
    503: (
        "Unavailable",
        "Redis cannot be reached, or (readiness) a check fails; for a start, `start-outcome-unknown` with the "
        "`workflow_id` and `Location` the workflow has if it did start.",
    ),
}
BODY_PROBLEMS = (400, 413, 415, 422)

_WORKFLOW_ID = Param("id", "path", "The workflow id.", required=True)
_DEAD_LETTER_ID = Param("id", "path", "The dead letter id: `<partition>-<entry id>`.", required=True)
_LIMIT = Param(
    "limit", "query", "At most this many.", {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT, "default": 100}
)
_STATUS = Param("status", "query", "Only workflows in this status.", ref("WorkflowStatus"))
_IDEMPOTENCY_KEY = Param(
    "Idempotency-Key",
    "header",
    "The same key and body answer the same workflow; the same key with another body, 409.",
    {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN},
)
_TRACEPARENT = Param("traceparent", "header", "W3C Trace Context, carried into the start event (ignored if invalid).")
_SLA_SECONDS = Param(
    "sla_seconds",
    "query",
    "A tighter SLA than the definition's, in seconds.",
    {"type": "number", "exclusiveMinimum": 0},
)
_LAST_EVENT_ID = Param("Last-Event-ID", "header", "Resume after this event id (sent by EventSource on reconnecting).")
_ACCEPTED = Reply(
    "Accepted: the workflow is running (or, replayed, as it is now).",
    ref("WorkflowAccepted"),
    headers={
        "Location": "The workflow's URL.",
        "Idempotent-Replayed": "`true` when an Idempotency-Key repeated an earlier request.",
    },
)


def _operator_request(summary: str, answer: str, allowed_in: str) -> Operation:
    return Operation(
        summary,
        "operator",
        {202: Reply(answer, ref("Workflow"))},
        description=f"Recorded in the history.  409 `workflow-state-conflict` unless the workflow is {allowed_in}.",
        params=(_WORKFLOW_ID,),
        body="OperatorRequest",
        body_required=False,
        problems=(*BODY_PROBLEMS, 404, 409),
    )


_LAST_EVENT_ID_QUERY = Param("last_event_id", "query", "The same as `Last-Event-ID`, for clients that cannot set it.")
# The data of each kind of event of a stream, by the event's name.
_WORKFLOW_EVENTS = {
    "x-events": {
        "<history line type>": ref("ProgressEvent"),
        "end": ref("StreamEnd"),
        "overflow": ref("StreamOverflow"),
    }
}
_FEED_EVENTS = {"x-events": {"<history line type>": ref("ProgressEvent"), "overflow": ref("StreamOverflow")}}

OPERATIONS: dict[tuple[str, str], Operation] = {
    ("POST", "/v1/orders"): Operation(
        "Start an order saga",
        "workflows",
        {202: _ACCEPTED},
        description="The body is an order; unknown fields are rejected.  404 from a controller run "
        "`--without-order-saga`.",
        params=(_IDEMPOTENCY_KEY, _TRACEPARENT, _SLA_SECONDS),
        body="OrderIn",
        problems=(*BODY_PROBLEMS, 404, 409),
    ),
    ("POST", "/v1/workflows/{name}"): Operation(
        "Start any loaded workflow definition",
        "workflows",
        {202: _ACCEPTED},
        description="The body is the payload of the definition's start event (for `order`, an `OrderSubmitted`), "
        "validated against that type's schema when it has one.",
        params=(
            Param("name", "path", "The definition's name.", required=True),
            _IDEMPOTENCY_KEY,
            _TRACEPARENT,
            _SLA_SECONDS,
        ),
        body="StartPayload",
        problems=(*BODY_PROBLEMS, 404, 409),
    ),
    ("GET", "/v1/workflows"): Operation(
        "List the most recently updated workflows",
        "workflows",
        {200: Reply("Newest update first.", ref("WorkflowList"))},
        params=(_STATUS, _LIMIT),
        problems=(422,),
    ),
    ("GET", "/v1/workflows/{id}"): Operation(
        "A workflow: status, steps with their times and deadlines, error",
        "workflows",
        {200: Reply("The workflow.", ref("Workflow"))},
        params=(_WORKFLOW_ID,),
        problems=(404,),
    ),
    ("GET", "/v1/workflows/{id}/history"): Operation(
        "Every message a workflow received or sent, oldest first",
        "workflows",
        {200: Reply("The history.", ref("History"))},
        params=(_WORKFLOW_ID,),
        problems=(404,),
    ),
    ("GET", "/v1/workflows/{id}/events"): Operation(
        "A workflow's history, then its new lines live (Server-Sent Events)",
        "events",
        {
            200: Reply(
                "`id:` the line's `seq`, `event:` its type, `data:` a ProgressEvent; a final `end` (StreamEnd) "
                "once the workflow is completed, compensated or failed, then the server closes (as after an "
                "`overflow`, when the client fell behind: reconnect with `Last-Event-ID`).",
                _STRING,
                EVENT_STREAM,
                extensions=_WORKFLOW_EVENTS,
            )
        },
        params=(_WORKFLOW_ID, _LAST_EVENT_ID, _LAST_EVENT_ID_QUERY),
        problems=(404, 422),
    ),
    ("GET", "/v1/events"): Operation(
        "Every workflow's new history lines, live (Server-Sent Events)",
        "events",
        {
            200: Reply(
                "`id:` an opaque cursor, `event:` the line's type, `data:` a ProgressEvent; `overflow` "
                "(StreamOverflow) when the client fell behind, then the server closes: reconnect with "
                "`Last-Event-ID`.",
                _STRING,
                EVENT_STREAM,
                extensions=_FEED_EVENTS,
            )
        },
        params=(
            Param("workflow", "query", "Only these definitions (comma-separated names)."),
            Param(
                "status", "query", "Only lines after which the workflow is in one of these statuses (comma-separated)."
            ),
            _LAST_EVENT_ID,
            _LAST_EVENT_ID_QUERY,
        ),
        problems=(422,),
    ),
    ("POST", "/v1/workflows/{id}/cancel"): _operator_request(
        "Cancel a running workflow: it compensates what it completed", "Compensating.", "`running`"
    ),
    ("POST", "/v1/workflows/{id}/retry"): _operator_request(
        "Resume the compensation of a workflow that needs attention",
        "Compensating again, with a fresh attempt count.",
        "`needs_attention`",
    ),
    ("GET", "/v1/participants"): Operation(
        "Live workers, their subscriptions and lag, and steps no live worker covers",
        "participants",
        {200: Reply("See docs/api.md, Participants and liveness.", ref("Participants"))},
    ),
    ("GET", "/v1/dead-letters"): Operation(
        "Dead letters of every partition, newest first",
        "dead letters",
        {200: Reply("The dead letters.", ref("DeadLetterList"))},
        params=(
            _LIMIT,
            Param("group", "query", "Only those given up by this consumer group."),
            Param("type", "query", "Only messages of this type."),
            Param("workflow_id", "query", "Only messages of this workflow."),
        ),
        problems=(422,),
    ),
    ("POST", "/v1/dead-letters/purge"): Operation(
        "Delete every dead letter, or those older than N seconds",
        "dead letters",
        {200: Reply("How many were deleted.", ref("Purged"))},
        body="DeadLetterPurge",
        body_required=False,
        problems=BODY_PROBLEMS,
    ),
    ("GET", "/v1/dead-letters/{id}"): Operation(
        "One dead letter",
        "dead letters",
        {200: Reply("The dead letter.", ref("DeadLetter"))},
        params=(_DEAD_LETTER_ID,),
        problems=(404, 422),
    ),
    ("POST", "/v1/dead-letters/{id}/replay"): Operation(
        "Write a dead letter back to its stream and delete it, atomically",
        "dead letters",
        {202: Reply("Replayed.", ref("Replayed"))},
        params=(_DEAD_LETTER_ID,),
        problems=(404, 409, 422),
    ),
    ("DELETE", "/v1/dead-letters/{id}"): Operation(
        "Delete a dead letter without replaying it",
        "dead letters",
        {204: Reply("Deleted.")},
        params=(_DEAD_LETTER_ID,),
        problems=(404, 422),
    ),
    ("GET", "/v1/stats"): Operation(
        "How many workflows are in each status",
        "workflows",
        {200: Reply("Counts by status (finished workflows until they expire) and in all.", ref("Stats"))},
    ),
    ("GET", "/v1/definitions"): Operation(
        "The workflow definitions this controller runs, every version",
        "contracts",
        {
            200: Reply(
                "By name, then version; the newest version of a name is the one new workflows start with.",
                ref("DefinitionList"),
            )
        },
    ),
    ("GET", "/v1/contracts"): Operation(
        "The wire contract as JSON Schemas, by name",
        "contracts",
        {200: Reply("Each schema is also in this document's components.schemas, by the same name.", ref("Contracts"))},
    ),
    ("GET", "/v1/openapi.json"): Operation(
        "This description of the API (OpenAPI 3.1)",
        "contracts",
        {200: Reply("An OpenAPI 3.1 document.", {"type": "object"})},
    ),
    ("GET", "/healthz"): Operation(
        "Liveness: the process serves",
        "health",
        {200: Reply("Alive.", ref("Health"))},
    ),
    ("GET", "/readyz"): Operation(
        "Readiness: Redis answers and the correlator's consumer groups exist",
        "health",
        {200: Reply("Ready.", ref("Ready"))},
        description="503 names the failing checks in `checks`.",
        problems=(503,),
    ),
    ("GET", "/metrics"): Operation(
        "The controller's metrics for Prometheus",
        "health",
        {200: Reply("The Prometheus text format (OpenMetrics if `Accept` asks for it).", _STRING, "text/plain")},
        problems=(503,),
    ),
    ("GET", "/"): Operation(
        "The operator's dashboard",
        "dashboard",
        {200: Reply("The page.", {"type": "string"}, media_type="text/html")},
    ),
    ("GET", "/static/{name}"): Operation(
        "A file of the dashboard (script, stylesheet, image)",
        "dashboard",
        {200: Reply("The file.", {"type": "string"}, media_type="*/*")},
        params=(Param("name", "path", "The file's name.", required=True),),
        problems=(404,),
    ),
}


# --- schemas -------------------------------------------------------------------------

_DATETIME = {"type": "string", "format": "date-time"}
_LINKS = {"type": "object", "additionalProperties": _STRING, "description": "Related URLs by relation."}


# Answers that a pydantic model produces, by schema name (their nested models land beside them).
ANSWER_MODELS: dict[str, type[BaseModel]] = {
    "HistoryEntry": HistoryEntry,
    "StepState": StepState,
    "DeadLetter": DeadLetter,
}


def _hand_written() -> dict[str, dict[str, Any]]:
    """Schemas of answers no single model produces: add yours here."""
    return {
        "Problem": {
            "type": "object",
            "description": "An error (RFC 9457), served as application/problem+json.",
            "required": ["type", "title", "status", "detail", "instance", "field", "errors"],
            "properties": {
                "type": {"type": "string", "description": "`urn:streamsaga:problem:<slug>`, e.g. `…:invalid-input`."},
                "title": _STRING,
                "status": {"type": "integer"},
                "detail": _STRING,
                "instance": {"type": "string", "description": "The request's path."},
                "field": {
                    "type": ["string", "null"],
                    "description": "What to fix: a body field by its dot-joined path, or a header, query or path "
                    "parameter by its name.",
                },
                "errors": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["field", "message"],
                        "properties": {"field": _STRING, "message": _STRING},
                    },
                },
            },
            "additionalProperties": True,
        },
        "StartPayload": {
            "type": "object",
            "description": "The payload of the definition's start event; for `order` see "
            "`#/components/schemas/OrderSubmitted`.",
            "additionalProperties": True,
        },
        "WorkflowAccepted": {
            "type": "object",
            "required": ["workflow_id", "status", "links"],
            "properties": {"workflow_id": _STRING, "status": ref("WorkflowStatus"), "links": _LINKS},
        },
        "WorkflowList": {
            "type": "object",
            "required": ["workflows"],
            "properties": {"workflows": {"type": "array", "items": ref("WorkflowSummary")}},
        },
        "History": {
            "type": "object",
            "required": ["workflow_id", "events"],
            "properties": {"workflow_id": _STRING, "events": {"type": "array", "items": ref("HistoryEntry")}},
        },
        "ProgressEvent": {
            "description": "The data of a history-line event of a stream (the event's name is the line's `type`): "
            "the line, its workflow, and the workflow's status after it.",
            "allOf": [
                ref("HistoryEntry"),
                {
                    "type": "object",
                    "required": ["workflow_id", "workflow"],
                    "properties": {"workflow_id": _STRING, "workflow": ref("WorkflowRef")},
                },
            ],
        },
        "StreamEnd": {
            "type": "object",
            "description": "The data of the final `end` event of a workflow's stream; the server closes after it.",
            "required": ["workflow_id", "status"],
            "properties": {
                "workflow_id": _STRING,
                "status": ref("WorkflowStatus"),
                "finished_at": {"anyOf": [_DATETIME, {"type": "null"}]},
            },
        },
        "StreamOverflow": {
            "type": "object",
            "description": "The data of an `overflow` event: the server closes; reconnect with "
            "`Last-Event-ID: <last_event_id>`.",
            "required": ["reason", "last_event_id"],
            "properties": {"reason": _STRING, "last_event_id": _STRING},
        },
        "DeadLetterList": {
            "type": "object",
            "required": ["dead_letters"],
            "properties": {"dead_letters": {"type": "array", "items": ref("DeadLetter")}},
        },
        "Replayed": {
            "type": "object",
            "required": ["dead_letter_id", "stream", "entry_id"],
            "properties": {
                "dead_letter_id": _STRING,
                "stream": _STRING,
                "entry_id": _STRING,
                "type": {"type": ["string", "null"]},
                "correlation_id": {"type": ["string", "null"]},
                "message_id": {"type": ["string", "null"]},
                "links": _LINKS,
            },
        },
        "Purged": {"type": "object", "required": ["purged"], "properties": {"purged": {"type": "integer"}}},
        "Participants": {
            "type": "object",
            "required": ["participants", "controller", "uncovered"],
            "properties": {
                "participants": {"type": "array", "items": {"type": "object"}},
                "controller": {"type": "object"},
                "uncovered": {"type": "array", "items": {"type": "object"}},
            },
        },
        "Stats": {
            "type": "object",
            "required": ["counts", "total"],
            "properties": {
                "counts": {
                    "type": "object",
                    "properties": {status.value: {"type": "integer"} for status in WorkflowStatus},
                    "additionalProperties": {"type": "integer"},
                },
                "total": {"type": "integer"},
            },
        },
        "DefinitionList": {
            "type": "object",
            "required": ["definitions"],
            "properties": {"definitions": {"type": "array", "items": ref("WorkflowDefinition")}},
        },
        "Health": {"type": "object", "properties": {"status": {"const": "ok"}}},
        "Ready": {
            "type": "object",
            "properties": {
                "status": {"const": "ready"},
                "checks": {"type": "object", "additionalProperties": {"type": "boolean"}},
            },
        },
    }


class _Components:
    """``components.schemas``, refusing two different schemas under one name."""

    def __init__(self) -> None:
        self.schemas: dict[str, dict[str, Any]] = {}

    def add(self, name: str, schema: dict[str, Any]) -> None:
        known = self.schemas.setdefault(name, schema)
        if known != schema:
            raise ValueError(f"two different schemas are named {name!r} in components.schemas")

    def add_lifted(self, name: str, schema: dict[str, Any]) -> None:
        """A JSON Schema with ``$defs``: the definitions beside it, every ``$ref`` rewritten to match."""
        body = _rewrite_refs(dict(schema))
        for def_name, definition in body.pop("$defs", {}).items():
            self.add(def_name, definition)
        self.add(name, body)

    def add_model(self, name: str, model: type[BaseModel], mode: Literal["validation", "serialization"]) -> None:
        schema = model.model_json_schema(mode=mode, ref_template=SCHEMA_REF + "{model}")
        schema["title"] = name
        self.add_lifted(name, schema)


def _rewrite_refs(node: Any) -> Any:
    if isinstance(node, dict):
        out = {key: _rewrite_refs(value) for key, value in node.items()}
        target = out.get("$ref")
        if isinstance(target, str) and target.startswith("#/$defs/"):
            out["$ref"] = SCHEMA_REF + target.removeprefix("#/$defs/")
        return out
    if isinstance(node, list):
        return [_rewrite_refs(value) for value in node]
    return node


def _workflow_schemas(components: _Components) -> None:
    """``Workflow`` (the detail view) and ``WorkflowSummary`` (a list row), from ``Instance``."""
    components.add_model("Instance", Instance, "serialization")
    instance = components.schemas.pop("Instance")
    hidden = HIDDEN_FIELDS
    properties = {
        "workflow_id": _STRING,
        **{key: value for key, value in instance["properties"].items() if key not in hidden},
        "links": _LINKS,
    }
    required = ["workflow_id", *(key for key in instance.get("required", []) if key not in hidden), "links"]
    components.add(
        "Workflow",
        {"type": "object", "title": "Workflow", "description": "A workflow instance.", "properties": properties,
         "required": required},
    )  # fmt: skip
    summary_fields = [key for key in instance["properties"] if key in SUMMARY_FIELDS]  # in the model's order
    components.add(
        "WorkflowSummary",
        {
            "type": "object",
            "title": "WorkflowSummary",
            "properties": {
                "workflow_id": _STRING,
                **{key: instance["properties"][key] for key in summary_fields},
                "links": _LINKS,
            },
            "required": ["workflow_id", "workflow", "status", "created_at", "updated_at", "links"],
        },
    )


def _contract_schemas(components: _Components) -> None:
    contracts = schemas()
    for name, schema in contracts.items():
        body = {key: value for key, value in schema.items() if key not in ("$schema", "$id")}
        body["externalDocs"] = {
            "description": f"The wire contract's JSON Schema {schema.get('$id', ID_PREFIX + name)}: "
            f"key {name!r} of GET {CONTRACTS_PATH}",
            "url": CONTRACTS_PATH,
        }
        components.add_lifted(name, body)
    components.add(
        "Contracts",
        {
            "type": "object",
            "description": "JSON Schemas (draft 2020-12) by name; each is in components.schemas by that name.",
            "properties": {name: ref(name) for name in contracts},
            "additionalProperties": {"type": "object"},
        },
    )


def _components(bodies: Mapping[str, type[BaseModel]]) -> _Components:
    components = _Components()
    _contract_schemas(components)
    for name, model in bodies.items():
        components.add_model(name, model, "validation")
    for name, model in ANSWER_MODELS.items():
        components.add_model(name, model, "serialization")
    _workflow_schemas(components)
    for name, schema in _hand_written().items():
        components.add(name, schema)
    return components


# --- the document ----------------------------------------------------------------------


class Route(NamedTuple):
    method: str
    path: str
    handler: str


def routes_of(router: web.UrlDispatcher) -> list[Route]:
    """Every route of an application (aiohttp's implicit ``HEAD`` of a ``GET`` left out)."""
    found = {
        Route(route.method, route.resource.canonical, getattr(route.handler, "__name__", "handler"))
        for route in router.routes()
        if route.resource is not None and route.method not in ("HEAD", "*")
    }
    return sorted(found)


def path_parameters(path: str) -> list[str]:
    """The names of a route path's parameters: ``/v1/workflows/{id}`` -> ``["id"]``."""
    return _PATH_PARAM.findall(path)


def _parameter(param: Param) -> dict[str, Any]:
    return {
        "name": param.name,
        "in": param.where,
        "description": param.description,
        "required": param.required or param.where == "path",
        "schema": dict(param.schema),
    }


def _reply(reply: Reply) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": reply.description}
    if reply.schema is not None:
        answer["content"] = {reply.media_type: {"schema": dict(reply.schema), **reply.extensions}}
    if reply.headers:
        answer["headers"] = {
            name: {"description": description, "schema": _STRING} for name, description in reply.headers.items()
        }
    return answer


def _operation(route: Route, operation: Operation | None) -> dict[str, Any]:
    if operation is None:
        operation = Operation("(not documented: add it to controller.openapi.OPERATIONS)", "undocumented", {})
        extra: dict[str, Any] = {"x-undocumented": True}
    else:
        extra = {}
    params = list(operation.params)
    named = {param.name for param in params if param.where == "path"}
    for name in path_parameters(route.path):
        if name not in named:
            params.append(Param(name, "path", f"The {name}.", required=True))
    spec: dict[str, Any] = {
        "operationId": route.handler,
        "summary": operation.summary,
        "tags": [operation.tag],
        **({"description": operation.description} if operation.description else {}),
        **({"parameters": [_parameter(param) for param in params]} if params else {}),
    }
    if operation.body is not None:
        spec["requestBody"] = {"required": operation.body_required, "content": {JSON: {"schema": ref(operation.body)}}}
    responses: dict[str, Any] = {str(status): _reply(reply) for status, reply in sorted(operation.replies.items())}
    for status in sorted(set(operation.problems)):
        responses[str(status)] = {"$ref": RESPONSE_REF + PROBLEMS[status][0]}
    responses["default"] = {"$ref": RESPONSE_REF + "Problem"}
    spec["responses"] = responses
    return {**spec, **extra}


def _problem_responses() -> dict[str, Any]:
    content = {PROBLEM_JSON: {"schema": ref("Problem")}}
    responses = {name: {"description": description, "content": content} for name, description in PROBLEMS.values()}
    responses["Problem"] = {"description": "An error, as a problem document.", "content": content}
    return responses


def document(routes: Iterable[Route], bodies: Mapping[str, type[BaseModel]] | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes`` (see :func:`routes_of`); ``bodies`` are the
    pydantic models of request bodies the API module keeps to itself, by schema name."""
    paths: dict[str, dict[str, Any]] = {}
    taken: set[str] = set()
    for route in sorted(routes):
        spec = _operation(route, OPERATIONS.get((route.method, route.path)))
        if spec["operationId"] in taken:  # one handler on two routes
            spec["operationId"] = f"{spec['operationId']}_{route.method.lower()}"
        taken.add(spec["operationId"])
        paths.setdefault(route.path, {})[route.method.lower()] = spec
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "streamsaga",
            "version": "v1",
            "summary": "Front-controller hybrid sagas on Redis Streams: start, follow and operate workflows.",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "externalDocs": {"description": "The wire contract's JSON Schemas", "url": CONTRACTS_PATH},
        "paths": paths,
        "components": {"schemas": _components(bodies or {}).schemas, "responses": _problem_responses()},
    }


def undocumented(routes: Iterable[Route]) -> list[Route]:
    """Routes without an entry in :data:`OPERATIONS`."""
    return [route for route in routes if (route.method, route.path) not in OPERATIONS]


def unrouted(routes: Iterable[Route]) -> list[tuple[str, str]]:
    """Entries of :data:`OPERATIONS` without a route."""
    present = {(route.method, route.path) for route in routes}
    return sorted(key for key in OPERATIONS if key not in present)
