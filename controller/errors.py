"""The HTTP API's errors: a small tree whose data lives in attributes.

One middleware (:func:`controller.api.problems`) renders any :class:`ApiError` as
``application/problem+json`` (RFC 9457).  ``field`` names what to fix:

* a field of the JSON request body is named by its path from the body's root,
  dot-joined, list positions as numbers — ``items.0.quantity`` for ``POST
  /v1/orders``, ``order.items.0.quantity`` for ``POST /v1/workflows/order``;
  the body as a whole is ``body``;
* a header by its name (``Content-Type``, ``Idempotency-Key``), a query parameter
  by its name (``status``, ``limit``), a path parameter by its name (``name``, ``id``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from controller.dead_letters import NoSuchDeadLetter, NotReplayable

PROBLEM_TYPE_PREFIX = "urn:streamsaga:problem:"


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str


def field_errors(exc: ValidationError) -> list[FieldError]:
    """Every error of a validation failure, each naming its field's path in the body."""
    return [
        FieldError(
            ".".join(str(part) for part in err["loc"]) or "body",
            err["msg"].removeprefix("Value error, "),
        )
        for err in exc.errors()
    ]


class ApiError(Exception):
    """Base of every error the API answers with a problem document."""

    status: int = 500
    title: str = "Internal server error"
    slug: str = "internal"

    def __init__(self, detail: str, *, field: str | None = None, errors: Sequence[FieldError] = ()) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field
        self.errors = list(errors)

    @property
    def type(self) -> str:
        return PROBLEM_TYPE_PREFIX + self.slug

    def extensions(self) -> dict[str, Any]:
        """Members beyond RFC 9457's own that a subclass adds to its problem document."""
        return {}

    def headers(self) -> dict[str, str]:
        """Headers a subclass adds to the response."""
        return {}


class MalformedBody(ApiError):
    status = 400
    title = "Malformed request body"
    slug = "malformed-body"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, field="body")


class InvalidInput(ApiError):
    """A request that parsed but does not fit the schema; ``errors`` lists every bad field."""

    status = 422
    title = "Invalid input"
    slug = "invalid-input"

    def __init__(self, errors: Sequence[FieldError]) -> None:
        first = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(f"{first.field}: {first.message}{more}", field=first.field, errors=errors)

    @classmethod
    def of(cls, field: str, message: str) -> InvalidInput:
        return cls([FieldError(field, message)])

    @classmethod
    def from_validation(cls, exc: ValidationError) -> InvalidInput:
        return cls(field_errors(exc))


class BodyTooLarge(ApiError):
    status = 413
    title = "Request body too large"
    slug = "body-too-large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body exceeds {limit} bytes", field="body")
        self.limit = limit

    def extensions(self) -> dict[str, Any]:
        return {"max_bytes": self.limit}


class UnsupportedMediaType(ApiError):
    status = 415
    title = "Unsupported media type"
    slug = "unsupported-media-type"

    def __init__(self, given: str, expected: str) -> None:
        super().__init__(f"Content-Type {given!r} is not supported; send {expected}", field="Content-Type")
        self.given = given
        self.expected = expected


class NotFound(ApiError):
    status = 404
    title = "Not found"
    slug = "not-found"


class WorkflowNotFound(NotFound):
    title = "Workflow not found"
    slug = "workflow-not-found"

    def __init__(self, workflow_id: str) -> None:
        super().__init__(f"no workflow {workflow_id!r} (it may never have existed or may have expired)", field="id")
        self.workflow_id = workflow_id


class DefinitionNotFound(NotFound):
    title = "Workflow definition not found"
    slug = "definition-not-found"

    def __init__(self, name: str, known: Sequence[str]) -> None:
        super().__init__(f"no workflow definition {name!r}; known: {', '.join(known)}", field="name")
        self.name = name
        self.known = list(known)


class DeadLetterNotFound(NotFound):
    title = "Dead letter not found"
    slug = "dead-letter-not-found"

    def __init__(self, dead_letter_id: str) -> None:
        super().__init__(str(NoSuchDeadLetter(dead_letter_id)), field="id")
        self.dead_letter_id = dead_letter_id


class RouteNotFound(NotFound):
    title = "No such resource"
    slug = "route-not-found"

    def __init__(self, path: str) -> None:
        super().__init__(f"nothing at {path}")
        self.path = path


class MethodNotAllowed(ApiError):
    status = 405
    title = "Method not allowed"
    slug = "method-not-allowed"

    def __init__(self, method: str, allowed: Iterable[str]) -> None:
        self.allowed = sorted(allowed)
        super().__init__(f"{method} is not allowed here; use {', '.join(self.allowed)}")


class IdempotencyKeyReused(ApiError):
    status = 409
    title = "Idempotency-Key reused"
    slug = "idempotency-key-reused"

    def __init__(self, key: str) -> None:
        super().__init__(f"Idempotency-Key {key!r} was already used with another request body", field="Idempotency-Key")
        self.key = key


class WorkflowStateConflict(ApiError):
    """An operator request the workflow's current state does not allow."""

    status = 409
    title = "Not allowed in the workflow's state"
    slug = "workflow-state-conflict"

    def __init__(self, workflow_id: str, detail: str) -> None:
        super().__init__(detail, field="id")
        self.workflow_id = workflow_id


class DeadLetterNotReplayable(ApiError):
    """A dead letter whose original fields could not stand on its source stream again."""

    status = 409
    title = "Dead letter cannot be replayed"
    slug = "dead-letter-not-replayable"

    def __init__(self, dead_letter_id: str, reason: str) -> None:
        super().__init__(str(NotReplayable(dead_letter_id, reason)), field="id")
        self.dead_letter_id = dead_letter_id
        self.reason = reason


class Unavailable(ApiError):
    status = 503
    title = "Service unavailable"
    slug = "unavailable"

    def __init__(self, detail: str, *, checks: dict[str, bool] | None = None) -> None:
        super().__init__(detail)
        self.checks = checks

    def extensions(self) -> dict[str, Any]:
        return {"checks": self.checks} if self.checks is not None else {}


class StartOutcomeUnknown(Unavailable):
    """Redis failed while a workflow's start was being committed: it may have started."""

    slug = "start-outcome-unknown"

    def __init__(self, workflow_id: str, location: str, cause: str) -> None:
        super().__init__(
            f"Redis did not answer ({cause}), so workflow {workflow_id} may or may not have started: "
            "repeat the request with the same Idempotency-Key, which starts it at most once; its Location "
            "shows it once it has started (a 404 there may only mean not yet)"
        )
        self.workflow_id = workflow_id
        self.location = location

    def extensions(self) -> dict[str, Any]:
        return {"workflow_id": self.workflow_id}

    def headers(self) -> dict[str, str]:
        return {"Location": self.location}
