"""The inventory worker: reserves an order's stock, and releases it when compensated.

``PaymentCaptured`` -> ``InventoryReserved`` (or ``InventoryUnavailable`` when a
SKU has less stock than ordered: then nothing is reserved);
``ReleaseInventory`` -> ``InventoryReleased``.  Stock is conserved: for every
SKU, initial == available + reserved - released.
"""

from __future__ import annotations

import logging

from contracts.envelope import derived_message_id
from contracts.messages import (
    Compensated,
    CompensationCommand,
    InventoryReserved,
    InventoryUnavailable,
    PaymentCaptured,
)
from participants import ledger
from participants.ledger import Release, Reservation
from participants.sdk import Message, Participant, Reply
from participants.sdk.scripts import Script

log = logging.getLogger(__name__)

DEFAULT_STOCK = 100

# KEYS: stock, stock-initial, reservations.  ARGV: workflow id, default stock,
# the reservation record, the unavailable record, then SKU, units pairs.
# The first decision for a workflow is recorded and returned on every re-run.
_RESERVE = Script("""
local existing = redis.call('HGET', KEYS[3], ARGV[1])
if existing then return existing end
local short = {}
for i = 5, #ARGV, 2 do
  local have = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or ARGV[2])
  if have < tonumber(ARGV[i + 1]) then short[#short + 1] = ARGV[i] end
end
local record = ARGV[3]
if #short > 0 then
  local unavailable = cjson.decode(ARGV[4])
  unavailable.short = short
  record = cjson.encode(unavailable)
else
  for i = 5, #ARGV, 2 do
    redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[2])
    redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[2])
    redis.call('HINCRBY', KEYS[1], ARGV[i], -tonumber(ARGV[i + 1]))
  end
end
redis.call('HSET', KEYS[3], ARGV[1], record)
return record
""")

# KEYS: stock, reservations, releases.  ARGV: workflow id, the release record.
_RELEASE = Script("""
local raw = redis.call('HGET', KEYS[2], ARGV[1])
if not raw then return 'none' end
local reservation = cjson.decode(raw)
if reservation.status ~= 'reserved' then return 'none' end
if redis.call('HSETNX', KEYS[3], ARGV[1], ARGV[2]) == 0 then return 'already' end
for sku, units in pairs(reservation.items) do
  redis.call('HINCRBY', KEYS[1], sku, units)
end
return 'released'
""")


def build(default_stock: int = DEFAULT_STOCK) -> Participant:
    """The inventory participant; a SKU never seen before starts with ``default_stock`` units."""
    inventory = Participant(ledger.INVENTORY)

    @inventory.on("PaymentCaptured", idempotent=True)  # effects recorded once per workflow
    async def reserve(msg: Message) -> Reply:
        order = msg.parse(PaymentCaptured).order
        items: dict[str, int] = {}
        for item in order.items:
            items[item.sku] = items.get(item.sku, 0) + item.quantity
        reserved = Reservation(
            order_id=order.order_id,
            status="reserved",
            reservation_id="res_" + derived_message_id(msg.correlation_id, ledger.INVENTORY),
            items=items,
        )
        unavailable = Reservation(order_id=order.order_id, status="unavailable")
        args: list[str | int] = [
            msg.correlation_id,
            default_stock,
            reserved.model_dump_json(),
            unavailable.model_dump_json(),
        ]
        for sku, units in items.items():
            args += [sku, units]
        raw = await _RESERVE(msg.redis, keys=[ledger.STOCK, ledger.STOCK_INITIAL, ledger.RESERVATIONS], args=args)
        stored = Reservation.model_validate_json(raw)
        if stored.status == "unavailable":
            log.info("not enough stock of %s", ", ".join(stored.short))
            reason = f"not enough stock of {', '.join(stored.short)}"
            return Reply("InventoryUnavailable", InventoryUnavailable(reason=reason, skus=stored.short))
        assert stored.reservation_id is not None
        return Reply("InventoryReserved", InventoryReserved(order=order, reservation_id=stored.reservation_id))

    @inventory.compensates("ReleaseInventory", idempotent=True)  # effects recorded once per workflow
    async def release(msg: Message) -> Reply:
        command = msg.parse(CompensationCommand)
        outcome = await _RELEASE(
            msg.redis,
            keys=[ledger.STOCK, ledger.RESERVATIONS, ledger.RELEASES],
            args=[msg.correlation_id, Release(reason=command.reason).model_dump_json()],
        )
        detail = {
            b"released": "released the reserved stock",
            b"already": "the reserved stock was already released",
            b"none": "nothing was reserved",
        }[outcome]
        return Reply("InventoryReleased", Compensated(step=command.step, detail=detail))

    return inventory
