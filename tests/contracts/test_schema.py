"""The JSON Schema export of the wire contract."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator
from pydantic import BaseModel, ValidationError

from contracts.envelope import Envelope
from contracts.messages import PAYLOADS, Item, Order
from contracts.schema import DIALECT, ID_PREFIX, file_name, schemas

JSON_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}


def _nodes(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _nodes(value)
    elif isinstance(node, list):
        for value in node:
            yield from _nodes(value)


def assert_well_formed(name: str, schema: dict[str, Any]) -> None:
    """What can be checked without a validator library: dialect, identity, types, refs, required."""
    assert schema["$schema"] == DIALECT
    assert schema["$id"] == ID_PREFIX + name
    assert schema["title"] == name
    assert schema["type"] == "object"
    assert orjson.loads(orjson.dumps(schema)) == schema  # plain JSON
    defs = schema.get("$defs", {})
    for node in _nodes(schema):
        if isinstance(node.get("type"), str):
            assert node["type"] in JSON_TYPES, node
        if "$ref" in node:
            assert node["$ref"].startswith("#/$defs/"), node
            assert node["$ref"].removeprefix("#/$defs/") in defs, node
        if isinstance(node.get("properties"), dict):
            assert set(node.get("required", [])) <= set(node["properties"]), node


def test_there_is_a_schema_for_the_envelope_every_payload_type_the_order_body_and_definitions() -> None:
    assert list(schemas()) == ["Envelope", *PAYLOADS, "OrderIn", "WorkflowDefinition"]


@pytest.mark.parametrize(("name", "schema"), list(schemas().items()))
def test_every_schema_is_a_well_formed_draft_2020_12_document(name: str, schema: dict[str, Any]) -> None:
    assert_well_formed(name, schema)
    assert file_name(name) == f"{name}.json"


def test_the_order_body_is_strict_and_stream_payloads_are_tolerant() -> None:
    found = schemas()
    order_in = found["OrderIn"]
    assert order_in["additionalProperties"] is False
    assert set(order_in["required"]) == {"customer_id", "items", "currency", "ship_to"}
    assert order_in["properties"]["items"]["minItems"] == 1
    item = order_in["$defs"]["ItemIn"]
    assert item["additionalProperties"] is False
    assert item["properties"]["quantity"]["exclusiveMinimum"] == 0
    assert "additionalProperties" not in found["OrderSubmitted"]  # readers ignore unknown fields


def test_types_sharing_a_model_each_get_their_own_schema() -> None:
    found = schemas()
    assert found["RefundPayment"]["title"] == "RefundPayment"
    assert found["ReleaseInventory"]["title"] == "ReleaseInventory"
    assert found["RefundPayment"]["properties"] == found["ReleaseInventory"]["properties"]


def test_the_envelope_schema_names_its_routing_fields() -> None:
    envelope = schemas()["Envelope"]
    assert {"message_id", "type", "correlation_id", "workflow", "producer", "occurred_at"} <= set(envelope["required"])


def test_the_schema_module_imports_without_redis_or_aiohttp() -> None:
    probe = (
        "import sys, contracts.schema; "
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('redis', 'aiohttp')]; "
        "print(loaded); sys.exit(1 if loaded else 0)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def _accepts(model: type[BaseModel], value: dict[str, Any]) -> bool:
    try:
        model.model_validate(value)
    except ValidationError:
        return False
    return True


_ITEM = {"sku": "A-1", "quantity": 1, "unit_price": "19.99"}
_ORDER = {"customer_id": "c-1", "items": [_ITEM], "currency": "EUR", "ship_to": {"country": "DE"}}
_ENVELOPE = {
    "message_id": "m-1",
    "type": "PaymentCaptured",
    "correlation_id": "wf-1",
    "workflow": {"name": "order", "version": 1},
    "producer": "payment",
    "occurred_at": "2026-11-21T20:18:16.123456Z",
    "payload": {},
}


@pytest.mark.parametrize(
    ("model", "value", "valid"),
    [
        (Order, _ORDER, True),
        (Item, {**_ITEM, "unit_price": "0"}, True),
        (Item, {**_ITEM, "unit_price": "123456789012.34"}, True),
        (Item, {**_ITEM, "unit_price": 19.5}, True),
        (Item, {**_ITEM, "unit_price": "abc"}, False),
        (Item, {**_ITEM, "unit_price": "-1.00"}, False),
        (Item, {**_ITEM, "unit_price": "1.234"}, False),
        (Item, {**_ITEM, "unit_price": "1234567890123"}, False),
        (Order, {**_ORDER, "currency": "XXX"}, False),
        (Order, {**_ORDER, "ship_to": {"country": "D1"}}, False),
        (Envelope, _ENVELOPE, True),
        (Envelope, {**_ENVELOPE, "occurred_at": "2026-11-21T20:18:16+01:00"}, True),
        (Envelope, {**_ENVELOPE, "occurred_at": "2026-11-21T20:18:16"}, False),  # no offset
        (Envelope, {**_ENVELOPE, "occurred_at": "yesterday"}, False),
    ],
)
def test_a_validator_given_the_exported_schema_agrees_with_the_decoder(
    model: type[BaseModel], value: dict[str, Any], valid: bool
) -> None:
    # what a worker in another language checks against is what our readers accept
    name = "Envelope" if model is Envelope else "OrderSubmitted"
    schema = schemas()[name]
    if model is not Envelope:
        schema = {**schema["$defs"][model.__name__], "$defs": schema["$defs"]}
    Draft202012Validator.check_schema(schema)
    assert Draft202012Validator(schema).is_valid(value) is valid
    assert _accepts(model, value) is valid
