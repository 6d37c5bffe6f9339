"""The shipping worker: schedules a shipment, and cancels it when compensated.

``InventoryReserved`` -> ``ShipmentScheduled`` (or ``ShipmentFailed`` for a
country outside the supported list); ``CancelShipment`` -> ``ShipmentCancelled``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from contracts.envelope import derived_message_id
from contracts.messages import (
    Compensated,
    CompensationCommand,
    InventoryReserved,
    ShipmentFailed,
    ShipmentScheduled,
)
from participants import ledger
from participants.ledger import Cancellation, Shipment
from participants.sdk import Message, Participant, Reply

log = logging.getLogger(__name__)

DEFAULT_COUNTRIES = ("US", "CA", "GB", "DE", "FR", "NL")


def build(countries: Iterable[str] = DEFAULT_COUNTRIES) -> Participant:
    """The shipping participant, shipping only to ``countries`` (ISO 3166-1 alpha-2)."""
    supported = tuple(country.upper() for country in countries)
    shipping = Participant(ledger.SHIPPING)

    @shipping.on("InventoryReserved", idempotent=True)  # effects recorded once per workflow
    async def schedule(msg: Message) -> Reply:
        order = msg.parse(InventoryReserved).order
        country = order.ship_to.country
        if country not in supported:
            log.info("cannot ship to %s", country)
            reason = f"cannot ship to {country}: supported countries are {', '.join(supported)}"
            return Reply("ShipmentFailed", ShipmentFailed(reason=reason))
        record = Shipment(
            order_id=order.order_id,
            shipment_id="shp_" + derived_message_id(msg.correlation_id, ledger.SHIPPING),
            country=country,
        )
        stored = await ledger.record_once(msg.redis, ledger.SHIPMENTS, msg.correlation_id, record)
        return Reply("ShipmentScheduled", ShipmentScheduled(order=order, shipment_id=stored.shipment_id))

    @shipping.compensates("CancelShipment", idempotent=True)  # effects recorded once per workflow
    async def cancel(msg: Message) -> Reply:
        command = msg.parse(CompensationCommand)
        record = Cancellation(reason=command.reason)
        stored = await ledger.record_if(msg.redis, ledger.SHIPMENTS, ledger.CANCELLATIONS, msg.correlation_id, record)
        detail = "cancelled the shipment" if stored else "no shipment was scheduled"
        return Reply("ShipmentCancelled", Compensated(step=command.step, detail=detail))

    return shipping
