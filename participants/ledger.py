"""The example workers' books: what each records, and a reader that checks they balance.

Every record is keyed by the workflow id (correlation id): one business
transaction per workflow, written at most once, so a redelivered message finds
the record of its first run instead of repeating the effect.  Each worker's
records live in its own hash slot (``{pt:<participant>}``).

================  =================================  ==========================================
worker            hash                               field -> value
================  =================================  ==========================================
payment           ``captures``, ``refunds``          workflow id -> :class:`Capture`, :class:`Refund`
inventory         ``stock``, ``stock-initial``       SKU -> units available, units when first touched
inventory         ``reservations``, ``releases``     workflow id -> :class:`Reservation`, :class:`Release`
shipping          ``shipments``, ``cancellations``   workflow id -> :class:`Shipment`, :class:`Cancellation`
notification      ``notifications``                  workflow id -> :class:`Notice`
================  =================================  ==========================================
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from decimal import Decimal
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import Redis

from contracts import naming
from participants.sdk.scripts import Script

PAYMENT = "payment"
INVENTORY = "inventory"
SHIPPING = "shipping"
NOTIFICATION = "notification"

CAPTURES = naming.participant_key(PAYMENT, "captures")
REFUNDS = naming.participant_key(PAYMENT, "refunds")
STOCK = naming.participant_key(INVENTORY, "stock")
STOCK_INITIAL = naming.participant_key(INVENTORY, "stock-initial")
RESERVATIONS = naming.participant_key(INVENTORY, "reservations")
RELEASES = naming.participant_key(INVENTORY, "releases")
SHIPMENTS = naming.participant_key(SHIPPING, "shipments")
CANCELLATIONS = naming.participant_key(SHIPPING, "cancellations")
NOTIFICATIONS = naming.participant_key(NOTIFICATION, "notifications")


def cents(amount: Decimal) -> int:
    """Integer cents of an amount with at most two decimal places."""
    return int(amount.scaleb(2).to_integral_exact())


def amount(cents: int) -> Decimal:
    return Decimal(cents).scaleb(-2)


# --- records -------------------------------------------------------------------


class Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Capture(Record):
    order_id: str | None = None
    payment_id: str
    amount_cents: int
    currency: str


class Refund(Record):
    amount_cents: int
    currency: str
    reason: str


class Reservation(Record):
    order_id: str | None = None
    status: Literal["reserved", "unavailable"]
    reservation_id: str | None = None
    items: dict[str, int] = Field(default_factory=dict, description="SKU -> units reserved")
    short: list[str] = Field(default_factory=list, description="SKUs without enough stock")


class Release(Record):
    reason: str


class Shipment(Record):
    order_id: str | None = None
    shipment_id: str
    country: str


class Cancellation(Record):
    reason: str


class Notice(Record):
    order_id: str | None = None
    customer_id: str
    channel: str


RecordT = TypeVar("RecordT", bound=Record)

# Set a hash field once; return the value it holds (the first writer's).
_RECORD_ONCE = Script("""
redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
return redis.call('HGET', KEYS[1], ARGV[1])
""")

# Set a hash field once, only if ARGV[1] is a field of the hash KEYS[1]; nil otherwise.
_RECORD_IF = Script("""
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return false end
redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2])
return redis.call('HGET', KEYS[2], ARGV[1])
""")


async def record_once(redis: Redis, key: str, workflow_id: str, record: RecordT) -> RecordT:
    """Record ``record`` for the workflow unless a record exists; the stored one wins."""
    stored = await _RECORD_ONCE(redis, keys=[key], args=[workflow_id, record.model_dump_json()])
    return type(record).model_validate_json(stored)


async def record_if(redis: Redis, required: str, key: str, workflow_id: str, record: RecordT) -> RecordT | None:
    """Record ``record`` once, only if the workflow has a record in ``required``
    (same hash slot); the stored record, or None when there is nothing to undo."""
    stored = await _RECORD_IF(redis, keys=[required, key], args=[workflow_id, record.model_dump_json()])
    return type(record).model_validate_json(stored) if stored is not None else None


# --- the ledger ----------------------------------------------------------------


class OrderRow(BaseModel):
    """Everything the workers did for one workflow."""

    workflow_id: str
    order_id: str | None = None
    currency: str | None = None
    captured_cents: int = 0
    refunded_cents: int = 0
    reserved: dict[str, int] = Field(default_factory=dict, description="SKU -> units reserved")
    released: bool = False
    shipment_id: str | None = None
    shipped: bool = False
    cancelled: bool = False
    notified: bool = False
    status: str | None = Field(
        default=None, description="the workflow's status (Ledger.settle); None: not known, or gone"
    )

    @property
    def mismatch(self) -> str | None:
        """What disagrees with the workflow's outcome, once it is settled: a completed order
        keeps its capture, stock and shipment; a failed or compensated one keeps nothing."""
        if self.status == "completed":
            undone = []
            if self.refunded_cents:
                undone.append("refunded")
            if self.released:
                undone.append("stock released")
            if self.cancelled:
                undone.append("shipment cancelled")
            return "completed, but " + ", ".join(undone) if undone else None
        if self.status in ("compensated", "failed"):
            left = []
            if self.captured_cents != self.refunded_cents:
                left.append(f"{_money(self.captured_cents - self.refunded_cents)} captured and not refunded")
            if self.reserved and not self.released:
                left.append("stock reserved and not released")
            if self.shipped and not self.cancelled:
                left.append("a shipment not cancelled")
            return f"{self.status}, but " + ", ".join(left) if left else None
        return None  # still running, or not known: nothing to check yet


class SkuStock(BaseModel):
    sku: str
    initial: int = Field(description="units when the SKU was first reserved (the worker's default stock then)")
    available: int
    reserved: int = Field(description="units ever reserved")
    released: int = Field(description="units given back by compensations")

    @property
    def held(self) -> int:
        """Units reserved and not released."""
        return self.reserved - self.released

    @property
    def balanced(self) -> bool:
        return self.initial == self.available + self.held


class Ledger(BaseModel):
    orders: list[OrderRow]
    stock: list[SkuStock]
    captured_cents: int
    refunded_cents: int

    @property
    def net_cents(self) -> int:
        return self.captured_cents - self.refunded_cents

    @property
    def balanced(self) -> bool:
        """Stock is conserved for every SKU, no order was refunded more than captured, and
        every settled workflow kept what its outcome says (see :attr:`OrderRow.mismatch`)."""
        return (
            all(s.balanced for s in self.stock)
            and all(o.refunded_cents <= o.captured_cents for o in self.orders)
            and not self.mismatches
        )

    @property
    def mismatches(self) -> list[OrderRow]:
        return [o for o in self.orders if o.mismatch is not None]

    def settle(self, statuses: Mapping[str, str | None]) -> None:
        """Give each order its workflow's status (by workflow id; missing: not known), so
        :attr:`balanced` checks each settled order against its outcome."""
        for order in self.orders:
            order.status = statuses.get(order.workflow_id)

    @property
    def unsettled(self) -> int:
        """Orders whose workflow is still running, or whose status is not known (expired, or not looked up)."""
        return sum(o.status not in ("completed", "compensated", "failed") for o in self.orders)


async def read_ledger(redis: Redis) -> Ledger:
    """Read every worker's records (one pipelined round trip).  The workflows' statuses
    are the controller's to tell: :meth:`Ledger.settle` takes them."""
    keys = (CAPTURES, REFUNDS, STOCK, STOCK_INITIAL, RESERVATIONS, RELEASES, SHIPMENTS, CANCELLATIONS, NOTIFICATIONS)
    async with redis.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.hgetall(key)
        raw = await pipe.execute()
    tables: dict[str, dict[str, bytes]] = {
        key: {field.decode(): value for field, value in table.items()} for key, table in zip(keys, raw, strict=True)
    }
    rows: dict[str, OrderRow] = {}

    def row(workflow_id: str) -> OrderRow:
        return rows.setdefault(workflow_id, OrderRow(workflow_id=workflow_id))

    def order_id(target: OrderRow, value: str | None) -> None:
        target.order_id = target.order_id or value

    for wid, value in tables[CAPTURES].items():
        capture = Capture.model_validate_json(value)
        order_id(r := row(wid), capture.order_id)
        r.captured_cents, r.currency = capture.amount_cents, capture.currency
    for wid, value in tables[REFUNDS].items():
        refund = Refund.model_validate_json(value)
        r = row(wid)
        r.refunded_cents, r.currency = refund.amount_cents, r.currency or refund.currency
    reserved: dict[str, int] = {}
    released: dict[str, int] = {}
    for wid, value in tables[RESERVATIONS].items():
        reservation = Reservation.model_validate_json(value)
        order_id(r := row(wid), reservation.order_id)
        if reservation.status == "reserved":
            r.reserved = dict(reservation.items)
            for sku, units in reservation.items.items():
                reserved[sku] = reserved.get(sku, 0) + units
    for wid in tables[RELEASES]:
        r = row(wid)
        r.released = True
        for sku, units in r.reserved.items():
            released[sku] = released.get(sku, 0) + units
    for wid, value in tables[SHIPMENTS].items():
        shipment = Shipment.model_validate_json(value)
        order_id(r := row(wid), shipment.order_id)
        r.shipment_id, r.shipped = shipment.shipment_id, True
    for wid in tables[CANCELLATIONS]:
        row(wid).cancelled = True
    for wid, value in tables[NOTIFICATIONS].items():
        notice = Notice.model_validate_json(value)
        order_id(r := row(wid), notice.order_id)
        r.notified = True
    initial = tables[STOCK_INITIAL]
    stock = [
        SkuStock(
            sku=sku,
            initial=int(initial[sku]),
            available=int(tables[STOCK].get(sku, initial[sku])),
            reserved=reserved.get(sku, 0),
            released=released.get(sku, 0),
        )
        for sku in sorted(initial)
    ]
    orders = sorted(rows.values(), key=lambda o: (o.order_id or "", o.workflow_id))
    return Ledger(
        orders=orders,
        stock=stock,
        captured_cents=sum(o.captured_cents for o in orders),
        refunded_cents=sum(o.refunded_cents for o in orders),
    )


