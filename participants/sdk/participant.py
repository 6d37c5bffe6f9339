"""A participant: the message types it handles and the functions that handle them.

A worker is a few decorated async functions::

    payment = Participant("payment")

    @payment.on("OrderSubmitted")
    async def capture(msg: Message) -> Reply:
        order = msg.parse(OrderSubmitted).order
        ...
        return Reply("PaymentCaptured", PaymentCaptured(order=order, payment_id=pid, amount=total))

    @payment.compensates("RefundPayment")
    async def refund(msg: Message) -> Reply: ...

The runner (:mod:`participants.sdk.runner`) reads the subscribed streams, calls
the handlers and commits what they return.
"""

from __future__ import annotations

import builtins
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ValidationError
from redis.asyncio import Redis

from contracts import naming
from contracts.envelope import Envelope, WorkflowRef
from contracts.messages import first_error, validate_payload
from participants.sdk.errors import Reject

ModelT = TypeVar("ModelT", bound=BaseModel)


@dataclass(frozen=True)
class Reply:
    """An event a handler emits in answer to its message.

    ``payload`` is a pydantic model (usually one of :mod:`contracts.messages`) or a
    JSON-able mapping.  The runner wraps it in an envelope that carries the
    incoming message's correlation id, workflow and trace context.
    """

    type: str
    payload: BaseModel | Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not naming.is_valid_name(self.type):
            raise ValueError(f"{self.type!r} is not a valid message type")

    def payload_dict(self) -> dict[str, Any]:
        if isinstance(self.payload, BaseModel):
            return self.payload.model_dump(mode="json", exclude_none=True)
        return dict(self.payload)

    def checked_payload(self) -> dict[str, Any]:
        """:meth:`payload_dict`, checked against the schema of ``type`` (:data:`contracts.messages.PAYLOADS`);
        raises :class:`~contracts.messages.PayloadError` if it does not fit.

        A model is checked too, even one of the registered class: ``model_copy(update=…)``,
        ``model_construct`` or an in-place change of a list would otherwise put an
        unvalidated payload on the wire.
        """
        payload = self.payload_dict()
        validate_payload(self.type, payload)
        return payload


@dataclass(frozen=True)
class Message:
    """One delivery of a message to a participant."""

    envelope: Envelope
    redis: Redis = field(repr=False)
    """The participant's client, for its own business state (under :func:`contracts.naming.participant_key`)."""
    participant: str
    stream: str = ""
    entry_id: str = ""
    attempt: int = 1
    """How many times this message has been delivered to the participant's group (1 on the first try)."""
    payload_model: BaseModel | None = field(default=None, repr=False)
    """The payload as the registered model of its type (:data:`contracts.messages.PAYLOADS`),
    as validated when the entry was decoded; None for a type without one."""

    @property
    def type(self) -> str:
        return self.envelope.type

    @property
    def message_id(self) -> str:
        return self.envelope.message_id

    @property
    def correlation_id(self) -> str:
        """The workflow id: key business effects by it (one transaction per workflow)."""
        return self.envelope.correlation_id

    @property
    def workflow(self) -> WorkflowRef:
        return self.envelope.workflow

    @property
    def payload(self) -> dict[str, Any]:
        return self.envelope.payload

    def parse(self, model: builtins.type[ModelT]) -> ModelT:
        """The payload as ``model``; a payload that does not fit is rejected (dead-lettered at once).

        For the registered model of the message's type this is :attr:`payload_model`,
        the very object validated at decode, and the same on every call: treat it as read-only.
        """
        decoded = self.payload_model
        if type(decoded) is model:
            return decoded
        try:
            return model.model_validate(self.envelope.payload)
        except ValidationError as exc:
            path, msg = first_error(exc, "payload")
            read_as = "" if model.__name__ == self.type else f" for {model.__name__}"  # (said once when they agree)
            raise Reject(f"invalid {self.type} payload{read_as} at {path}: {msg}") from exc


HandlerResult = Reply | Sequence[Reply] | None


