"""The wire contract as JSON Schema (draft 2020-12), for participants in any language.

``schemas()`` names one schema per thing a participant or client must produce or
read: the stream ``Envelope``, the payload of every registered message ``type``
(keyed by the type, so ``RefundPayment`` and ``ReleaseInventory`` each have one
even though they share a model), the ``OrderIn`` HTTP body and the
``WorkflowDefinition`` a controller loads.  Served by ``GET /v1/contracts`` and
written by ``streamsaga contracts export``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from contracts.definitions import WorkflowDefinition
from contracts.envelope import SCHEMA_VERSION, Envelope
from contracts.messages import PAYLOADS, OrderIn

DIALECT = "https://json-schema.org/draft/2020-12/schema"
ID_PREFIX = "urn:streamsaga:schema:"


def _schema(name: str, model: type[BaseModel], description: str) -> dict[str, Any]:
    body = model.model_json_schema(mode="validation")
    body["title"] = name
    body["description"] = description
    return {"$schema": DIALECT, "$id": ID_PREFIX + name, **body}


def schemas() -> dict[str, dict[str, Any]]:
    """Schema name -> JSON Schema document."""
    found = {
        "Envelope": _schema(
            "Envelope",
            Envelope,
            f"Every stream entry (schema_version {SCHEMA_VERSION}); `payload` follows the schema named by `type`. "
            "Readers ignore fields they do not know.",
        )
    }
    for message_type, model in PAYLOADS.items():
        found[message_type] = _schema(
            message_type,
            model,
            f"Payload of a {message_type} message. Readers ignore fields they do not know.",
        )
    found["OrderIn"] = _schema("OrderIn", OrderIn, "Body of POST /v1/orders. Unknown fields are rejected.")
    found["WorkflowDefinition"] = _schema(
        "WorkflowDefinition",
        WorkflowDefinition,
        "A workflow definition, as loaded by `streamsaga controller --definitions`.",
    )
    return found


def file_name(name: str) -> str:
    """The file a schema is exported to."""
    return f"{name}.json"