def _money(cents: int) -> str:
    return f"{amount(cents):,.2f}"


def text_table(header: list[str], rows: list[list[str]], right: Collection[int] = ()) -> list[str]:
    """Lines of a plain-text table; columns in ``right`` are right-aligned."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [line(header), line(["-" * width for width in widths]), *map(line, rows)]


def _yes(flag: bool) -> str:
    return "yes" if flag else ""


def format_ledger(ledger: Ledger) -> str:
    """The ledger as plain-text tables: orders, totals, stock."""
    lines: list[str] = []
    if ledger.orders:
        header = ["workflow", "status", "order", "currency", "captured", "refunded", "reserved", "released"]
        header += ["shipment", "cancelled", "notified"]
        rows = [
            [
                o.workflow_id,
                o.status or "-",
                o.order_id or "-",
                o.currency or "",
                _money(o.captured_cents),
                _money(o.refunded_cents),
                " ".join(f"{sku}x{units}" for sku, units in sorted(o.reserved.items())),
                _yes(o.released),
                o.shipment_id or "",
                _yes(o.cancelled),
                _yes(o.notified),
            ]
            for o in ledger.orders
        ]
        lines += text_table(header, rows, right={4, 5})
    else:
        lines.append("no orders recorded")
    lines += [
        "",
        f"orders: {len(ledger.orders)}  captured: {_money(ledger.captured_cents)}  "
        f"refunded: {_money(ledger.refunded_cents)}  net: {_money(ledger.net_cents)}",
        "",
    ]
    if ledger.stock:
        rows = [
            [s.sku, str(s.initial), str(s.available), str(s.reserved), str(s.released), str(s.held), _yes(s.balanced)]
            for s in ledger.stock
        ]
        header = ["sku", "initial", "available", "reserved", "released", "held", "balanced"]
        lines += text_table(header, rows, right={1, 2, 3, 4, 5})
    else:
        lines.append("no stock touched")
    for o in ledger.mismatches:
        lines.append(f"{o.workflow_id} ({o.order_id or 'no order id'}): {o.mismatch}")
    if ledger.unsettled:
        lines.append(f"{ledger.unsettled} orders not settled or of unknown status: not checked against an outcome")
    lines += ["", "ledger balances" if ledger.balanced else "LEDGER DOES NOT BALANCE"]
    return "\n".join(lines)