class Handler(Protocol):
    """An async function of one :class:`Message` that returns its replies.

    It returns one :class:`Reply`, several, or None (nothing to emit: the message
    is just acknowledged), or raises :class:`~participants.sdk.errors.Retry` /
    :class:`~participants.sdk.errors.Reject`.  It may run more than once for the
    same message (after a crash, or a peer's takeover), so its side effects must
    be idempotent — key them by ``msg.correlation_id``.
    """

    def __call__(self, msg: Message, /) -> Awaitable[HandlerResult]: ...


HandlerT = TypeVar("HandlerT", bound=Handler)


@dataclass(frozen=True)
class Subscription:
    """One message type a participant handles."""

    type: str
    handler: Handler
    compensation: bool = False
    idempotent: bool = False
    """The handler's effects are idempotent by themselves: on a first delivery the
    runner skips the outcome-record look-up (one round trip per batch)."""


class Participant:
    """A named set of handlers, one per subscribed message type.

    ``name`` is the consumer group on every stream it reads, the producer of every
    message it emits, and the hash tag of its business state.
    """

    def __init__(self, name: str) -> None:
        if not naming.is_valid_name(name):
            raise ValueError(f"{name!r} is not a valid participant name (letters, digits, _ . -)")
        if name == naming.CONTROLLER_GROUP:
            raise ValueError(f"{name!r} is reserved for the controller")
        self.name = name
        self._subscriptions: dict[str, Subscription] = {}

    def __repr__(self) -> str:
        return f"Participant({self.name!r}, types={list(self._subscriptions)})"

    def on(self, message_type: str, *, idempotent: bool = False) -> Callable[[HandlerT], HandlerT]:
        """Register the decorated function as the handler of ``message_type`` events.

        ``idempotent=True`` promises that running the handler again for a message it
        has already handled changes nothing (its effects are keyed by the workflow,
        say): the runner then looks the outcome record up only for redeliveries, not
        for first deliveries, which saves a round trip per batch.  A duplicate of a
        handled message may then run the handler again; its replies are still
        emitted only once.
        """
        return self._register(message_type, compensation=False, idempotent=idempotent)

    def compensates(self, command_type: str, *, idempotent: bool = False) -> Callable[[HandlerT], HandlerT]:
        """Register the decorated function as the handler of the ``command_type``
        compensation command (it undoes this participant's effect for the workflow);
        ``idempotent`` as for :meth:`on`."""
        return self._register(command_type, compensation=True, idempotent=idempotent)

    def _register(self, message_type: str, *, compensation: bool, idempotent: bool) -> Callable[[HandlerT], HandlerT]:
        if not naming.is_valid_name(message_type):
            raise ValueError(f"{message_type!r} is not a valid message type")
        if message_type in self._subscriptions:
            raise ValueError(f"{self.name} already handles {message_type!r}")

        def register(handler: HandlerT) -> HandlerT:
            self._subscriptions[message_type] = Subscription(message_type, handler, compensation, idempotent)
            return handler

        return register

    @property
    def subscriptions(self) -> Mapping[str, Subscription]:
        """message type -> subscription, read-only."""
        return MappingProxyType(self._subscriptions)

    @property
    def types(self) -> tuple[str, ...]:
        """Every subscribed message type, sorted."""
        return tuple(sorted(self._subscriptions))

    def streams(self, partitions: int) -> list[str]:
        """Every stream this participant reads."""
        return [naming.message_stream(p, t) for p in range(partitions) for t in self.types]

    async def dispatch(self, msg: Message) -> list[Reply]:
        """Run the handler of ``msg`` and return its replies as a list.

        Exceptions propagate; the runner decides what they mean.  Tests call this
        to exercise a handler without streams.
        """
        subscription = self._subscriptions.get(msg.type)
        if subscription is None:
            raise Reject(f"{self.name} has no handler for {msg.type!r}")
        result = await subscription.handler(msg)
        if result is None:
            return []
        if isinstance(result, Reply):
            return [result]
        replies = list(result)
        for reply in replies:
            if not isinstance(reply, Reply):
                raise TypeError(f"handler of {msg.type} returned {type(reply).__name__}, not Reply")
        return replies
