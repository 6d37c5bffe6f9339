"""Payload schemas of the order saga and the controller's own messages.

Stream payloads are tolerant (unknown fields are ignored, so producers can add
fields without breaking readers); the HTTP request bodies (``*In`` models) are
strict and name any field they do not know.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, WithJsonSchema, field_validator

# ISO 4217 codes accepted for orders.  A new currency is a one-line change here.
CURRENCIES = frozenset(
    {
        "AED",
        "ARS",
        "AUD",
        "BRL",
        "CAD",
        "CHF",
        "CLP",
        "CNY",
        "COP",
        "CZK",
        "DKK",
        "EGP",
        "EUR",
        "GBP",
        "HKD",
        "HUF",
        "IDR",
        "ILS",
        "INR",
        "ISK",
        "JPY",
        "KRW",
        "MXN",
        "MYR",
        "NOK",
        "NZD",
        "PEN",
        "PHP",
        "PLN",
        "RON",
        "SAR",
        "SEK",
        "SGD",
        "THB",
        "TRY",
        "TWD",
        "UAH",
        "USD",
        "VND",
        "ZAR",
    }
)

_CURRENCY_ENUM: list[JsonValue] = [*sorted(CURRENCIES)]  # for the JSON Schema
MONEY_PATTERN = r"^[0-9]{1,12}(\.[0-9]{1,2})?$"
Money = Annotated[
    Decimal,
    Field(ge=0, max_digits=14, decimal_places=2),
    # what producers write; the schema pydantic derives would let any string through
    WithJsonSchema(
        {
            "anyOf": [{"type": "string", "pattern": MONEY_PATTERN}, {"type": "number", "minimum": 0}],
            "description": "an amount: a decimal string with at most 12 digits before the point and 2 after "
            "(readers also take a JSON number)",
        }
    ),
]


class Wire(BaseModel):
    """Base of every stream payload: unknown fields are ignored.

    Assignments are validated too, so a handler that changes a parsed payload
    fails at the assignment that breaks it.
    """

    model_config = ConfigDict(extra="ignore", validate_assignment=True)


class Item(Wire):
    sku: str = Field(min_length=1, max_length=64)
    quantity: int = Field(gt=0, le=1_000_000)
    unit_price: Money


class Address(Wire):
    country: str = Field(
        min_length=2, max_length=2, json_schema_extra={"pattern": "^[A-Za-z]{2}$"}, description="ISO 3166-1 alpha-2"
    )
    name: str | None = Field(default=None, max_length=200)
    line1: str | None = Field(default=None, max_length=200)
    city: str | None = Field(default=None, max_length=100)
    postal_code: str | None = Field(default=None, max_length=20)

    @field_validator("country")
    @classmethod
    def _upper_country(cls, value: str) -> str:
        if not value.isalpha():
            raise ValueError("must be two letters")
        return value.upper()


class Order(Wire):
    customer_id: str = Field(min_length=1, max_length=100)
    items: list[Item] = Field(min_length=1, max_length=100)
    currency: str = Field(json_schema_extra={"enum": _CURRENCY_ENUM}, description="ISO 4217")
    ship_to: Address
    order_id: str | None = Field(default=None, min_length=1, max_length=100)

    @field_validator("currency")
    @classmethod
    def _known_currency(cls, value: str) -> str:
        if value not in CURRENCIES:
            raise ValueError(f"unknown currency {value!r}")
        return value

    def total(self) -> Decimal:
        return sum((item.unit_price * item.quantity for item in self.items), Decimal("0"))


class ItemIn(Item):
    model_config = ConfigDict(extra="forbid")


class AddressIn(Address):
    model_config = ConfigDict(extra="forbid")


class OrderIn(Order):
    """``POST /v1/orders`` body."""

    model_config = ConfigDict(extra="forbid")

    items: list[ItemIn] = Field(min_length=1, max_length=100)  # type: ignore[assignment]
    ship_to: AddressIn


# --- order saga events -------------------------------------------------------


class OrderSubmitted(Wire):
    order: Order


class PaymentCaptured(Wire):
    order: Order
    payment_id: str
    amount: Money


class PaymentDeclined(Wire):
    reason: str
    amount: Money | None = None


class InventoryReserved(Wire):
    order: Order
    reservation_id: str


class InventoryUnavailable(Wire):
    reason: str
    skus: list[str] = Field(default_factory=list)


class ShipmentScheduled(Wire):
    order: Order
    shipment_id: str


class ShipmentFailed(Wire):
    reason: str


class CustomerNotified(Wire):
    customer_id: str
    channel: str = "email"


class NotificationFailed(Wire):
    reason: str


# --- compensation commands and their outcomes -----------------------------------


class CompensationCommand(Wire):
    """Payload of every compensation command the controller sends.

    ``completed`` is the payload of the event with which the step completed, so the
    participant knows exactly what to undo.
    """

    step: str
    reason: str
    completed: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: str | None = Field(
        default=None, description="the same on every attempt of one compensation: dedupe the undo on it"
    )


class Compensated(Wire):
    """Payload of a compensation's outcome event."""

    step: str | None = None
    detail: str | None = None


