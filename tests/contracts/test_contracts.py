"""The wire contract: envelope codec, naming, payload rules, definitions."""

from __future__ import annotations

import subprocess
import sys
import uuid
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import orjson
import pytest
from pydantic import ValidationError

import contracts
from contracts import naming
from contracts.definitions import ORDER_SAGA, Role, StepDefinition, WorkflowDefinition
from contracts.envelope import DecodeError, Envelope, WorkflowRef, decode, derived_message_id, encode, utcnow
from contracts.messages import (
    Order,
    OrderIn,
    OrderSubmitted,
    PayloadError,
    PaymentCaptured,
    parse_payload,
    validate_payload,
)

ORDER = {
    "customer_id": "c-1",
    "items": [{"sku": "A", "quantity": 2, "unit_price": "10.50"}, {"sku": "B", "quantity": 1, "unit_price": "1"}],
    "currency": "EUR",
    "ship_to": {"country": "de"},
}


def _envelope(**overrides: object) -> Envelope:
    fields: dict[str, object] = {
        "message_id": "m-1",
        "type": "OrderSubmitted",
        "correlation_id": "wf-1",
        "workflow": WorkflowRef(name="order"),
        "producer": "test",
        "occurred_at": utcnow(),
        "payload": {"order": ORDER},
    }
    fields.update(overrides)
    return Envelope.model_validate(fields)


def _wire(envelope: Envelope) -> dict[bytes, bytes]:
    return {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in encode(envelope).items()}


def test_public_names_are_a_deliberate_list() -> None:
    assert sorted(contracts.__all__) == sorted(
        [
            "CONTROLLER_GROUP",
            "DEFAULT_PARTITIONS",
            "ORDER_SAGA",
            "PAYLOADS",
            "SCHEMA_VERSION",
            "CompensationDefinition",
            "DecodeError",
            "Envelope",
            "Order",
            "OrderIn",
            "PayloadError",
            "Role",
            "StepDefinition",
            "WorkflowDefinition",
            "WorkflowRef",
            "decode",
            "encode",
            "partition_of",
            "validate_payload",
        ]
    )
    for name in contracts.__all__:
        assert hasattr(contracts, name)


