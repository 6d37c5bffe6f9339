"""The notification worker: tells the customer the order is on its way.

``ShipmentScheduled`` -> ``CustomerNotified`` (or ``NotificationFailed`` for the
customers configured to fail, for demos and tests).  The step is not critical:
its failure never compensates the order, so there is nothing to undo.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from contracts.messages import CustomerNotified, NotificationFailed, ShipmentScheduled
from participants import ledger
from participants.ledger import Notice
from participants.sdk import Message, Participant, Reply

log = logging.getLogger(__name__)

CHANNEL = "email"


def build(fail_customers: Iterable[str] = ()) -> Participant:
    """The notification participant; notifying any of ``fail_customers`` fails."""
    failing = frozenset(fail_customers)
    notification = Participant(ledger.NOTIFICATION)

    @notification.on("ShipmentScheduled", idempotent=True)  # effects recorded once per workflow
    async def notify(msg: Message) -> Reply:
        order = msg.parse(ShipmentScheduled).order
        if order.customer_id in failing:
            log.info("cannot notify %s", order.customer_id)
            reason = f"customer {order.customer_id} cannot be notified by {CHANNEL}"
            return Reply("NotificationFailed", NotificationFailed(reason=reason))
        record = Notice(order_id=order.order_id, customer_id=order.customer_id, channel=CHANNEL)
        stored = await ledger.record_once(msg.redis, ledger.NOTIFICATIONS, msg.correlation_id, record)
        return Reply("CustomerNotified", CustomerNotified(customer_id=stored.customer_id, channel=stored.channel))

    return notification
