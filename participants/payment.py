"""The payment worker: captures an order's total, and refunds it when compensated.

``OrderSubmitted`` -> ``PaymentCaptured`` (or ``PaymentDeclined`` when the total
exceeds the payment limit); ``RefundPayment`` -> ``PaymentRefunded``.
"""

from __future__ import annotations

import logging
from decimal import Decimal

from contracts.envelope import derived_message_id
from contracts.messages import (
    Compensated,
    CompensationCommand,
    CompensationFailed,
    OrderSubmitted,
    PaymentCaptured,
    PaymentDeclined,
)
from participants import ledger
from participants.ledger import Capture, Refund
from participants.sdk import Message, Participant, Reply

log = logging.getLogger(__name__)

DEFAULT_LIMIT = Decimal("1000.00")


def build(limit: Decimal = DEFAULT_LIMIT, refund_fail_customers: tuple[str, ...] = ()) -> Participant:
    """The payment participant, declining orders whose total exceeds ``limit``.

    Refunds for the customers in ``refund_fail_customers`` fail (``RefundFailed``),
    to show a compensation that needs an operator's attention.
    """
    payment = Participant(ledger.PAYMENT)

    @payment.on("OrderSubmitted", idempotent=True)  # effects recorded once per workflow
    async def capture(msg: Message) -> Reply:
        order = msg.parse(OrderSubmitted).order
        total = order.total()
        if total > limit:
            log.info(
                "declining %s %s: exceeds the limit %s",
                total,
                order.currency,
                limit,
            )
            reason = f"amount {total} {order.currency} exceeds the payment limit {limit}"
            return Reply("PaymentDeclined", PaymentDeclined(reason=reason, amount=total))
        record = Capture(
            order_id=order.order_id,
            payment_id="pay_" + derived_message_id(msg.correlation_id, ledger.PAYMENT),
            amount_cents=ledger.cents(total),
            currency=order.currency,
        )
        stored = await ledger.record_once(msg.redis, ledger.CAPTURES, msg.correlation_id, record)
        captured = PaymentCaptured(order=order, payment_id=stored.payment_id, amount=ledger.amount(stored.amount_cents))
        return Reply("PaymentCaptured", captured)

    @payment.compensates("RefundPayment", idempotent=True)  # effects recorded once per workflow
    async def refund(msg: Message) -> Reply:
        command = msg.parse(CompensationCommand)
        customer = (command.completed.get("order") or {}).get("customer_id")
        if customer in refund_fail_customers:
            reason = f"the card of customer {customer} cannot be refunded"
            log.warning("refund failed: %s", reason)
            return Reply("RefundFailed", CompensationFailed(reason=reason))
        raw = await msg.redis.hget(ledger.CAPTURES, msg.correlation_id)
        if raw is None:
            return Reply("PaymentRefunded", Compensated(step=command.step, detail="nothing was captured"))
        captured = Capture.model_validate_json(raw)
        record = Refund(amount_cents=captured.amount_cents, currency=captured.currency, reason=command.reason)
        stored = await ledger.record_if(msg.redis, ledger.CAPTURES, ledger.REFUNDS, msg.correlation_id, record)
        detail = (
            f"refunded {ledger.amount(stored.amount_cents)} {stored.currency}" if stored else "nothing was captured"
        )
        return Reply("PaymentRefunded", Compensated(step=command.step, detail=detail))

    return payment