def test_contracts_import_without_redis_or_aiohttp() -> None:
    code = (
        "import sys; sys.modules['redis'] = None; sys.modules['aiohttp'] = None\n"
        "import contracts, contracts.naming, contracts.definitions, contracts.messages"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_envelope_round_trips_through_stream_fields() -> None:
    envelope = _envelope(traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    fields = encode(envelope)
    assert fields["type"] == "OrderSubmitted"
    assert fields["correlation_id"] == "wf-1"
    assert decode(_wire(envelope)) == envelope


@pytest.mark.parametrize(
    ("causation_id", "parts"),
    [
        ("3f0c6a1b2c3d4e5f60718293a4b5c6d7", ("payment", "PaymentCaptured")),
        ("3f0c6a1b2c3d4e5f60718293a4b5c6d7", ("payment", "PaymentCaptured", "1")),
        ("wf-1", ("inventory",)),
        ("", ()),
        ("", ("", "")),
        ("ünïcödé/🙂", ("日本", "a/b")),
        ("x" * 1000, ("y" * 100,)),
    ],
)
def test_a_derived_message_id_is_the_hex_of_a_uuid5_in_the_url_namespace(
    causation_id: str, parts: tuple[str, ...]
) -> None:
    name = "/".join((causation_id, *parts))
    assert derived_message_id(causation_id, *parts) == uuid.uuid5(uuid.NAMESPACE_URL, name).hex


def test_derived_message_ids_keep_their_wire_values() -> None:
    # ids already on the streams must be derived the same way by every version
    assert derived_message_id("wf-1", "payment") == "d9be07ae6fd65db1a4a54690fb1ecb38"
    for n in range(512):  # every value of the version and variant nibbles' free bits
        cause = f"m-{n}"
        assert derived_message_id(cause, "p", "T") == uuid.uuid5(uuid.NAMESPACE_URL, f"{cause}/p/T").hex


@pytest.mark.parametrize(
    "payload",
    [
        {"order": ORDER},
        {"none": None, "nested": {"none": None, "list": [None, 1]}},
        {"floats": [0.1, 1e22, 1.5e-7, 1e16, -0.0, float("nan"), float("inf")], "ints": [2**63 - 1, -(2**63)]},
        {"text": 'héllo ☃ \u2028 \x00 "q" \\ </script>'},
        {"amount": Decimal("1.10"), "at": datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=timezone(timedelta(hours=2)))},
        {"day": date(2024, 1, 1), "id": uuid.UUID(int=5), "tuple": (1, 2), "bytes": b"raw", "keys": {1: 2}},
        {"model": OrderSubmitted.model_validate({"order": ORDER})},
    ],
)
def test_encode_writes_the_envelope_json_that_orjson_of_its_json_dump_gives(payload: dict[str, object]) -> None:
    # encode() serialises in pydantic-core; the bytes on the wire stay what they were
    for envelope in (
        _envelope(payload=payload),
        _envelope(payload=payload, causation_id="m-0", traceparent="t", attempt=3, occurred_at=datetime.now(UTC)),
    ):
        before = orjson.dumps(envelope.model_dump(mode="json", exclude_none=True))
        assert encode(envelope)["envelope"] == before


def test_encode_leaves_out_empty_optional_fields() -> None:
    body = orjson.loads(encode(_envelope())["envelope"])
    assert "causation_id" not in body
    assert "traceparent" not in body
    assert body["occurred_at"].endswith("Z")


def test_decode_ignores_unknown_envelope_fields() -> None:
    wire = _wire(_envelope())
    body = orjson.loads(wire[b"envelope"])
    body["added_in_a_later_version"] = {"x": 1}
    wire[b"envelope"] = orjson.dumps(body)
    assert decode(wire).message_id == "m-1"


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda w: w.pop(b"type"), "missing stream field 'type'"),
        (lambda w: w.pop(b"envelope"), "missing stream field 'envelope'"),
        (lambda w: w.__setitem__(b"envelope", b"{not json"), "invalid envelope"),
        (lambda w: w.__setitem__(b"type", b"PaymentCaptured"), "disagrees with envelope type"),
        (lambda w: w.__setitem__(b"correlation_id", b"other"), "correlation_id disagrees"),
        (lambda w: w.pop(b"message_id"), "missing stream field 'message_id'"),
        (lambda w: w.__setitem__(b"message_id", b"m-2"), "message_id disagrees"),
        (lambda w: w.__setitem__(b"type", b"\xff"), "not UTF-8"),
    ],
)
def test_decode_names_what_is_wrong(mutate: object, reason: str) -> None:
    wire = _wire(_envelope())
    mutate(wire)  # type: ignore[operator]
    with pytest.raises(DecodeError, match=reason):
        decode(wire)


def test_decode_rejects_an_envelope_missing_a_required_field() -> None:
    wire = _wire(_envelope())
    body = orjson.loads(wire[b"envelope"])
    del body["occurred_at"]
    wire[b"envelope"] = orjson.dumps(body)
    with pytest.raises(DecodeError, match="occurred_at"):
        decode(wire)


def test_partition_is_stable_crc32_mod_p() -> None:
    import zlib  # other languages must compute the same partition

    assert naming.partition_of("order-42", 16) == zlib.crc32(b"order-42") % 16
    assert {naming.partition_of(f"wf-{i}", 16) for i in range(500)} == set(range(16))


def test_every_partition_key_carries_the_partition_hash_tag() -> None:
    keys = [
        naming.message_stream(7, "PaymentCaptured"),
        naming.instance_key(7, "wf"),
        naming.seen_key(7, "wf"),
        naming.history_key(7, "wf"),
        naming.status_index_key(7, "running"),
        naming.timers_key(7),
        naming.progress_stream(7),
        naming.dead_letter_stream(7),
        naming.outcome_key(7, "payment", "m"),
    ]
    assert all("{7}" in key for key in keys)
    assert all(naming.partition_of_key(key) == 7 for key in keys)
    assert naming.type_of_stream(keys[0]) == "PaymentCaptured"
    assert naming.participant_key("inventory", "stock") == "ss:{pt:inventory}:stock"


