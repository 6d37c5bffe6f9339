"""The Participant declaration: subscriptions, dispatch and payload parsing (no streams)."""

from __future__ import annotations

import dataclasses
from decimal import Decimal

import pytest
from pydantic import ConfigDict
from redis.asyncio import Redis

from contracts import naming
from contracts.messages import OrderSubmitted, PayloadError, PaymentCaptured, PaymentDeclined, parse_payload
from participants.sdk import Message, Participant, Reject, Reply, Retry, RunnerSettings
from tests.participants.helpers import envelope, message, order


def test_handlers_are_registered_per_type_and_marked_when_they_compensate() -> None:
    payment = Participant("payment")

    @payment.on("OrderSubmitted")
    async def capture(msg: Message) -> None:
        return None

    @payment.compensates("RefundPayment")
    async def refund(msg: Message) -> None:
        return None

    assert payment.types == ("OrderSubmitted", "RefundPayment")
    assert payment.subscriptions["OrderSubmitted"].handler is capture
    assert not payment.subscriptions["OrderSubmitted"].compensation
    assert payment.subscriptions["RefundPayment"].compensation
    assert payment.streams(2) == [
        naming.message_stream(0, "OrderSubmitted"),
        naming.message_stream(0, "RefundPayment"),
        naming.message_stream(1, "OrderSubmitted"),
        naming.message_stream(1, "RefundPayment"),
    ]


def test_a_type_has_one_handler() -> None:
    payment = Participant("payment")

    @payment.on("OrderSubmitted")
    async def capture(msg: Message) -> None:
        return None

    with pytest.raises(ValueError, match="already handles 'OrderSubmitted'"):
        payment.on("OrderSubmitted")


@pytest.mark.parametrize("name", ["", "9lives", "has space", "controller"])
def test_participant_names_are_checked(name: str) -> None:
    with pytest.raises(ValueError, match=repr(name)):
        Participant(name)


def test_message_types_are_checked() -> None:
    with pytest.raises(ValueError, match="'bad type'"):
        Participant("p").on("bad type")
    with pytest.raises(ValueError, match="'bad type'"):
        Reply("bad type")


def test_retry_delay_must_not_be_negative() -> None:
    assert Retry(delay=2.5).delay == 2.5
    with pytest.raises(ValueError, match="-1"):
        Retry(delay=-1)


async def test_dispatch_returns_the_replies_as_a_list(redis: Redis) -> None:
    p = Participant("p")

    @p.on("One")
    async def one(msg: Message) -> Reply:
        return Reply("Done", {"n": 1})

    @p.on("Many")
    async def many(msg: Message) -> list[Reply]:
        return [Reply("Done", {"n": 1}), Reply("Done", {"n": 2})]

    @p.on("Nothing")
    async def nothing(msg: Message) -> None:
        return None

    assert await p.dispatch(message(redis, "p", envelope("One"))) == [Reply("Done", {"n": 1})]
    assert len(await p.dispatch(message(redis, "p", envelope("Many")))) == 2
    assert await p.dispatch(message(redis, "p", envelope("Nothing"))) == []
    with pytest.raises(Reject, match="no handler for 'Other'"):
        await p.dispatch(message(redis, "p", envelope("Other")))


class _MyOrderSubmitted(OrderSubmitted):
    """A handler's own model of the payload."""


async def test_parse_gives_a_typed_payload_and_rejects_one_that_does_not_fit(redis: Redis) -> None:
    good = message(redis, "p", envelope("OrderSubmitted", {"order": order(("SKU-1", 2, "5.00"))}))
    assert good.parse(OrderSubmitted).order.items[0].sku == "SKU-1"
    bad = message(redis, "p", envelope("OrderSubmitted", {"order": {"customer_id": "c"}}))
    with pytest.raises(Reject, match=r"^invalid OrderSubmitted payload at payload\.order\.items"):
        bad.parse(OrderSubmitted)  # the model has the type's name: said once
    with pytest.raises(Reject, match=r"^invalid OrderSubmitted payload for _MyOrderSubmitted at payload\.order\.items"):
        bad.parse(_MyOrderSubmitted)