class CompensationFailed(Wire):
    reason: str


class StepCommand(Wire):
    """Payload of a command that starts an orchestrated step."""

    step: str
    input: dict[str, Any] = Field(default_factory=dict)


# --- the controller's own messages ------------------------------------------------

TIMER_FIRED = "TimerFired"
CANCEL_REQUESTED = "CancelRequested"
RETRY_REQUESTED = "RetryRequested"
SLA_BREACHED = "SlaBreached"


class TimerFired(Wire):
    """A deadline passed.  Written by the controller's timer script, never by participants."""

    timer: str = Field(description="'step:<name>', 'comp:<name>' or 'sla'")
    generation: int
    due_ms: int


class OperatorRequest(Wire):
    """An operator's cancel or retry, as recorded in the history."""

    by: str | None = Field(default=None, max_length=200)
    reason: str | None = Field(default=None, max_length=1000)


class SlaBreachedEvent(Wire):
    sla_s: float
    deadline_at: str


# type -> payload model.  A type missing here is accepted with any JSON object as
# payload when a loaded workflow definition names it (user-defined workflows).
PAYLOADS: dict[str, type[Wire]] = {
    "OrderSubmitted": OrderSubmitted,
    "PaymentCaptured": PaymentCaptured,
    "PaymentDeclined": PaymentDeclined,
    "InventoryReserved": InventoryReserved,
    "InventoryUnavailable": InventoryUnavailable,
    "ShipmentScheduled": ShipmentScheduled,
    "ShipmentFailed": ShipmentFailed,
    "CustomerNotified": CustomerNotified,
    "NotificationFailed": NotificationFailed,
    "RefundPayment": CompensationCommand,
    "ReleaseInventory": CompensationCommand,
    "CancelShipment": CompensationCommand,
    "PaymentRefunded": Compensated,
    "InventoryReleased": Compensated,
    "ShipmentCancelled": Compensated,
    "RefundFailed": CompensationFailed,
    "ReleaseFailed": CompensationFailed,
    "CancelShipmentFailed": CompensationFailed,
    TIMER_FIRED: TimerFired,
    CANCEL_REQUESTED: OperatorRequest,
    RETRY_REQUESTED: OperatorRequest,
    SLA_BREACHED: SlaBreachedEvent,
}


class PayloadError(Exception):
    """A payload that does not match its type's schema; ``reason`` names the field."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def first_error(exc: ValidationError, root: str = "") -> tuple[str, str]:
    """(field path, message) of the first error of a validation failure."""
    err = exc.errors()[0]
    path = ".".join(str(part) for part in err["loc"])
    if root:
        path = f"{root}.{path}" if path else root
    return path, err["msg"]


def parse_payload(message_type: str, payload: dict[str, Any]) -> Wire | None:
    """``payload`` as the registered model of ``message_type`` (None for a type
    without one); raise :class:`PayloadError` if it does not fit."""
    model = PAYLOADS.get(message_type)
    if model is None:
        return None
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        path, msg = first_error(exc, "payload")
        raise PayloadError(f"invalid {message_type} payload at {path}: {msg}") from exc


def validate_payload(message_type: str, payload: dict[str, Any]) -> None:
    """Raise :class:`PayloadError` if ``payload`` does not fit ``message_type``."""
    parse_payload(message_type, payload)