def test_order_total_uses_exact_decimals() -> None:
    assert Order.model_validate(ORDER).total() == Decimal("22.00")
    assert Order.model_validate(ORDER).ship_to.country == "DE"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"items": []}, "items"),
        ({"currency": "XXX"}, "currency"),
        ({"items": [{"sku": "A", "quantity": 0, "unit_price": "1"}]}, "items.0.quantity"),
        ({"items": [{"sku": "A", "quantity": 1, "unit_price": "-1"}]}, "items.0.unit_price"),
        ({"items": [{"sku": "A", "quantity": "two", "unit_price": "1"}]}, "items.0.quantity"),
        ({"ship_to": {"country": "1X"}}, "ship_to.country"),
        ({"customer_id": None}, "customer_id"),
    ],
)
def test_invalid_orders_name_the_field(change: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        OrderIn.model_validate({**ORDER, **change})
    assert ".".join(str(p) for p in caught.value.errors()[0]["loc"]) == field


def test_http_order_body_is_strict_but_stream_payload_is_tolerant() -> None:
    extra_item = {**ORDER, "items": [{"sku": "A", "quantity": 1, "unit_price": "1", "color": "red"}]}
    with pytest.raises(ValidationError, match="color"):
        OrderIn.model_validate(extra_item)
    assert Order.model_validate({**extra_item, "coupon": "X"}).items[0].sku == "A"
    validate_payload("OrderSubmitted", {"order": extra_item, "note": "later field"})


def test_invalid_payload_is_reported_with_its_path() -> None:
    with pytest.raises(PayloadError, match=r"payload\.amount"):
        validate_payload("PaymentCaptured", {"order": ORDER, "payment_id": "p", "amount": "-3"})
    validate_payload("SomethingUserDefined", {"anything": 1})  # unregistered types are not checked


def test_parse_payload_returns_the_registered_model_it_validated() -> None:
    parsed = parse_payload("OrderSubmitted", {"order": ORDER})
    assert type(parsed) is OrderSubmitted
    assert parsed.order.total() == Decimal("22.00")
    assert parse_payload("SomethingUserDefined", {"anything": 1}) is None
    with pytest.raises(PayloadError, match=r"invalid OrderSubmitted payload at payload\.order\.items"):
        parse_payload("OrderSubmitted", {"order": {**ORDER, "items": []}})


def test_assigning_to_a_payload_model_is_validated() -> None:
    # so a payload model stays valid after it was built: emitting it needs no second check
    captured = PaymentCaptured(order=Order.model_validate(ORDER), payment_id="p", amount=Decimal("22.00"))
    with pytest.raises(ValidationError, match="amount"):
        captured.amount = Decimal("-1")
    with pytest.raises(ValidationError, match="currency"):
        captured.order.currency = "XXX"
    with pytest.raises(ValidationError, match="items"):
        captured.order.items = []
    captured.order.ship_to.country = "fr"
    assert captured.order.ship_to.country == "FR"  # validators run on assignment too
    assert (captured.amount, captured.order.currency) == (Decimal("22.00"), "EUR")


def test_order_saga_roles_read_like_a_table() -> None:
    roles = ORDER_SAGA.roles
    assert roles["PaymentCaptured"] == [("payment", Role.COMPLETED), ("inventory", Role.TRIGGER)]
    assert roles["ShipmentFailed"] == [("shipping", Role.FAILED)]
    assert roles["InventoryReleased"] == [("inventory", Role.COMPENSATED)]
    assert "RefundPayment" not in roles  # commands are sent, not correlated
    assert ORDER_SAGA.command_types() == {"OrderSubmitted", "RefundPayment", "ReleaseInventory", "CancelShipment"}


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([{"name": "a", "participant": "p", "trigger": "S", "completed": "A"}] * 2, "unique"),
        ([{"name": "a", "participant": "controller", "trigger": "S", "completed": "A"}], "reserved"),
        ([{"name": "a", "participant": "p", "trigger": "S", "completed": "bad name"}], "not a valid name"),
        ([{"name": "a", "participant": "p", "trigger": "S", "completed": "A", "orchestrated": True}], "command"),
    ],
)
def test_definitions_are_validated(steps: list[dict[str, object]], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        WorkflowDefinition.model_validate({"name": "w", "start": "S", "steps": steps})


def test_step_types_lists_every_type_a_step_involves() -> None:
    step = StepDefinition(name="s", participant="p", trigger="T", completed="C", failed=("F",))
    assert step.types() == ["T", "C", "F"]