async def test_parse_returns_the_model_validated_at_decode_for_the_registered_model(redis: Redis) -> None:
    env = envelope("OrderSubmitted", {"order": order(("SKU-1", 2, "5.00"))})
    decoded = parse_payload(env.type, env.payload)
    msg = dataclasses.replace(message(redis, "p", env), payload_model=decoded)
    assert msg.parse(OrderSubmitted) is decoded
    assert msg.parse(OrderSubmitted) is decoded  # the same object every time: no second validation
    own = msg.parse(_MyOrderSubmitted)  # any other model is validated from the payload, as before
    assert type(own) is _MyOrderSubmitted
    assert own.order.items[0].sku == "SKU-1"
    undecoded = message(redis, "p", env)  # built without the runner: parse validates
    assert undecoded.payload_model is None
    parsed = undecoded.parse(OrderSubmitted)
    assert parsed is not decoded
    assert parsed == decoded


def test_a_reply_of_the_registered_model_is_checked_too() -> None:
    declined = PaymentDeclined(reason="over the limit", amount=Decimal("1200.00"))
    assert Reply("PaymentDeclined", declined).checked_payload() == {"reason": "over the limit", "amount": "1200.00"}
    # ways to hold a model of the registered class that pydantic never validated
    for unchecked in (
        PaymentDeclined.model_construct(reason="r", amount=Decimal("-1")),
        declined.model_copy(update={"amount": Decimal("-1")}),
    ):
        with pytest.raises(PayloadError, match=r"payload\.amount"):
            Reply("PaymentDeclined", unchecked).checked_payload()


@pytest.mark.parametrize(
    ("reply", "path"),
    [
        (Reply("PaymentDeclined", {"reason": "r", "amount": "-1"}), "payload.amount"),  # a dict with a bad field
        (Reply("PaymentDeclined", {"amount": "1"}), "payload.reason"),  # a dict missing a field
        (Reply("PaymentCaptured", PaymentDeclined(reason="r")), "payload.order"),  # another type's model
    ],
)
def test_a_reply_that_is_not_the_registered_model_is_validated(reply: Reply, path: str) -> None:
    with pytest.raises(PayloadError, match=rf"invalid {reply.type} payload at {path.replace('.', '[.]')}"):
        reply.checked_payload()


def test_a_subclass_of_the_registered_model_is_validated_as_a_dict() -> None:
    class Lenient(PaymentCaptured):
        model_config = ConfigDict(extra="ignore", validate_assignment=False)

    captured = Lenient.model_validate({"order": order(("SKU-1", 1, "1.00")), "payment_id": "p", "amount": "1.00"})
    captured.amount = Decimal("-5")  # no validation on assignment in this subclass
    with pytest.raises(PayloadError, match=r"payload\.amount"):
        Reply("PaymentCaptured", captured).checked_payload()
    assert Reply("Unregistered", captured).checked_payload()["amount"] == "-5"  # a type without a schema


def test_reply_payload_may_be_a_model_or_a_mapping() -> None:
    model = OrderSubmitted.model_validate({"order": order(("SKU-1", 1, "9.99"))})
    assert Reply("X", model).payload_dict()["order"]["items"][0]["unit_price"] == "9.99"
    assert Reply("X", {"a": 1}).payload_dict() == {"a": 1}


@pytest.mark.parametrize(
    ("overrides", "complaint"),
    [
        ({"concurrency": 0}, "concurrency"),
        ({"block_ms": 5000}, "block_ms"),
        ({"claim_idle_ms": 100, "pending_interval_s": 0.5}, "claim_idle_ms"),
        ({"handler_timeout_s": 0}, "handler_timeout_s"),
    ],
)
def test_runner_settings_are_checked(overrides: dict[str, int | float], complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        RunnerSettings(redis_url="redis://localhost", **overrides)  # type: ignore[arg-type]


def test_the_default_consumer_name_is_host_and_pid() -> None:
    import os
    import socket

    assert RunnerSettings(redis_url="redis://x").consumer == f"{socket.gethostname()}-{os.getpid()}"
